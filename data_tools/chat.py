"""Shape rows into the conversations trainers and the chat template expect.

- `apply_template`: `template: "{question}\\n\\nOptions: {choices}"` builds `prompt` from
  several source columns (a list cell is written `A) x, B) y`).
- `as_conversation`: a text `prompt` becomes a user turn and a text `completion` / `chosen` /
  `rejected` an assistant turn, so every model sees its own chat template; ShareGPT
  conversations (`from`/`value`, `human`/`gpt`) become `role`/`content`.
- `add_system`: a `system` column (per row) or the recipe's `system_prompt` becomes a system
  turn at the start of `prompt` and `messages`.
"""

from __future__ import annotations

import string
from typing import Any

from posttrain.errors import PosttrainError
from posttrain.recipe import template_fields

REPLY_COLUMNS = ("completion", "chosen", "rejected")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
SHAREGPT_ROLES |= {"system": "system", "tool": "tool", "function_call": "assistant", "observation": "tool"}


def _cell(value: Any) -> str:
    if isinstance(value, list | tuple) and all(not isinstance(v, dict | list) for v in value):
        return ", ".join(f"{string.ascii_uppercase[i % 26]}) {v}" for i, v in enumerate(value))
    return "" if value is None else str(value)


def render_template(template: str, row: dict[str, Any]) -> str:
    return template.format_map({name: _cell(row[name]) for name in template_fields(template)})


def apply_template(dataset: Any, template: str, label: str) -> Any:
    """A `prompt` column rendered from `template`; a missing column lists the real ones."""
    missing = [name for name in template_fields(template) if name not in dataset.column_names]
    if missing:
        raise PosttrainError(
            f"{label}: template names column '{missing[0]}'; the data has: {', '.join(dataset.column_names)}",
            fix="fix `template:`",
        )
    return dataset.map(lambda row: {"prompt": render_template(template, row)})


def _turn(role: str, content: Any) -> list[dict[str, str]]:
    return [{"role": role, "content": content}] if isinstance(content, str) else content


def _sharegpt(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [
        {"role": SHAREGPT_ROLES.get(m.get("from"), m.get("from")), "content": m.get("value")}
        for m in messages
    ]


def as_conversation(dataset: Any) -> Any:
    """Text prompts and replies as chat turns; ShareGPT conversations as role/content."""
    first = dataset[0] if len(dataset) else {}
    text_prompt = isinstance(first.get("prompt"), str)
    messages = first.get("messages")
    sharegpt = isinstance(messages, list) and bool(messages) and "from" in messages[0]
    if not (text_prompt or sharegpt):
        return dataset

    def convert(row: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if text_prompt:
            out["prompt"] = _turn("user", row["prompt"])
            out |= {c: _turn("assistant", row[c]) for c in REPLY_COLUMNS if c in row}
        if sharegpt:
            out["messages"] = _sharegpt(row["messages"])
        return out

    return dataset.map(convert)


def add_system(dataset: Any, system_prompt: str | None) -> Any:
    """A system turn first in each conversation: the row's `system` column, else `system_prompt`."""
    has_column = "system" in dataset.column_names
    if not has_column and not system_prompt:
        return dataset

    def prepend(row: dict[str, Any]) -> dict[str, Any]:
        system = (row.get("system") if has_column else None) or system_prompt
        out: dict[str, Any] = {}
        for column in ("prompt", "messages"):
            value = row.get(column)
            if not system or value is None:
                continue
            if isinstance(value, str):
                out[column] = f"{system}\n\n{value}"
            elif not value or value[0].get("role") != "system":
                out[column] = [{"role": "system", "content": system}, *value]
        return out

    dataset = dataset.map(prepend)
    return dataset.remove_columns("system") if has_column else dataset
