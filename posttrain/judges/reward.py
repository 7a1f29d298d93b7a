"""The `reward` judge: any registered reward as the judge, for verifiable domains.

Pointwise: each answer gets the reward's score, and p(a better) = sigmoid((r_a - r_b) /
temperature); with the 0/1 `accuracy` reward a right answer beats a wrong one with p close to
1 and two right (or two wrong) answers tie and are dropped. The reward reads its dataset
columns (e.g. `answer`) from the prompt's row, and sees completions as trl would pass them
(conversational when the prompt is).

    judge: {backend: reward, reward: {name: accuracy}}
"""

from __future__ import annotations

from typing import Any

from posttrain.context import StageContext
from posttrain.judges import Judge
from posttrain.recipe import RewardJudgeSpec
from posttrain.rewards import build_reward


def build(spec: RewardJudgeSpec, ctx: StageContext, judge_id: str) -> Judge:
    reward = build_reward(spec.reward, ctx)

    def score(items: list[tuple[Any, str, dict[str, Any]]]) -> list[float | None]:
        prompts = [prompt for prompt, _, _ in items]
        completions = [
            [{"role": "assistant", "content": answer}] if isinstance(prompt, list) else answer
            for prompt, answer, _ in items
        ]
        columns = {c: [row[c] for _, _, row in items] for c in reward.columns}
        return reward(prompts=prompts, completions=completions, **columns)

    return Judge(
        id=judge_id,
        batch_size=spec.batch_size,
        score=score,
        columns=tuple(reward.columns),
        temperature=spec.temperature,
    )
