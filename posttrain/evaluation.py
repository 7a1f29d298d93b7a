"""Held-out evaluation of a model: batched generation, scored answers, pass@k / maj@k, gates.

Runs after every training stage when the recipe has an `eval:` block, and as the `evaluate`
stage kind. Each prompt gets a greedy completion (`accuracy`) and, with `k > 1`, k sampled
ones (`pass_at_1` = mean correctness over samples, as DeepSeek-R1 reports it at T=0.6;
`pass_at_k` = any sample correct; `maj_at_k` = the most frequent answer is correct).
Results land in the stage's metrics.json under `eval`, every prompt in `eval_samples.jsonl`:

    {"accuracy": 0.69, "n": 200, "format_rate": 0.98, "mean_length": 21.4,
     "pass_at_1": 0.61, "pass_at_k": 0.83, "maj_at_k": 0.70, "k": 4, "temperature": 0.6}

Scoring uses the reward library: `accuracy` (the completion's final answer, from `<answer>`,
`\\boxed{}` or `#### N`, is math-verify-equivalent to the row's `answer`, which may be a
whole GSM8K / MATH solution) and `format` (strict R1 template). maj@k votes over the final
answers in the normalised form the accuracy judge compares.

Generation is split over every rank (`generation.generate_all`: the same batches, and seeds,
whatever the world size), so 8 GPUs evaluate about 8 times as fast as one and give the same
numbers; `seconds` and `processes` in the block say how long it took on how many.
`backend:` picks transformers, vLLM or an OpenAI-compatible server (`server:` evaluates a
served model, and nothing is loaded here).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from posttrain import artifacts
from posttrain.artifacts import write_atomic
from posttrain.context import StageContext
from posttrain.data_tools import describe, extract_answer, require_columns
from posttrain.distributed import map_batches, on_main, state, unsharded_loading
from posttrain.errors import PosttrainError, warn
from posttrain.generation import Engine, Generated, Sampling, generate_all, open_engine
from posttrain.harness import run_harness
from posttrain.recipe import EvalSpec, PathModel, Recipe, StageBase
from posttrain.rewards import build_reward
from posttrain.rewards.math_judge import clean

SCORE_CHUNK = 64  # completions per scoring batch; the batches are split over the ranks


def score(completions: list[str], answers: list[str]) -> tuple[list[bool], list[bool]]:
    """(correct, well formatted) for each completion: the `accuracy` and `format` rewards at 1.0.
    A completion the accuracy judge cannot decide (None: a timeout) counts as wrong. Every rank
    scores a share (math-verify is CPU work) and gets every result."""
    accuracy, formatted = build_reward({"name": "accuracy"}), build_reward({"name": "format"})

    def chunk(idx: range) -> tuple[list[bool], list[bool]]:
        texts, truth = completions[idx.start : idx.stop], answers[idx.start : idx.stop]
        return [s == 1.0 for s in accuracy(completions=texts, answer=truth)], [
            s == 1.0 for s in formatted(completions=texts)
        ]

    chunks = [
        range(i, min(i + SCORE_CHUNK, len(completions))) for i in range(0, len(completions), SCORE_CHUNK)
    ]
    results = map_batches(chunks, chunk)
    return [c for r in results for c in r[0]], [f for r in results for f in r[1]]


def evaluate_model(source: PathModel | None, spec: EvalSpec, ctx: StageContext) -> dict[str, Any]:
    """Generate (split over every rank), score and record; returns the `eval` block of the
    stage's metrics on every rank. `source` may be None when `spec.server` serves the model."""
    rows = ctx.data(spec.data)
    require_columns(rows, ["prompt", "answer"], "evaluation", "eval.data")
    if len(rows) == 0:
        raise PosttrainError("the evaluation data has no rows", key="eval.data")
    rows = distinct_problems(rows, f"stages.{ctx.stage}: evaluation data")
    answers = [str(a) for a in rows["answer"]]
    started = time.perf_counter()
    with open_engine(source, spec) as engine:
        prompts = engine.render(list(rows["prompt"]), describe(spec.data))  # before the weights load
        greedy = generate_all(
            engine, prompts, Sampling(spec.max_new_tokens), batch_size=spec.batch_size, seed=ctx.seed,
            description="eval (greedy)",
        )  # fmt: skip
        sampled = sample(engine, prompts, spec, ctx.seed) if spec.k > 1 else None
    completions = [o[0] for o in greedy.outputs]
    correct, formatted = score(completions, answers)
    n = len(completions)
    result: dict[str, Any] = {
        "accuracy": sum(correct) / n,
        "n": n,
        "format_rate": sum(formatted) / n,
        "mean_length": sum(lengths[0] for lengths in greedy.lengths) / n,
        "tokens_per_s": round(greedy.stats["tokens_per_s"], 1),
    }
    samples: list[list[str]] = [[] for _ in prompts]
    samples_correct: list[list[bool]] = [[] for _ in prompts]
    if sampled is not None:
        samples = sampled.outputs
        samples_correct = sampled_scores(samples, answers, spec.k)
        result |= sample_metrics(samples, samples_correct) | {"k": spec.k, "temperature": spec.temperature}
    result |= {"seconds": round(time.perf_counter() - started, 2), "processes": state().num_processes}
    if ctx.is_main:
        rows_out = zip(rows["prompt"], completions, answers, correct, samples, samples_correct, strict=True)
        write_samples(ctx.out_dir / artifacts.EVAL_SAMPLES, rows_out)
    if spec.harness is not None:
        with unsharded_loading():  # lm-eval loads the model on one process, even under ZeRO-3
            result["harness"] = on_main(run_harness, source, spec.harness, ctx)
    return result


def distinct_problems(rows: Any, where: str) -> Any:
    """Each (prompt, answer) once, in order. A repeated problem gets the same greedy completion,
    so repeats would only inflate `n` (and weigh some problems more): `n: 5000` on a split of 24
    problems is an evaluation on 24, and says so."""
    seen: set[str] = set()
    keep = []
    for i, (prompt, answer) in enumerate(zip(rows["prompt"], rows["answer"], strict=True)):
        key = json.dumps([prompt, answer], sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            keep.append(i)
    if len(keep) == len(rows):
        return rows
    warn(
        f"{where}: {len(rows)} rows hold {len(keep)} distinct problems; each is evaluated once (n={len(keep)})"
    )
    return rows.select(keep)


def sample(engine: Engine, prompts: list[Any], spec: EvalSpec, seed: int) -> Generated:
    """k completions per prompt at the spec's temperature, seeded per batch (per prompt on vLLM
    and servers), so they do not depend on the number of ranks."""
    sampling = Sampling(
        spec.max_new_tokens, spec.k, do_sample=True, temperature=spec.temperature, top_p=spec.top_p
    )
    return generate_all(
        engine, prompts, sampling, batch_size=spec.batch_size, seed=seed + 1,  # not the greedy pass's seeds
        description=f"eval ({spec.k} samples each)",
    )  # fmt: skip


def sampled_scores(sampled: list[list[str]], answers: list[str], k: int) -> list[list[bool]]:
    """Whether each of the k samples of each prompt is correct."""
    flat, _ = score([s for group in sampled for s in group], [a for a in answers for _ in range(k)])
    return [flat[i : i + k] for i in range(0, len(flat), k)]


def sample_metrics(sampled: list[list[str]], correct: list[list[bool]]) -> dict[str, float]:
    """pass@1 (mean over the k samples), pass@k (any correct) and maj@k (the most frequent final
    answer is correct), averaged over prompts."""
    n = len(sampled)
    return {
        "pass_at_1": sum(sum(c) / len(c) for c in correct) / n,
        "pass_at_k": sum(any(c) for c in correct) / n,
        "maj_at_k": sum(c[majority_index(s)] for s, c in zip(sampled, correct, strict=True)) / n,
    }


def majority_index(samples: list[str]) -> int:
    """The first sample whose (normalised) final answer is the most frequent one; 0 when none has one."""
    finals = [clean(found) if (found := extract_answer(s)) is not None else None for s in samples]
    votes = Counter(f for f in finals if f is not None)
    if not votes:
        return 0
    winner = votes.most_common(1)[0][0]
    return finals.index(winner)


def write_samples(path: Path, samples: Iterable[tuple]) -> None:
    """One JSON line per prompt: prompt, greedy completion, answer, correct (+ the k samples)."""
    lines = []
    for prompt, completion, answer, correct, sampled, sampled_correct in samples:
        row = {"prompt": prompt, "completion": completion, "answer": answer, "correct": correct}
        if sampled:
            row |= {"samples": sampled, "samples_correct": sampled_correct}
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    write_atomic(path, "".join(lines))


def eval_hash(spec: EvalSpec | None) -> str | None:
    """The hash a stage's manifest keeps of the `eval:` its evaluation ran with (None without one):
    the runner re-evaluates a cached stage when it changes, and distill reuses its teacher's
    evaluation when it matches."""
    return artifacts.canonical_hash(spec.model_dump(mode="json")) if spec else None


def check_gate(recipe: Recipe, stage: StageBase, metrics: dict[str, Any]) -> None:
    """Stop the pipeline with one line when the stage's evaluation misses its gate."""
    if stage.gate is None:
        return
    path = ("stages", recipe.stage_names().index(stage.name), "gate")
    result = metrics.get("eval")
    if not result:
        raise recipe.error(path, f"stage '{stage.name}' has no eval results to gate on (it saves no model)")
    for metric, minimum in stage.gate.thresholds().items():
        value = result.get(metric)
        if value is None or value < minimum:
            shown = "missing" if value is None else f"{value:.3f}"
            raise recipe.error(
                path,
                f"stage '{stage.name}' failed its gate: eval {metric} {shown} < min_{metric} {minimum:.3f}; "
                "the pipeline stops here",
                f"the stage stays COMPLETE: improve it with --force {stage.name}, or lower the gate, and run again",
            )
