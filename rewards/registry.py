"""The reward registry: names to factories, options checked against signatures, import paths.

A registered reward is a *factory*: its keyword parameters are the options a recipe may set
(`{name: format, mode: lenient}`), and it returns the reward function itself, with trl's
signature. A user's reward named by import path (`my_pkg.mod:fn`) is either a registered
factory or a plain reward function; a plain function's keyword parameters with defaults are
its options and its required parameters (other than trl's own) are the dataset columns it
reads.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from pydantic import TypeAdapter, ValidationError

from posttrain.errors import PosttrainError, did_you_mean, one_of

RewardFunc = Callable[..., list[float | None]]

# Keyword arguments trl's GRPOTrainer passes to every reward function; never dataset columns.
TRAINER_KWARGS = frozenset(
    {"prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric", "environments"}
)
MODEL_PARAMETER = "model"


class ModelResolver(Protocol):
    """What a reward needs from its caller: a model slot resolved to a path (`posttrain.context.StageContext`)."""

    def model(self, ref: Any) -> Any: ...


@dataclasses.dataclass(frozen=True)
class RewardDef:
    """A registered reward: how to build it, its options, and the dataset columns it reads."""

    name: str
    factory: Callable[..., RewardFunc]
    columns: tuple[str, ...]
    options: Mapping[str, inspect.Parameter]
    needs_model: bool
    summary: str
    typed_by: Callable | None = None  # whose annotations type the options (default: the factory)

    def hints(self) -> dict[str, Any]:
        try:
            hints = typing.get_type_hints(self.typed_by or self.factory, include_extras=True)
        except Exception:  # an annotation that does not resolve is simply not type-checked
            return {}
        return {k: v for k, v in hints.items() if k in self.options}


REGISTRY: dict[str, RewardDef] = {}


def register(name: str, *, columns: Iterable[str] = ()) -> Callable[[Callable], Callable]:
    """Decorator: register `factory` under `name`; `columns` are the dataset columns its reward reads.

    The factory's keyword parameters are the reward's options; a parameter named `model`
    receives the recipe's `model:` resolved to a path (a stage's `model/`, or as given)."""

    def decorate(factory: Callable) -> Callable:
        existing = REGISTRY.get(name)
        if existing is not None and existing.factory.__qualname__ != factory.__qualname__:
            raise ValueError(f"two rewards are registered as '{name}'")
        params = inspect.signature(factory).parameters
        reward = RewardDef(
            name=name,
            factory=factory,
            columns=tuple(columns),
            options={k: p for k, p in params.items() if k != MODEL_PARAMETER and p.kind != p.VAR_KEYWORD},
            needs_model=MODEL_PARAMETER in params,
            summary=_summary(factory),
        )
        REGISTRY[name] = reward
        factory.__posttrain_reward__ = reward  # type: ignore[attr-defined]
        return factory

    return decorate


def reward_names() -> list[str]:
    return sorted(REGISTRY)


def get_reward(name: str) -> RewardDef:
    """The reward registered as `name`, or the one at import path `package.module:function`."""
    if ":" in name:
        return _import_reward(name)
    if name in REGISTRY:
        return REGISTRY[name]
    hint = did_you_mean(name, REGISTRY) or one_of(REGISTRY)
    raise PosttrainError(f"unknown reward '{name}'", fix=f"{hint}; or your own as package.module:function")


def _import_reward(path: str) -> RewardDef:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise PosttrainError(
            f"cannot import reward module '{module_name}': {e}",
            fix="install it or put it on PYTHONPATH (run from the folder that holds it)",
        ) from None
    except Exception as e:  # the module's own code fails as it runs
        raise PosttrainError(
            f"reward module '{module_name}' raised {type(e).__name__} on import: {e}",
            fix=f"fix the module; `python -c 'import {module_name}'` shows the traceback",
        ) from None
    obj = getattr(module, attr, None)
    if obj is None:
        public = [n for n in vars(module) if not n.startswith("_")]
        raise PosttrainError(
            f"module '{module_name}' has no '{attr}'", fix=did_you_mean(attr, public) or "check the name"
        )
    registered = getattr(obj, "__posttrain_reward__", None)
    if registered is not None:
        return registered
    if callable(obj) and "completions" in _parameters(obj):
        return _plain_reward(path, obj)
    raise PosttrainError(
        f"'{path}' is not a reward function",
        fix="a reward takes (prompts, completions, **columns) and returns one float or None per completion",
    )


def _parameters(fn: Callable) -> Mapping[str, inspect.Parameter]:
    try:
        return inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}


def _plain_reward(path: str, fn: Callable) -> RewardDef:
    """A plain reward function: defaults are options (bound by keyword), required names are columns."""
    params = _parameters(fn)
    usable = {
        k: p
        for k, p in params.items()
        if k not in TRAINER_KWARGS and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }
    options = {k: p for k, p in usable.items() if p.default is not p.empty}
    columns = tuple(k for k, p in usable.items() if p.default is p.empty)

    def factory(**bound: Any) -> RewardFunc:
        if not bound:
            return fn

        def reward(**kwargs: Any) -> list[float | None]:
            return fn(**kwargs, **bound)

        reward.__name__ = getattr(fn, "__name__", path)
        return reward

    return RewardDef(path, factory, columns, options, False, _summary(fn), typed_by=fn)


def _summary(fn: Callable) -> str:
    doc = inspect.getdoc(fn) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


# --------------------------------------------------------------------------- options


def bind_options(reward: RewardDef, options: Mapping[str, Any], has_model: bool) -> dict[str, Any]:
    """The options validated against the factory's signature and annotations; ValueError says what to fix."""
    for key in options:
        if key not in reward.options:
            hint = did_you_mean(key, reward.options) or (
                one_of(reward.options) if reward.options else "it takes no options"
            )
            raise ValueError(f"reward '{reward.name}' has no option '{key}'; {hint}")
    for key, param in reward.options.items():
        if param.default is param.empty and key not in options:
            raise ValueError(f"reward '{reward.name}' needs option '{key}'")
    if reward.needs_model and not has_model:
        raise ValueError(f"reward '{reward.name}' needs `model:` (a stage name or a path)")
    if has_model and not reward.needs_model:
        raise ValueError(f"reward '{reward.name}' takes no `model:`")
    return _typed(reward, options)


def _typed(reward: RewardDef, options: Mapping[str, Any]) -> dict[str, Any]:

    hints = reward.hints()
    values = {}
    for key, value in options.items():
        if key in hints:
            try:
                value = TypeAdapter(hints[key]).validate_python(value)
            except ValidationError as e:
                problem = e.errors(include_url=False)[0]["msg"]
                raise ValueError(f"reward '{reward.name}' option '{key}': {problem}") from None
        values[key] = value
    return values


def check_spec(name: str, options: Mapping[str, Any], has_model: bool) -> None:
    """Recipe-time check of one `rewards:` entry: the reward exists and its options bind (ValueError)."""
    try:
        reward = get_reward(name)
    except PosttrainError as e:
        raise ValueError(str(e)) from None
    bind_options(reward, options, has_model)
