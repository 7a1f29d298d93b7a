"""Recipe YAML with line numbers: `read_yaml` parses a file into plain data plus a map from
each key path to its file and line (YAML 1.2 floats, duplicate keys rejected), `apply_override`
applies a `--set a.b.c=value` and records it as such, and `SourceMap` turns a key path into a
PosttrainError that names the file, line and key. Nothing here knows the schema."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

from posttrain.errors import PosttrainError, did_you_mean


@dataclasses.dataclass(frozen=True)
class SourceMap:
    """Where each key of the recipe came from: its file and line, or `--set` for overrides."""

    file: str
    lines: dict[tuple, tuple[str, int | None]]
    data: Any = None

    def locate(self, path: tuple) -> tuple[str, int | None]:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return (self.file, None)

    def display(self, path: tuple) -> str:
        """`stages.sft.train.lr` rather than `stages.0.train.lr`: the spelling `--set` takes."""
        parts: list[str] = []
        node = self.data
        for part in path:
            if isinstance(node, list) and isinstance(part, int) and part < len(node):
                item = node[part]
                parts.append(
                    item["name"]
                    if isinstance(item, dict) and isinstance(item.get("name"), str)
                    else str(part)
                )
                node = item
            else:
                parts.append(str(part))
                node = node.get(part) if isinstance(node, dict) else None
        return ".".join(parts)

    def error(self, path: tuple, message: str, fix: str | None = None) -> PosttrainError:
        file, line = self.locate(path)
        return PosttrainError(message, file=file, line=line, key=self.display(path) or None, fix=fix)


class RecipeLoader(yaml.SafeLoader):
    """SafeLoader that reads `1e-3` as a float (YAML 1.2), not the string YAML 1.1 makes of it."""


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_value(text: str) -> Any:
    """A `--set` value: YAML (numbers, lists, mappings), or the text itself."""
    try:
        return yaml.load(text, Loader=RecipeLoader) if text.strip() else text
    except yaml.YAMLError:
        return text


def _yaml_lines(node: yaml.Node, file: str, path: tuple, out: dict) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                raise PosttrainError(f"duplicate key '{key}'", file=file, line=key_node.start_mark.line + 1)
            seen.add(key)
            out[(*path, key)] = (file, key_node.start_mark.line + 1)
            _yaml_lines(value_node, file, (*path, key), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[(*path, i)] = (file, item.start_mark.line + 1)
            _yaml_lines(item, file, (*path, i), out)


def read_yaml(path: str | Path) -> tuple[Any, dict]:
    """Parse a YAML file into plain data plus a map from key path to (file, line)."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PosttrainError("no such file", file=file, fix="check the path") from None
    except (IsADirectoryError, UnicodeDecodeError) as e:
        raise PosttrainError(f"cannot read: {e.__class__.__name__}", file=file) from None
    loader = None
    try:
        loader = RecipeLoader(text)  # the reader rejects control characters already here
        node = loader.get_single_node()
        lines: dict = {}
        if node is not None:
            _yaml_lines(node, file, (), lines)
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        problem = e.problem or e.context
        tab = "\\t" in str(problem) or "tab character" in str(problem)
        fix = "indent with spaces: YAML does not allow tabs" if tab else None
        raise PosttrainError(f"invalid YAML: {problem}", file=file, line=line, fix=fix) from None
    except yaml.YAMLError as e:
        raise PosttrainError(f"invalid YAML: {' '.join(str(e).split())}", file=file) from None
    finally:
        if loader is not None:
            loader.dispose()
    return data, lines


def apply_override(data: dict, assignment: str, lines: dict) -> None:
    """Apply one `--set a.b.c=value`; list items (stages) are addressed by name or index."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise PosttrainError(
            f"--set '{assignment}': expected KEY=VALUE, e.g. stages.sft.train.learning_rate=1e-4"
        )
    value = parse_value(raw)
    node: Any = data
    path: tuple = ()
    parts = key.split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            names = [item.get("name") for item in node if isinstance(item, dict)]
            index = names.index(part) if part in names else (int(part) if part.isdigit() else None)
            if index is None or index >= len(node):
                hint = (
                    did_you_mean(part, [n for n in names if n])
                    or f"use a stage name: {', '.join(map(str, names))}"
                )
                raise PosttrainError(f"--set {key}: no item '{part}' under '{'.'.join(parts[:i])}'", fix=hint)
            part = index
        elif not isinstance(node, dict):
            raise PosttrainError(f"--set {key}: '{'.'.join(parts[:i])}' is not a mapping")
        path = (*path, part)
        if last:
            node[part] = value
            lines[path] = ("--set", None)
        else:
            if isinstance(node, dict) and not isinstance(node.get(part), dict | list):
                node[part] = {}
            node = node[part]
