"""The `hf` judge: a local transformers causal LM reads the pairwise prompt, and its verdict is
its next-token probability of each label right after `Verdict:`. Nothing is parsed, so the label
is a probability: p(first better) = P(label A) / (P(label A) + P(label B)).

With `rationale: true` the judge first writes a short rationale (greedy), which is then put
in front of the `Verdict:` whose next token is read (Lee et al. 2023, chain-of-thought labelling).
"""

from __future__ import annotations

from typing import Any

from posttrain.context import StageContext
from posttrain.errors import PosttrainError
from posttrain.generation import generate, model_device
from posttrain.judges import Judge, PairQuery, load_local_model
from posttrain.judges.prompt import RATIONALE, VERDICT, pairwise_prompt, render_question, split_rationale
from posttrain.recipe import HFJudgeSpec
from posttrain.training import release


def build(spec: HFJudgeSpec, ctx: StageContext, judge_id: str) -> Judge:
    tokenizer, model = load_local_model(spec.model, ctx)
    ending, label_ids = label_tokens(tokenizer, spec.labels)
    options = (spec.principles, spec.labels, spec.rationale)

    def compare(queries: list[PairQuery]) -> list[dict[str, Any]]:
        heads = [
            _render(tokenizer, pairwise_prompt(render_question(q.prompt), q.first, q.second, *options), spec)
            for q in queries
        ]
        rationales: list[str | None] = [None] * len(queries)
        if spec.rationale:
            rationales = _rationales(model, tokenizer, [h + RATIONALE for h in heads], spec)
            heads = [f"{h}{RATIONALE} {r}\n" for h, r in zip(heads, rationales, strict=True)]
        probs = label_probabilities(model, tokenizer, [h + ending for h in heads], label_ids, spec.batch_size)
        return [
            {"p_first": p_first, "rationale": r, "mass": mass}
            for (p_first, mass), r in zip(probs, rationales, strict=True)
        ]

    return Judge(
        id=judge_id,
        batch_size=spec.batch_size,
        compare=compare,
        principles=spec.principles,
        close=release,  # the model goes with the judge (its closures hold it); this collects it
    )


def _render(tokenizer: Any, user: str, spec: HFJudgeSpec) -> str:
    """The judge's context up to the start of its own turn."""
    if spec.chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
    return f"{user}\n\n"


def _rationales(model: Any, tokenizer: Any, contexts: list[str], spec: HFJudgeSpec) -> list[str]:
    outputs, _ = generate(
        model, tokenizer, contexts, max_new_tokens=spec.rationale_max_new_tokens, batch_size=spec.batch_size
    )
    return [split_rationale(o[0]) for o in outputs]


def label_tokens(tokenizer: Any, labels: tuple[str, str]) -> tuple[str, list[int]]:
    """How the context must end (`Verdict:` or `Verdict: `) so that each label is exactly one
    next token, and those two token ids. BPE vocabularies usually hold ` A`; character-level
    ones need the space in the context."""
    for ending, gap in ((VERDICT, " "), (f"{VERDICT} ", "")):
        base = tokenizer(ending, add_special_tokens=False)["input_ids"]
        ids = []
        for label in labels:
            full = tokenizer(ending + gap + label, add_special_tokens=False)["input_ids"]
            if len(full) == len(base) + 1 and full[: len(base)] == base:
                ids.append(full[-1])
        if len(ids) == 2 and ids[0] != ids[1]:
            return ending, ids
    raise PosttrainError(
        f"judge labels {list(labels)} are not single tokens after '{VERDICT}' for this tokenizer",
        fix="choose labels that are, e.g. labels: [A, B] or [1, 2]",
    )


def label_probabilities(
    model: Any, tokenizer: Any, contexts: list[str], label_ids: list[int], batch_size: int
) -> list[tuple[float, float]]:
    """For each context, (P(label 0) / P(either label), P(either label)) of the next token."""
    import torch

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    results: list[tuple[float, float]] = []
    try:
        for i in range(0, len(contexts), batch_size):
            batch = tokenizer(
                contexts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(model_device(model))
            # Left padding: a token's position counts only the real tokens before it.
            positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            with torch.no_grad():
                logits = model(**batch, position_ids=positions).logits[:, -1, :].float()
            logprobs = torch.log_softmax(logits, dim=-1)[:, label_ids]
            pair = torch.softmax(logprobs, dim=-1)[:, 0]
            mass = logprobs.exp().sum(-1)
            results.extend(zip(pair.tolist(), mass.tolist(), strict=True))
    finally:
        tokenizer.padding_side = side
    return results
