"""Reward functions for GRPO, rejection sampling and scoring (imported as `posttrain.rewards`).

Every reward has trl's signature, `reward(prompts, completions, **columns) -> list[float | None]`
(None: "cannot judge this one", which trl leaves out of the advantage), and is registered by
name. A recipe uses one as

    rewards:
      - {name: accuracy, weight: 1.0}                    # options are the factory's keywords
      - {name: format, weight: 0.2, mode: lenient}
      - {name: reward_model, model: rm, weight: 0.5}     # `model:` is a stage name or a path
      - {name: my_pkg.rewards:brevity, weight: 0.1}      # your own, by import path

Options are checked against the reward's factory signature (and its annotations) when the
recipe loads, before any model does.

The interface other code uses (small on purpose):

    spec = RewardSpec(name="accuracy")            # posttrain.recipe.RewardSpec, or a dict
    reward = build_reward(spec, ctx)              # ctx.model(ref) resolves `model:` (posttrain.context.StageContext)
    scores = reward(prompts=..., completions=..., answer=[...])
    reward_columns(spec)                          # ("answer",): the dataset columns it reads
    reward.stats.as_dict()                        # samples, none, errors, timeouts, samples_per_s

`build_reward` returns a `Reward` (guard.py): it never raises on bad completions, turns NaN
into None, and logs `rewards/<name>/errors|none_frac|timeouts` through trl's `log_metric`.

Your own reward: a plain function with trl's signature (its required parameters other than
trl's own are dataset columns; those with defaults are options), or a factory registered with

    from posttrain.rewards import register

    @register("brevity")
    def brevity(max_chars: int = 400):
        def reward(completions, **kwargs):
            return [...]
        return reward

and named in the recipe by import path (`my_pkg.rewards:brevity`), which imports (and so
registers) it. Test a reward on a file before a long run with `posttrain rewards score`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from posttrain.recipe import RewardSpec
from posttrain.rewards import (  # noqa: F401  (importing registers the built-in rewards)
    accuracy,
    format,
    judge,
    language,
    length,
    repetition,
    reward_model,
)
from posttrain.rewards.guard import Reward, RewardStats
from posttrain.rewards.registry import (
    REGISTRY,
    ModelResolver,
    RewardDef,
    RewardFunc,
    bind_options,
    check_spec,
    get_reward,
    register,
    reward_names,
)

__all__ = [
    "REGISTRY",
    "ModelResolver",
    "Reward",
    "RewardDef",
    "RewardFunc",
    "RewardStats",
    "build_reward",
    "check_spec",
    "get_reward",
    "register",
    "reward_columns",
    "reward_label",
    "reward_names",
]


def _spec(spec: Any) -> Any:
    return spec if isinstance(spec, RewardSpec) else RewardSpec.model_validate(dict(spec))


def reward_label(spec: Any) -> str:
    """The name a reward goes by in metrics and samples: `label`, else its name (an import path's
    function name)."""
    return _spec(spec).display_name


def reward_columns(spec: Any) -> tuple[str, ...]:
    """The dataset columns the reward reads (besides prompt and completion)."""
    return get_reward(_spec(spec).name).columns


def build_reward(spec: Any, ctx: ModelResolver | None = None) -> Reward:
    """The reward a `rewards:` entry describes, ready to hand to trl (`reward_funcs=[...]`).

    `ctx.model(ref)` resolves the entry's `model:` (needed only by rewards that take a model)."""
    spec = _spec(spec)
    definition = get_reward(spec.name)
    options: dict[str, Any] = bind_options(definition, spec.options, spec.model is not None)
    if definition.needs_model:
        if ctx is None:
            raise ValueError(f"reward '{spec.name}' needs a context that resolves its model")
        options["model"] = ctx.model(spec.model)
    return Reward(reward_label(spec), definition.factory(**options), definition.columns)


def describe() -> Mapping[str, str]:
    """Each registered reward's one-line summary (for `posttrain rewards list`)."""
    return {name: REGISTRY[name].summary for name in reward_names()}
