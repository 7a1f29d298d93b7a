"""`judge`: score completions with an AI judge during RL (direct RLAIF, Lee et al. 2023).

    rewards:
      - {name: judge, model: judge-sft, judge: {backend: likelihood}, weight: 0.5}
      - {name: judge, model: Qwen/Qwen2.5-72B-Instruct,
         judge: {backend: openai, base_url: "http://localhost:8000/v1", api_key_env: null}}

`model:` is the judge model, as for every reward that uses one (a stage, a path or a hub id;
for `openai`, the served model's name), so the run orders and caches stages by it; `judge:`
holds the rest of a judge block exactly as in an `rlaif_label` stage, checked when the recipe
loads. No reward model is trained in between: the judge scores the policy's samples directly.

- A pointwise judge (`likelihood`) scores each completion by itself: its mean token
  log-likelihood under the judge (<= 0; higher is better). A completion repeated for the same
  prompt in the batch is judged once.
- A pairwise judge (`hf`, `openai`) compares each completion with the other completions of the
  same prompt in the batch (a GRPO group), in both orders, and scores it by its mean
  p(better) in [0, 1]. A completion with no peer in the batch scores None (not judged).

Lee et al. score single responses with a 1-10 rating prompt instead; the pairwise tournament
reuses the judge prompt, the position-bias cancelling and the label probabilities of the
labelling stage, at the cost of G(G-1) judge calls per group of G.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from typing import Any

from pydantic import RootModel, TypeAdapter, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from posttrain.recipe import JudgeSpec, PathModel
from posttrain.rewards.registry import RewardFunc, register
from posttrain.rewards.text import completion_text


class JudgeOptions(RootModel[dict[str, Any]]):
    """A judge block without its model (the reward's own `model:` is the judge model)."""

    @model_validator(mode="after")
    def _valid(self) -> JudgeOptions:
        try:
            judge_spec(self.root, "model-checked-at-build")
        except ValidationError as e:
            err = e.errors(include_url=False)[0]
            where = ".".join(str(part) for part in err["loc"][1:])  # loc[0]: the backend's union tag
            message = err["msg"].removeprefix("Value error, ")
            raise PydanticCustomError(
                "judge", "{message}", {"message": f"{where}: {message}" if where else message}
            ) from None
        except ValueError as e:
            raise PydanticCustomError("judge", "{message}", {"message": str(e)}) from None
        return self


def judge_spec(block: dict[str, Any], model: Any) -> Any:
    """The judge block as a validated judge spec, with `model` in its model slot."""
    if "model" in block:
        raise ValueError("give the judge model as the reward's own `model:`, not inside `judge:`")
    if block.get("backend") == "reward":
        raise ValueError("a `reward` judge as a reward is that reward: use it directly")
    if block.get("backend") == "openai":
        slot = model.path if isinstance(model, PathModel) else str(model)  # the served model's name
    else:
        slot = model if isinstance(model, PathModel) else {"path": str(model)}
    return TypeAdapter(JudgeSpec).validate_python({**block, "model": slot})


class _GivenModel:
    """Resolves a judge's model slot that the reward registry has already resolved to a path."""

    @staticmethod
    def model(ref: Any) -> Any:
        return ref


@register("judge")
def judge_reward(judge: JudgeOptions, model: Any) -> RewardFunc:
    """An AI judge scores each completion (direct RLAIF): a pointwise judge's score, or a pairwise
    judge's mean p(better) against the other completions of the same prompt."""
    # A cycle forces these three imports in here: judges.labels imports posttrain.rewards.text, and
    # importing the rewards package imports this module (it registers the built-in rewards).
    from posttrain.judges import BACKENDS

    spec = judge_spec(judge.root, model)
    built = importlib.import_module(BACKENDS[spec.backend]).build(
        spec, _GivenModel(), f"reward-{spec.backend}"
    )

    def score_with_judge(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float | None]:
        texts = [completion_text(c) for c in completions]
        if built.score is not None:
            return pointwise_scores(built.score, prompts, texts)
        return group_win_rates(built, prompts, texts)

    return score_with_judge


def prompt_key(prompt: Any) -> str:
    """The same key for equal prompts, chat messages or plain text: completions of one prompt in
    a batch are grouped (pairwise) or deduplicated (pointwise) by it."""
    return json.dumps(prompt, sort_keys=True, default=str)


def pointwise_scores(
    score: Callable[[list[tuple[Any, str, dict[str, Any]]]], list[float | None]],
    prompts: list[Any],
    texts: list[str],
) -> list[float | None]:
    """A pointwise judge's score of each completion, each distinct (prompt, completion) judged
    once: GRPO groups repeat answers word for word (half of the demo's late batches), and every
    judged text costs the judge a forward pass."""
    keys = [(prompt_key(p), t) for p, t in zip(prompts, texts, strict=True)]
    distinct = dict(zip(keys, zip(prompts, texts, strict=True), strict=True))
    scored = dict(zip(distinct, score([(p, t, {}) for p, t in distinct.values()]), strict=True))
    return [scored[key] for key in keys]


def group_win_rates(judge: Any, prompts: list[Any], texts: list[str]) -> list[float | None]:
    """Each completion's mean p(better) against the other completions of its prompt, both orders
    judged; identical completions tie at 0.5 without a judge call."""
    from posttrain.judges.cache import JudgeCache  # the cycle named in judge_reward
    from posttrain.judges.labels import candidate_pairs, judge_pairs

    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt_key(prompt), []).append(i)
    members = list(groups.values())
    answers = [[texts[i] for i in group] for group in members]
    judged = judge_pairs(
        judge, JudgeCache(None), [prompts[g[0]] for g in members], answers, candidate_pairs(answers, None, 0)
    )
    p_better: dict[tuple[int, str, str], float] = {}
    for j in judged:
        if j.valid:
            a, b = answers[j.pair.row][j.pair.a], answers[j.pair.row][j.pair.b]
            p_better[(j.pair.row, a, b)], p_better[(j.pair.row, b, a)] = j.p, 1.0 - j.p
    scores: list[float | None] = [None] * len(texts)
    for row, group in enumerate(members):
        for i in group:
            peers = [
                0.5 if texts[k] == texts[i] else p_better.get((row, texts[i], texts[k]))
                for k in group
                if k != i
            ]
            peers = [p for p in peers if p is not None]
            scores[i] = sum(peers) / len(peers) if peers else None
    return scores
