"""The canonical columns hold what the trainers read: text, or a list of {role, content} turns.

Checked on the dataset's schema (and, for roles, one pass over the role strings in Arrow), so
it costs nothing per row in Python: a `prompt` of numbers, `messages` stored as a JSON string,
or a role no chat template knows fails here with the file, the row and the fix, instead of a
TypeError inside the tokenizer or "at least one example has no assistant tokens" inside trl.
"""

from __future__ import annotations

import difflib
from typing import Any

from posttrain.data_tools.chat import SHAREGPT_ROLES
from posttrain.errors import PosttrainError

TEXT_OR_TURNS = ("prompt", "completion", "chosen", "rejected")  # a string or a list of turns
TURNS = ("messages",)  # always a list of turns
ROLES = ("system", "user", "assistant", "tool", "developer")


def check_shapes(dataset: Any, label: str) -> None:
    """Raise a PosttrainError for the first canonical column whose values trainers cannot read."""
    for column in (*TEXT_OR_TURNS, *TURNS):
        if column not in dataset.column_names:
            continue
        feature = dataset.features[column]
        if _is_turns(feature):
            _check_roles(dataset, column, label)
        elif column in TURNS or not _is_text(feature):
            raise _shape_error(dataset, column, label)


def _is_text(feature: Any) -> bool:
    return getattr(feature, "dtype", None) in ("string", "large_string")


def _is_turns(feature: Any) -> bool:
    inner = getattr(feature, "feature", None)
    return isinstance(inner, dict) and "role" in inner and "content" in inner


def _shape_error(dataset: Any, column: str, label: str) -> PosttrainError:
    first = repr(dataset[0][column])[:60] if len(dataset) else "none"
    holds = getattr(dataset.features[column], "dtype", None) or "other values"
    wanted = (
        "a list of {role, content} turns" if column in TURNS else "text or a list of {role, content} turns"
    )
    if column in TURNS and _is_text(dataset.features[column]):
        fix = "write each row's messages as a JSON list of {role, content} objects, not as a string"
    else:
        fix = f"map a text column to it with `columns: {{{column}: <your column>}}`, or write it as text"
    return PosttrainError(f"{label}: column '{column}' holds {holds} (row 1: {first}), not {wanted}", fix=fix)


def _check_roles(dataset: Any, column: str, label: str) -> None:
    import pyarrow.compute as pc

    turns = pc.list_flatten(dataset.data.column(column))
    unknown = set(pc.unique(pc.struct_field(turns, "role")).to_pylist()) - set(ROLES)
    if not unknown:
        return
    roles = sorted(unknown, key=str)
    row = next(
        i for i, value in enumerate(dataset[column]) if any(t.get("role") in unknown for t in value or [])
    )
    hints = [f"write '{SHAREGPT_ROLES[r]}' for '{r}'" for r in roles if SHAREGPT_ROLES.get(r) in ROLES]
    hints += [f"'{close[0]}' for '{r}'?" for r in roles if r not in SHAREGPT_ROLES and (close := _close(r))]
    raise PosttrainError(
        f"{label}: row {row + 1}: '{column}' has turns with role {', '.join(map(repr, roles))}; "
        f"chat roles are {', '.join(ROLES)}",
        fix="; ".join(hints) or f"use one of {', '.join(ROLES)}",
    )


def _close(role: Any) -> list[str]:
    return difflib.get_close_matches(str(role), ROLES, n=1, cutoff=0.6)
