"""Held-out evaluation of a model: batched generation, scored answers, pass@k / maj@k, gates.

Runs after every training stage when the recipe has an `eval:` block, and as the `evaluate`
stage kind. Each prompt gets a greedy completion (`accuracy`) and, with `k > 1`, k sampled
ones (`pass_at_1` = mean correctness over samples, as DeepSeek-R1 reports it at T=0.6;
`pass_at_k` = any sample correct; `maj_at_k` = the most frequent answer is correct).
Results land in the stage's metrics.json under `eval`, every prompt in `eval_samples.jsonl`:

    {"accuracy": 0.69, "n": 200, "format_rate": 0.98, "mean_length": 21.4,
     "pass_at_1": 0.61, "pass_at_k": 0.83, "maj_at_k": 0.70, "k": 4, "temperature": 0.6}

Scoring (`score`) compares the completion's final answer (`<answer>`, `\\boxed{}` or `#### N`)
with the row's `answer` (a bare answer or a whole GSM8K/MATH solution) after normalisation.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import TYPE_CHECKING, Any

from posttrain.data_tools import extract_answer, normalize_answer, reference_answer, require_columns
from posttrain.errors import PosttrainError
from posttrain.recipe import EvalSpec, PathModel

if TYPE_CHECKING:
    from posttrain.recipe import Recipe, StageBase
    from posttrain.runner import StageContext

R1_FORMAT = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)
SAMPLES_FILE = "eval_samples.jsonl"


def score(completions: list[str], answers: list[str]) -> tuple[list[bool], list[bool]]:
    """(correct, well formatted) for each completion against its reference answer."""
    correct = [
        normalize_answer(extract_answer(c)) == normalize_answer(reference_answer(a))
        for c, a in zip(completions, answers, strict=True)
    ]
    return correct, [bool(R1_FORMAT.match(c)) for c in completions]


def evaluate_model(source: PathModel, spec: EvalSpec, ctx: StageContext) -> dict[str, Any]:
    """Generate, score and record; returns the `eval` block of the stage's metrics."""
    from transformers import set_seed

    from posttrain.generation import generate, render_prompts
    from posttrain.models import load_causal_lm, load_tokenizer

    rows = ctx.data(spec.data)
    require_columns(rows, ["prompt", "answer"], "evaluation", "eval.data")
    if len(rows) == 0:
        raise PosttrainError("the evaluation data has no rows", key="eval.data")
    tokenizer = load_tokenizer(source)
    model = load_causal_lm(source).eval()
    if _has_cuda():
        model = model.to("cuda")
    prompts = render_prompts(tokenizer, list(rows["prompt"]))
    answers = [str(a) for a in rows["answer"]]
    options = {"max_new_tokens": spec.max_new_tokens, "batch_size": spec.batch_size}
    greedy, speed = generate(model, tokenizer, prompts, **options)
    completions = [o[0] for o in greedy]
    correct, formatted = score(completions, answers)
    n = len(completions)
    result: dict[str, Any] = {
        "accuracy": sum(correct) / n,
        "n": n,
        "format_rate": sum(formatted) / n,
        "mean_length": sum(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in completions) / n,
        "tokens_per_s": round(speed["tokens_per_s"], 1),
    }
    sampled: list[list[str]] = [[] for _ in prompts]
    if spec.k > 1:
        set_seed(ctx.seed)
        sampled, _ = generate(
            model, tokenizer, prompts, **options, num_return_sequences=spec.k, do_sample=True,
            temperature=spec.temperature, top_p=spec.top_p,
        )  # fmt: skip
        result |= sample_metrics(sampled, answers) | {"k": spec.k, "temperature": spec.temperature}
    if ctx.is_main:
        write_samples(ctx, rows["prompt"], completions, answers, correct, sampled)
    if spec.harness is not None:
        from posttrain.harness import run_harness

        result["harness"] = run_harness(source, spec.harness, ctx)
    return result


def sample_metrics(sampled: list[list[str]], answers: list[str]) -> dict[str, float]:
    """pass@1 (mean over the k samples), pass@k and maj@k over prompts."""
    pass_1 = pass_k = majority = 0.0
    for samples, answer in zip(sampled, answers, strict=True):
        correct, _ = score(samples, [answer] * len(samples))
        pass_1 += sum(correct) / len(samples)
        pass_k += any(correct)
        majority += correct[majority_index(samples)]
    n = len(answers)
    return {"pass_at_1": pass_1 / n, "pass_at_k": pass_k / n, "maj_at_k": majority / n}


def majority_index(samples: list[str]) -> int:
    """The first sample whose (normalised) final answer is the most frequent one; 0 when none has one."""
    finals = [normalize_answer(extract_answer(s)) for s in samples]
    votes = Counter(f for f in finals if f is not None)
    if not votes:
        return 0
    winner = votes.most_common(1)[0][0]
    return finals.index(winner)


def write_samples(
    ctx: StageContext,
    prompts: list[Any],
    completions: list[str],
    answers: list[str],
    correct: list[bool],
    sampled: list[list[str]],
) -> None:
    from posttrain.artifacts import write_atomic

    lines = []
    for p, c, a, ok, samples in zip(prompts, completions, answers, correct, sampled, strict=True):
        row = {"prompt": p, "completion": c, "answer": a, "correct": ok}
        if samples:
            row |= {"samples": samples, "samples_correct": score(samples, [a] * len(samples))[0]}
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    write_atomic(ctx.out_dir / SAMPLES_FILE, "".join(lines))


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


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
