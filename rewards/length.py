"""`length` (cosine-scaled by correctness) and `overlong` (DAPO's soft overlong punishment).

Lengths are in tokens: trl passes each completion's token ids. Where none are given
(`posttrain rewards score` without `--tokenizer`), they are counted in characters.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import Field

from posttrain.rewards.accuracy import accuracy
from posttrain.rewards.registry import RewardFunc, register
from posttrain.rewards.text import completion_text


@register("length", columns=("answer",))
def length(
    max_len: Annotated[int, Field(gt=0)],
    min_value_wrong: float = -1.0,
    max_value_wrong: float = -0.5,
    min_value_correct: float = 0.5,
    max_value_correct: float = 1.0,
    timeout: float = 5.0,
) -> RewardFunc:
    """Correctness scaled by length on a cosine ("Demystifying Long CoT", App. C.1): a correct
    answer earns more the shorter it is (max_value_correct at 0 tokens, min_value_correct at
    max_len), a wrong one is punished less the longer it reasons; None without a gold answer.

    Correctness is `accuracy`'s verdict (with its `timeout`)."""
    correct_of = accuracy(timeout=timeout)

    def length_reward(completions: list[Any], answer: list[Any], **kwargs: Any) -> list[float | None]:
        correct = correct_of(completions=completions, answer=answer, **kwargs)
        scores: list[float | None] = []
        for ok, n in zip(correct, completion_lengths(completions, kwargs), strict=True):
            if ok is None:
                scores.append(None)
                continue
            cosine = math.cos(min(n / max_len, 1.0) * math.pi)
            low, high = (min_value_correct, max_value_correct) if ok else (max_value_wrong, min_value_wrong)
            scores.append(low + 0.5 * (high - low) * (1.0 + cosine))
        return scores

    return length_reward


@register("overlong")
def overlong(max_len: Annotated[int, Field(gt=0)], soft_cache: Annotated[int, Field(ge=0)] = 0) -> RewardFunc:
    """DAPO's soft overlong punishment (eq. 13): 0 up to max_len - soft_cache tokens, then falling
    linearly to -1 at max_len, -1 beyond. Set max_len to the trainer's max_completion_length."""
    from trl.rewards import get_soft_overlong_punishment

    punish = get_soft_overlong_punishment(max_completion_len=max_len, soft_punish_cache=soft_cache)

    def overlong_reward(completions: list[Any], **kwargs: Any) -> list[float | None]:
        # trl's reward reads only len() of each id list
        return punish(completion_ids=[range(n) for n in completion_lengths(completions, kwargs)])

    return overlong_reward


def completion_lengths(completions: list[Any], kwargs: dict[str, Any]) -> list[int]:
    """Token counts from trl's `completion_ids`, else character counts."""
    ids = kwargs.get("completion_ids")
    if ids is not None and len(ids) == len(completions):
        return [len(i) for i in ids]
    return [len(completion_text(c)) for c in completions]
