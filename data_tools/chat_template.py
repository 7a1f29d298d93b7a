"""Conversations through a model's chat template: which template, which turns it accepts.

- `read_chat_template`: a recipe's `chat_template:` is a Jinja file, or the name of a template
  that ships with trl (`llama3`, `qwen2_5`, `gemma`, `deepseekv3`, ..., and their `_training`
  variants, which carry `{% generation %}` markers).
- `check_turns` / `render_chat` / `render_prompt`: a conversation the template cannot render (a
  `messages` cell that is a string, an unknown role, a system turn Gemma refuses, turns that do
  not alternate) is one line naming the file and row, found before training rather than as a
  Jinja traceback mid-run.

Rows are counted from 1 in the order the stage reads them (for one JSONL file: its line).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from posttrain.data_tools.shapes import ROLES
from posttrain.errors import PosttrainError, did_you_mean


def builtin_templates() -> dict[str, Path]:
    """The chat templates trl ships (`trl/chat_templates/*.jinja`), by name; found without importing trl."""
    spec = importlib.util.find_spec("trl")
    folders = [Path(p) / "chat_templates" for p in (spec.submodule_search_locations or [])] if spec else []
    return {path.stem: path for folder in folders for path in sorted(folder.glob("*.jinja"))}


def read_chat_template(value: str, key: str | None = None) -> str:
    """The template a recipe's `chat_template:` names: a Jinja file, else a trl built-in."""
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    builtins = builtin_templates()
    if value in builtins:
        return builtins[value].read_text(encoding="utf-8")
    hint = did_you_mean(value, builtins) or "built-ins: " + ", ".join(n for n in builtins if "_" not in n)
    raise PosttrainError(
        f"chat_template '{value}' is neither a file nor a built-in template",
        key=key,
        fix=f"give a .jinja file's path, or a built-in name ({hint})",
    )


def has_generation_markers(tokenizer: Any) -> bool:
    """Whether the template marks assistant output with `{% generation %}` (what trl's mask needs)."""
    template = tokenizer.chat_template or ""
    template = template.get("default", "") if isinstance(template, dict) else template
    return "{% generation" in template.replace("{%-", "{%").replace("{%+", "{%")


def _turn_problem(messages: Any) -> str | None:
    if not isinstance(messages, list):
        return f"`messages` is a {type(messages).__name__}, not a list of turns"
    if not messages:
        return "`messages` is empty"
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            return f"turn {i + 1} is not a {{role, content}} object"
        if turn["role"] not in ROLES:
            return f"turn {i + 1} has role '{turn['role']}', not one of {', '.join(ROLES)}"
    return None


def check_turns(messages: Any, label: str, row: int) -> None:
    """A conversation is a non-empty list of {role, content} turns with known roles."""
    problem = _turn_problem(messages)
    if problem:
        raise PosttrainError(
            problem,
            file=label,
            line=row,
            fix="store each conversation as a list of {role, content} turns (roles: "
            + ", ".join(ROLES)
            + ")",
        )


def render_chat(tokenizer: Any, messages: Any, label: str, row: int, **options: Any) -> str:
    """`messages` through the chat template as text; a turn the template refuses is one line."""
    check_turns(messages, label, row)
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **options)
    except Exception as e:  # jinja's TemplateError from raise_exception(), or a template's own bug
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PosttrainError(
            f"the chat template rejects this conversation: {reason}",
            file=label,
            line=row,
            fix="fix the row's turns, drop the system turn (system_prompt:) if the template has none, "
            "or choose another template with `chat_template:`",
        ) from None


def render_prompt(tokenizer: Any, prompt: Any, label: str, row: int) -> str:
    """A prompt as the model sees it before it answers: a conversation through the template with
    the assistant header, a text prompt as it is."""
    if isinstance(prompt, str):
        return prompt
    return render_chat(tokenizer, prompt, label, row, add_generation_prompt=True)
