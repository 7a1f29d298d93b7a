"""The fixed sets of strings that trl config fields accept, read from the installed trl itself.

`loss_type: not_a_loss` would otherwise pass `validate` and fail (or silently fall back) only
inside the trainer. Where a field declares its values they are taken as declared: an Enum in
its type (transformers' `lr_scheduler_type`, `optim`, `save_strategy`, ... which
`TrainingArguments.__post_init__` converts and so enforces), a `Literal[...]`, or
`metadata["choices"]`. trl 1.16 types most of its own options as plain `str` and names the
values only in help text and code; for those, the values are the string constants the config
and trainer modules compare the field with (`self.loss_type == "grpo"`,
`args.scale_rewards in ["group", "none"]`): the values the trainer has a branch for. A field
counts only when at least two such values are compared and its default is one of them, so a
field compared against one special value (`pad_to_multiple_of == "auto"`) stays open.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import functools
import importlib.util
import types
import typing
from pathlib import Path
from typing import Any

from posttrain.errors import did_you_mean


def choices_problem(config: type, key: str, value: Any) -> tuple[str, str] | None:
    """(message, fix) when `value` is a string outside the fixed set of values of the config's
    field `key`; None when it is inside, when the field takes any string, or for other values."""
    if not isinstance(value, str):
        return None
    allowed = fixed_choices(config).get(key)
    if allowed is None or value in allowed:
        return None
    hint = did_you_mean(value, allowed)
    listed = "one of: " + ", ".join(allowed)
    owner = f"{config.__module__.partition('.')[0]}.{config.__name__}"  # trl.GRPOConfig, peft.LoraConfig
    return f"'{value}' is not a value {owner} takes", f"{hint} {listed}" if hint else listed


@functools.cache
def fixed_choices(config: type) -> dict[str, tuple[str, ...]]:
    """Each field of the config dataclass that takes one of a fixed set of strings, with that set."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    try:
        hints = typing.get_type_hints(config)  # peft writes its annotations as strings
    except Exception:  # an annotation that does not resolve: the fields' own (unresolved) types
        hints = {}
    found = {
        name: choices
        for name, f in fields.items()
        if (choices := declared_choices(f, hints.get(name, f.type)))
    }
    compared = compared_strings(config, set(fields))
    for name, values in compared.items():
        field = fields[name]
        if name in found or hints.get(name, field.type) is not str or not isinstance(field.default, str):
            continue
        if len(values) >= 2 and field.default in values:
            found[name] = tuple(sorted(values))
    return found


def declared_choices(field: dataclasses.Field, annotation: Any) -> tuple[str, ...] | None:
    """Values a field declares: `metadata["choices"]`, or an Enum or a Literal in its type. A
    Literal beside a plain `str`, or with a template among its values (peft's
    'pissa_niter_[number of iters]'), does not make a fixed set."""
    if field.metadata.get("choices"):
        return tuple(str(c) for c in field.metadata["choices"])
    members = _union_members(annotation)
    enums = [m for m in members if isinstance(m, type) and issubclass(m, enum.Enum)]
    if enums:
        return tuple(str(e.value) for e in enums[0])
    values = [v for m in members if typing.get_origin(m) is typing.Literal for v in typing.get_args(m)]
    strings = tuple(v for v in values if isinstance(v, str))
    if strings and str not in members and not any("[" in v for v in strings):
        return strings
    return None


def _union_members(annotation: Any) -> tuple[Any, ...]:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return typing.get_args(annotation)
    return (annotation,)


def compared_strings(config: type, names: set[str]) -> dict[str, set[str]]:
    """String constants compared with `<anything>.<field>` in the config's module and its trainer's."""
    found: dict[str, set[str]] = {}
    for tree in _module_trees(config):
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and len(node.ops) == 1:
                pair = (node.left, node.comparators[0])
                for attr, other in (pair, pair[::-1]):
                    if isinstance(attr, ast.Attribute) and attr.attr in names:
                        found.setdefault(attr.attr, set()).update(_strings(node.ops[0], other))
    return {name: values for name, values in found.items() if values}


def _strings(op: ast.cmpop, node: ast.expr) -> list[str]:
    if isinstance(op, ast.Eq | ast.NotEq) and _is_str(node):
        return [node.value]
    in_list = isinstance(op, ast.In | ast.NotIn) and isinstance(node, ast.List | ast.Tuple | ast.Set)
    if in_list and all(_is_str(e) for e in node.elts):
        return [e.value for e in node.elts]
    return []


def _is_str(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def _module_trees(config: type) -> list[ast.Module]:
    """The parsed source of the config's module and, by trl's naming, its trainer's (x_config ->
    x_trainer), read from disk: importing a trainer module would pull in half of transformers."""
    name = config.__module__
    names = [name, name.removesuffix("_config") + "_trainer"] if name.endswith("_config") else [name]
    trees = []
    for module in names:
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            continue  # no such module, or no source installed: nothing to learn from it
        trees.append(ast.parse(Path(spec.origin).read_text(encoding="utf-8")))
    return trees
