"""Benchmark suites through EleutherAI's lm-evaluation-harness, on a stage's saved model.

An optional extra: `pip install 'posttrain[eval]'`. The harness downloads each task's data
from the Hugging Face Hub, so it runs on a connected (GPU) machine; without a hub it can only
be validated (task names are checked against lm-eval's registry at recipe-load time).

    eval:
      data: {path: data/heldout.jsonl}
      harness: {tasks: [gsm8k, mmlu], num_fewshot: 5, limit: 500, model_args: {dtype: bfloat16}}

Per-task metrics land in metrics.json under `eval.harness` ({task: {metric: value}}), the
harness's full output in `<stage>/harness_results.json`. Your own task YAMLs (local data
files work offline) are found through `include_path`.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

from posttrain.artifacts import HARNESS_RESULTS, write_json
from posttrain.context import StageContext
from posttrain.errors import PosttrainError, did_you_mean
from posttrain.recipe import HarnessSpec, PathModel

INSTALL = "pip install 'posttrain[eval]' (lm-eval)"


def installed() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


@functools.cache
def _task_manager(include_path: str | None) -> Any:
    """lm-eval's task index (~15k task YAMLs, several seconds to build): once per process, not once
    at recipe load and again at every stage's evaluation."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def check_harness(spec: HarnessSpec) -> tuple[str, str | None] | None:
    """(message, fix) when the harness cannot run these tasks here; None when it can."""
    if not installed():
        return "the lm-eval harness is not installed", INSTALL
    manager = _task_manager(spec.include_path)
    for task in spec.tasks:
        if not manager.match_tasks([task]):
            return f"unknown lm-eval task '{task}'", did_you_mean(
                task, manager.all_tasks
            ) or "see `lm-eval ls tasks`"
    return None


def run_harness(source: PathModel, spec: HarnessSpec, ctx: StageContext) -> dict[str, dict[str, float]]:
    """Run the tasks on `source`; {task: {metric: value}} (standard errors left out)."""
    if not installed():
        raise PosttrainError("the lm-eval harness is not installed", fix=INSTALL)
    import lm_eval
    import torch

    model_args = {"pretrained": source.path, "trust_remote_code": source.trust_remote_code, **spec.model_args}
    output = lm_eval.simple_evaluate(
        model="hf",
        model_args=model_args,
        tasks=list(spec.tasks),
        num_fewshot=spec.num_fewshot,
        limit=spec.limit,
        batch_size=spec.batch_size,
        device="cuda" if torch.cuda.is_available() else "cpu",  # lm-eval assumes cuda otherwise
        apply_chat_template=spec.apply_chat_template,
        task_manager=_task_manager(spec.include_path),
        log_samples=False,
        random_seed=ctx.seed,
    )
    results = (output or {}).get("results", {})
    if ctx.is_main:
        write_json(ctx.out_dir / HARNESS_RESULTS, output or {})
    return {task: task_metrics(values) for task, values in results.items()}


def task_metrics(values: dict[str, Any]) -> dict[str, float]:
    """lm-eval's `{"exact_match,strict-match": 0.4, "exact_match_stderr,strict-match": 0.01,
    "sample_len": 1319, ...}` as `{"exact_match,strict-match": 0.4}`: the metrics alone. lm-eval
    names each `metric,filter`; the rest (alias, sample_len, standard errors) is not a score."""
    return {
        metric: float(value)
        for metric, value in values.items()
        if "," in metric
        and "_stderr" not in metric
        and isinstance(value, int | float)
        and not isinstance(value, bool)
    }
