"""The columns a `data:` spec will have, found without loading it: for checks at recipe load.

Cheap sources only: a synthetic task (one generated row), the first lines of a local JSONL
file, a JSON list of records, a CSV header, a Parquet schema. Anything else (folders, hub
datasets, another stage's output) answers None: "not known until the
stage loads it", and the loader checks it then.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from posttrain.data_tools.arithmetic import arithmetic_rows
from posttrain.recipe import DataReference, FileData, MixtureData, SyntheticData, template_fields

PEEK_LINES = 100  # JSONL lines read (a column missing from the first row may appear later)
PEEK_JSON_BYTES = 64 * 1024 * 1024  # a JSON list bigger than this is not read at recipe-load time


def peek_columns(spec: Any) -> list[str] | None:
    """The canonical column names the spec's rows will have (after `template:` and `columns:`),
    or None if unknown."""
    if isinstance(spec, SyntheticData):
        options = spec.model_dump(include={"split", "digits", "min_digits", "ops", "cot"})
        return list(arithmetic_rows(1, **options)[0])
    if isinstance(spec, MixtureData):
        sources = [peek_columns(source.data) for source in spec.mix]
        if any(columns is None for columns in sources):
            return None
        return [c for c in sources[0] if all(c in other for other in sources[1:])]
    if isinstance(spec, DataReference | str) or not isinstance(spec, FileData):
        return None
    columns = file_columns(Path(spec.path).expanduser())
    if columns is None:
        return None
    if spec.template:
        columns = [*columns, "prompt"]
    renamed = {source: canonical for canonical, source in spec.columns.items()}
    mapped = [renamed.get(c, c) for c in columns if c in renamed or c not in spec.columns]
    return [c for c in mapped if c != "system"]  # a system column becomes a turn of the prompt


def file_columns(path: Path) -> list[str] | None:
    """The columns of a local data file, or None when unknown (a folder's files may differ)."""
    if not path.is_file():
        return None
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            keys: dict[str, None] = {}
            with path.open(encoding="utf-8") as f:
                for _, line in zip(range(PEEK_LINES), f, strict=False):
                    row = json.loads(line) if line.strip() else {}
                    keys |= dict.fromkeys(row if isinstance(row, dict) else [])
            return list(keys) or None
        if suffix == ".json" and path.stat().st_size <= PEEK_JSON_BYTES:
            rows = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
                return list(dict.fromkeys(k for r in rows for k in r))
        if suffix == ".csv":
            with path.open(encoding="utf-8", newline="") as f:
                return next(csv.reader(f), None)
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(path).names)
    except (OSError, ValueError, UnicodeDecodeError):
        return None  # unreadable here: the loader will say why when the stage runs
    return None


def check_file_columns(spec: FileData) -> tuple[str, str, str] | None:
    """(key, message, fix) when a local file lacks a column that `columns:` or `template:` names.

    A path that does not exist here is left to the stage that loads it (a recipe may be
    validated on one machine for a run on another, whose disks hold the data); so are hub ids."""
    columns = file_columns(Path(spec.path).expanduser())
    if columns is None:
        return None
    have = ", ".join(columns)
    for canonical, source in spec.columns.items():
        if source not in columns:
            return (
                "columns",
                f"{spec.path} has no column '{source}' (for {canonical}); it has: {have}",
                "write `columns:` as {canonical: column in the file}",
            )
    for name in template_fields(spec.template) if spec.template else []:
        if name not in columns:
            return "template", f"{spec.path} has no column '{name}'; it has: {have}", "fix `template:`"
    return None
