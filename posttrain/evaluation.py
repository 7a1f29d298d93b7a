"""Held-out evaluation of a stage's model: batched greedy decoding, answer exact match.

Runs after every training stage when the recipe has an `eval:` block; results land in the
stage's metrics.json under `eval` and each sample in `eval_samples.jsonl`.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from posttrain.data_tools import extract_answer, require_columns
from posttrain.recipe import EvalSpec, PathModel

if TYPE_CHECKING:
    from posttrain.runner import StageContext

R1_FORMAT = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)


def evaluate_model(source: PathModel, spec: EvalSpec, ctx: StageContext) -> dict[str, Any]:
    """Accuracy (exact match of the `<answer>` with the row's `answer`), format rate, mean length."""
    from posttrain.generation import generate, render_prompts
    from posttrain.models import load_causal_lm, load_tokenizer

    rows = ctx.data(spec.data)
    require_columns(rows, ["prompt", "answer"], "evaluation", "eval.data")
    tokenizer = load_tokenizer(source)
    model = load_causal_lm(source).eval()
    if _has_cuda():
        model = model.to("cuda")
    prompts = render_prompts(tokenizer, list(rows["prompt"]))
    outputs, speed = generate(
        model, tokenizer, prompts, max_new_tokens=spec.max_new_tokens, batch_size=spec.batch_size
    )
    completions = [o[0] for o in outputs]
    answers = [str(a).strip() for a in rows["answer"]]
    correct = [extract_answer(c) == a for c, a in zip(completions, answers, strict=True)]
    samples = ctx.out_dir / "eval_samples.jsonl"
    with open(samples, "w", encoding="utf-8") as f:
        for p, c, a, ok in zip(rows["prompt"], completions, answers, correct, strict=True):
            f.write(json.dumps({"prompt": p, "completion": c, "answer": a, "correct": ok}) + "\n")
    n = len(completions)
    return {
        "accuracy": sum(correct) / n,
        "n": n,
        "format_rate": sum(bool(R1_FORMAT.match(c)) for c in completions) / n,
        "mean_length": sum(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in completions) / n,
        "tokens_per_s": round(speed["tokens_per_s"], 1),
    }


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
