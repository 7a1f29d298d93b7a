"""`load_recipe`: read a recipe's YAML, apply `--set` overrides, validate it with pydantic
(the first error becomes one `file:line: key: message` line) and run the schema's cross-checks,
so a bad recipe fails in a second, before any weights load. The checks that need code above the
schema follow in posttrain.loading (`load`, which the CLI calls)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from posttrain.errors import PosttrainError
from posttrain.recipe.checks import check_data, check_evaluation, check_references, check_trainer_keys
from posttrain.recipe.schema import Recipe
from posttrain.recipe.source import SourceMap, apply_override, read_yaml


def _validation_error(exc: ValidationError, source: SourceMap) -> PosttrainError:
    """The first pydantic error as one line with the YAML key path and its line."""
    err = exc.errors(include_url=False)[0]
    loc = _yaml_path(err["loc"], source.data)
    message = err["msg"]
    if err["type"] == "unknown_key":
        loc = (*loc, err["ctx"]["key"])
        message = f"unknown key; {err['ctx']['hint']}"
    elif err["type"] in ("unknown_tag", "missing_tag"):
        loc = (*loc, err["ctx"]["field"])
    elif err["type"] == "missing":
        loc = (*_yaml_path(err["loc"][:-1], source.data), err["loc"][-1])
        message = "required key is missing"
    elif message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    more = len(exc.errors()) - 1
    if more:
        message += f" (+{more} more problem{'s' if more > 1 else ''})"
    return source.error(loc, message)


def _yaml_path(loc: tuple, data: Any) -> tuple:
    """Drop pydantic's union tags and validator names from an error location."""
    path: list = []
    node = data
    for i, part in enumerate(loc):
        if (
            isinstance(node, dict)
            and part in node
            or isinstance(node, list)
            and isinstance(part, int)
            and part < len(node)
        ):
            if _is_tag(node, part, loc[i + 1 :]):
                continue
            node = node[part]
        else:
            continue
        path.append(part)
    return tuple(path)


def _is_tag(node: Any, part: Any, rest: tuple) -> bool:
    """A union tag that is also a key of the block: in `{synthetic: arithmetic, n: -5}` the error
    is at ('synthetic', 'n'), and `n` belongs to the block, not to the string 'arithmetic'."""
    return (
        bool(rest) and isinstance(node, dict) and not isinstance(node[part], dict | list) and rest[0] in node
    )


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe; every problem is a PosttrainError with file and line."""
    data, lines = read_yaml(path)
    if not isinstance(data, dict):
        raise PosttrainError("a recipe is a mapping with name, base_model and stages", file=str(path), line=1)
    for assignment in overrides:
        apply_override(data, assignment, lines)
    source = SourceMap(str(path), lines, data)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc, source) from None
    recipe._source = source
    check_references(recipe)
    check_trainer_keys(recipe)
    check_data(recipe)
    check_evaluation(recipe)
    return recipe
