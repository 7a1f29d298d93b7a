"""`repetition`: penalise repeated n-grams ("Demystifying Long CoT", App. C.2), trl's own reward.

The unit is the tokenizer's tokens (trl's `completion_ids`: language-agnostic, what the
paper uses), or words / characters of the text, which need no tokenizer.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from posttrain.rewards.registry import RewardFunc, register
from posttrain.rewards.text import completion_text


@register("repetition")
def repetition(
    ngram_size: Annotated[int, Field(gt=0)] = 3,
    max_penalty: Annotated[float, Field(le=0)] = -1.0,
    unit: Literal["tokens", "words", "chars"] = "tokens",
) -> RewardFunc:
    """(1 - unique n-grams / all n-grams) x max_penalty: 0 for no repeats, near max_penalty (< 0)
    for a completion that loops. `tokens` falls back to words when no token ids are given."""
    from trl.rewards import get_repetition_penalty_reward

    penalty = get_repetition_penalty_reward(ngram_size=ngram_size, max_penalty=max_penalty)

    def repetition_reward(
        completions: list[Any], completion_ids: Any = None, **kwargs: Any
    ) -> list[float | None]:
        if unit == "tokens" and completion_ids is not None and len(completion_ids) == len(completions):
            units = [list(ids) for ids in completion_ids]
        elif unit == "chars":
            units = [list(completion_text(c)) for c in completions]
        else:
            units = [completion_text(c).lower().split() for c in completions]
        return penalty(completion_ids=units)  # trl's reward only hashes the units

    return repetition_reward
