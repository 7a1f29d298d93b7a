"""The recipe's JSON schema, for editors: `posttrain schema`, and `recipes/recipe.schema.json`,
which the shipped recipes name in their first line (`# yaml-language-server: $schema=...`) so
that VS Code, Neovim and other YAML language servers complete and check keys as you type.

The schema says what pydantic checks by shape: keys, types, ranges, stage kinds. What needs
code (a reward's options, a trl `train:` key, a file on disk) is checked by `posttrain validate`.
"""

from __future__ import annotations

from typing import Any

from posttrain.recipe.schema import Recipe

SCHEMA_FILE = "recipe.schema.json"  # in recipes/, beside the recipes that name it


def recipe_schema() -> dict[str, Any]:
    schema = _known_only(Recipe.model_json_schema())
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "posttrain recipe",
        **{k: v for k, v in schema.items() if k != "title"},
    }


def _known_only(node: Any) -> Any:
    """Drop the catch-all `{}` member of tagged unions: it exists so that an unknown `kind:` gets a
    did-you-mean from pydantic, but in a JSON schema it matches anything and makes every `oneOf`
    ambiguous, so editors would flag valid stages."""
    if isinstance(node, dict):
        return {k: [m for m in map(_known_only, v) if m != {}] if k == "oneOf" else _known_only(v)
                for k, v in node.items()}  # fmt: skip
    if isinstance(node, list):
        return [_known_only(item) for item in node]
    return node
