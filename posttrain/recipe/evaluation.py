"""Held-out evaluation: how a set is evaluated (`EvalOptions`: greedy plus k samples,
lm-eval benchmark suites via `HarnessSpec`), the recipe-level `eval:` block (`EvalSpec`), the
gates that stop a pipeline on a bad model (`GateSpec`), and `fill_eval_defaults`, which spells
out before validation what the evaluation sets imply for evaluate stages and decontamination."""

from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import Field, model_validator

from posttrain.recipe.base import Strict
from posttrain.recipe.data import DataSpec
from posttrain.recipe.generation import Backend


class HarnessSpec(Strict):
    """Benchmark suites (MMLU, GSM8K, HumanEval, ...) through EleutherAI's lm-evaluation-harness
    on the stage's saved model: `pip install 'posttrain[eval]'`; the tasks download their data
    from the hub, so this runs on a connected (GPU) machine. Results go under `eval.harness`."""

    backend: Literal["lm-eval"] = "lm-eval"
    tasks: list[str] = Field(min_length=1)  # lm-eval task or group names (globs allowed)
    num_fewshot: int | None = Field(None, ge=0)
    limit: float | None = Field(None, gt=0)  # examples per task (a fraction when < 1)
    batch_size: int | Literal["auto"] = "auto"
    apply_chat_template: bool = True
    include_path: str | None = None  # a folder of your own task YAMLs
    model_args: dict[str, Any] = {}  # extra arguments of lm-eval's `hf` model (dtype, max_length, ...)


class EvalOptions(Backend):
    """How a held-out set is evaluated: a greedy answer per prompt, plus `k` sampled ones for
    pass@1 (the mean over samples, as DeepSeek-R1 reports it), pass@k and maj@k. `backend:` says
    what writes them (posttrain/recipe/generation.py); `server:` evaluates a served model."""

    max_new_tokens: int = Field(64, gt=0)
    batch_size: int = Field(64, gt=0)
    k: int = Field(1, ge=1)  # samples per prompt besides the greedy one; 1 = greedy only
    temperature: float = Field(0.6, gt=0)  # for the k samples
    top_p: float = Field(0.95, gt=0, le=1)
    harness: HarnessSpec | None = None


class EvalSpec(EvalOptions):
    """Held-out evaluation run after every training stage (greedy by default)."""

    data: DataSpec


class GateSpec(Strict):
    """Stop the pipeline when the stage's evaluation misses a threshold, instead of feeding a bad
    model on. The stage stays COMPLETE: change the gate (or the stage) and run again."""

    min_accuracy: float | None = Field(None, ge=0, le=1)  # greedy accuracy
    min_pass_at_1: float | None = Field(None, ge=0, le=1)  # mean over the k samples (needs k > 1)
    min_format_rate: float | None = Field(None, ge=0, le=1)

    @model_validator(mode="after")
    def _some(self) -> GateSpec:
        if not self.thresholds():
            raise ValueError("a gate needs a threshold: min_accuracy, min_pass_at_1 or min_format_rate")
        return self

    def thresholds(self) -> dict[str, float]:
        """{eval metric: minimum} for the thresholds that are set."""
        return {
            metric: value
            for metric, value in (
                ("accuracy", self.min_accuracy),
                ("pass_at_1", self.min_pass_at_1),
                ("format_rate", self.min_format_rate),
            )
            if value is not None
        }


def fill_eval_defaults(data: dict) -> dict:
    """Spell out what the evaluation sets imply, so the resolved recipe (and each stage's
    fingerprint) shows it: an `evaluate` stage takes the recipe's `eval:` settings (data, k,
    ...) for what it does not set, and a training stage's `decontaminate:` without `against`
    gets every evaluation set of the recipe."""
    stages = data.get("stages")
    if not isinstance(stages, list):
        return data
    data = copy.deepcopy(data)
    stages = data["stages"]
    recipe_eval = data.get("eval")
    eval_data = recipe_eval.get("data") if isinstance(recipe_eval, dict) else None
    sets = [eval_data] if eval_data is not None else []
    for stage in stages:
        if not isinstance(stage, dict) or stage.get("kind") != "evaluate":
            continue
        for key, value in recipe_eval.items() if isinstance(recipe_eval, dict) else ():
            if key in EvalSpec.model_fields and stage.get(key) is None:
                stage[key] = copy.deepcopy(value)
        if stage.get("data") is not None and stage["data"] not in sets:
            sets.append(stage["data"])
    if sets:
        for stage in stages:
            if isinstance(stage, dict) and stage.get("kind") != "evaluate":
                _fill_against(stage, sets)
    return data


def _fill_against(node: Any, sets: list) -> None:
    if isinstance(node, list):
        for item in node:
            _fill_against(item, sets)
    elif isinstance(node, dict):
        for key, value in node.items():
            if key == "decontaminate" and (
                value is True or isinstance(value, dict) and "against" not in value
            ):
                node[key] = {**(value if isinstance(value, dict) else {}), "against": copy.deepcopy(sets)}
            elif key != "train":
                _fill_against(value, sets)
