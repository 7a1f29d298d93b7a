"""The `likelihood` judge: a stronger model's mean token log-likelihood of each answer given the
prompt. Pointwise, so it has no position bias, and it needs no instruction following: a small
model trained longer than the policy is already a useful judge, offline.

    p(a better) = sigmoid((ll(a) - ll(b)) / temperature)

Conversational prompts go through the judge's chat template with the answer as the assistant
turn (its end-of-turn token included, so an answer that stops in the right place scores higher).
"""

from __future__ import annotations

from typing import Any

from posttrain.context import StageContext
from posttrain.generation import model_device
from posttrain.judges import Judge, load_local_model
from posttrain.recipe import LikelihoodJudgeSpec
from posttrain.training import release


def build(spec: LikelihoodJudgeSpec, ctx: StageContext, judge_id: str) -> Judge:
    tokenizer, model = load_local_model(spec.model, ctx)

    def score(items: list[tuple[Any, str, dict]]) -> list[float | None]:
        return mean_logprobs(
            model, tokenizer, [(prompt, answer) for prompt, answer, _ in items], spec.batch_size
        )

    return Judge(
        id=judge_id,
        batch_size=spec.batch_size,
        score=score,
        temperature=spec.temperature,
        close=release,  # the model goes with the judge (its closures hold it); this collects it
    )


def encode(tokenizer: Any, prompt: Any, answer: str) -> tuple[list[int], int]:
    """Token ids of prompt + answer, and where the answer starts (after the common prefix of the
    prompt alone and the whole, as templates may render the two slightly differently)."""
    if isinstance(prompt, list):
        head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        whole = tokenizer.apply_chat_template(
            [*prompt, {"role": "assistant", "content": answer}], tokenize=False
        )
    else:
        head, whole = prompt, prompt + answer
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    ids = tokenizer(whole, add_special_tokens=False)["input_ids"]
    start = 0
    while start < min(len(head_ids), len(ids) - 1) and head_ids[start] == ids[start]:
        start += 1
    return ids, max(start, 1)


def mean_logprobs(model: Any, tokenizer: Any, items: list[tuple[Any, str]], batch_size: int) -> list[float]:
    """Mean log p(answer token | everything before it) over each answer's tokens."""
    return [total / max(count, 1) for total, count in logprob_sums(model, tokenizer, items, batch_size)]


def logprob_sums(
    model: Any, tokenizer: Any, items: list[tuple[Any, str]], batch_size: int
) -> list[tuple[float, int]]:
    """(sum of log p(answer token | everything before it), number of answer tokens) per item: the
    sequence log-probability a DPO implicit reward is built from."""
    import torch

    pad = tokenizer.pad_token_id
    sums: list[tuple[float, int]] = []
    for i in range(0, len(items), batch_size):
        encoded = [encode(tokenizer, prompt, answer) for prompt, answer in items[i : i + batch_size]]
        width = max(len(ids) for ids, _ in encoded)
        input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        scored = torch.zeros_like(input_ids, dtype=torch.bool)
        for row, (ids, start) in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
            scored[row, start : len(ids)] = True
        device = model_device(model)
        with torch.no_grad():
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        targets = input_ids[:, 1:].to(device)
        token_lp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        keep = scored[:, 1:].to(device)
        sums.extend(zip((token_lp * keep).sum(-1).tolist(), keep.sum(-1).tolist(), strict=True))
    return sums
