"""The declared shape of what stages write to `metrics.json`, and what reads it (report, CLI).

Each stage kind's module declares its `Metrics` (a TypedDict) from the pieces here: what every
trainer reports (`TrainMetrics`), the held-out evaluation the runner adds (`EvalMetrics`, under
`eval`), the router summary of an MoE model (`MoESummary`), parameter counts. The report and
the CLI read these fields and nothing else, and `shape_problems` tells a metrics.json that
strays from its declaration: the tests run it on what real stages write, so renaming a key in
a stage breaks a test instead of silently blanking a report line.
"""

import re
import types
import typing
from collections.abc import Mapping
from typing import Any

from typing_extensions import NotRequired, TypedDict  # Python 3.10 has neither in `typing` as used here


class TrainMetrics(TypedDict):
    """A trainer's run (`training.train_metrics`): did the loss fall, how long, how fast."""

    steps: int
    loss_first: float | None
    loss_last: float | None
    loss_min: float | None
    runtime_s: float | None
    samples_per_s: float | None
    tokens: NotRequired[int]


class EvalMetrics(TypedDict):
    """A held-out evaluation (`evaluation.evaluate_model`); the sampled keys need `k > 1`."""

    accuracy: float
    n: int
    format_rate: float
    mean_length: float
    tokens_per_s: float
    seconds: float  # the evaluation's wall time (generation and scoring), over every rank
    processes: int  # the ranks that shared the prompts
    pass_at_1: NotRequired[float]
    pass_at_k: NotRequired[float]
    maj_at_k: NotRequired[float]
    k: NotRequired[int]
    temperature: NotRequired[float]
    harness: NotRequired[dict[str, dict[str, float]]]  # lm-eval: {task: {metric: value}}


class ParameterCounts(TypedDict):
    total: int
    trainable: int
    active: NotRequired[int]  # MoE models: parameters one token passes through


# Router balance of a trained MoE model (`moe.MoESetup.summary`); besides these averages there is
# one `moe/<layer>/<metric>` key per decoder layer and metric (PER_LAYER), not declared one by one.
MoESummary = TypedDict(
    "MoESummary",
    {
        "moe/load_cv": NotRequired[float],
        "moe/load_cv_first": NotRequired[float],
        "moe/load_cv_last": NotRequired[float],
        "moe/router_entropy": NotRequired[float],
        "moe/max_load": NotRequired[float],
        "moe/dead_experts": NotRequired[int],
        "moe/bias_update_rate": NotRequired[float],
    },
)
Curves = dict[str, list[tuple[int, float]]]  # TensorBoard scalars read back: {name: [(step, value)]}


def first_last(curve: list[tuple[int, float]]) -> tuple[float, float] | None:
    return (curve[0][1], curve[-1][1]) if curve else None


def trained(train: TrainMetrics | None, curves: Curves, loss: bool = True) -> list[str]:
    """A trainer's run in words, for a kind's `outcome`: `loss a → b` (from the loss curve when
    the metrics lack it) and `N steps`."""
    train = train or {}
    ends = (train.get("loss_first"), train.get("loss_last"))
    if None in ends:
        ends = first_last(curves.get("loss", [])) or (None, None)
    parts = [f"loss {ends[0]:.3f} → {ends[1]:.3f}"] if loss and None not in ends else []
    return parts + ([f"{train['steps']} steps"] if train.get("steps") else [])


PER_LAYER = re.compile(r"^moe/[^/]+/(load_cv|router_entropy|dead_experts|max_load|expert_share)$")


class Timed(TypedDict):
    wall_time_s: NotRequired[float]  # written by the runner with the stage's metrics.json


class Evaluated(Timed):
    eval: NotRequired[EvalMetrics]  # the recipe's `eval:` on the stage's model (the runner adds it)


# --------------------------------------------------------------------------- checking a file


def shape_problems(value: Any, shape: Any, where: str = "metrics") -> list[str]:
    """Where `value` (parsed JSON) strays from the declared `shape`: a required key missing, a key
    the shape does not declare, a nested block of the wrong kind. [] when it conforms."""
    if _is_typed_dict(shape):
        if not isinstance(value, Mapping):
            return [f"{where}: expected a mapping, got {type(value).__name__}"]
        hints = typing.get_type_hints(shape)
        problems = [
            f"{where}: missing '{key}'" for key in sorted(shape.__required_keys__) if key not in value
        ]
        for key, item in value.items():
            if key in hints:
                problems += shape_problems(item, hints[key], f"{where}.{key}")
            elif not (PER_LAYER.match(str(key)) and "moe/load_cv" in hints):
                problems.append(f"{where}: '{key}' is not declared in {shape.__name__}")
        return problems
    origin, args = typing.get_origin(shape), typing.get_args(shape)
    if origin in (typing.Union, types.UnionType):
        options = [shape_problems(value, arg, where) for arg in args]
        return [] if any(not found for found in options) else min(options, key=len)
    if origin is dict:
        if not isinstance(value, Mapping):
            return [f"{where}: expected a mapping, got {type(value).__name__}"]
        return [p for key, item in value.items() for p in shape_problems(item, args[1], f"{where}.{key}")]
    return []  # scalars and Any: the report formats what it finds


def _is_typed_dict(shape: Any) -> bool:
    return isinstance(shape, type) and issubclass(shape, dict) and hasattr(shape, "__required_keys__")
