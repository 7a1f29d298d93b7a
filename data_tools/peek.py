"""The columns a `data:` spec will have, found without loading it: for checks at recipe load.

Cheap sources only: a synthetic task (one generated row), the first line of a local JSONL
file, the header of a CSV, the schema of a Parquet file. Anything else (hub datasets,
another stage's output, folders) answers None: "not known until the stage loads it".
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from posttrain.recipe import DataReference, FileData, SyntheticData


def peek_columns(spec: Any) -> list[str] | None:
    """The canonical column names the spec's rows will have (after `columns:`), or None if unknown."""
    if isinstance(spec, SyntheticData):
        from posttrain.data_tools.arithmetic import arithmetic_rows

        options = spec.model_dump(exclude={"synthetic", "seed", "n"})
        return list(arithmetic_rows(1, **options)[0])
    if isinstance(spec, DataReference | str) or not isinstance(spec, FileData):
        return None
    columns = _file_columns(Path(spec.path).expanduser())
    if columns is None:
        return None
    renamed = {source: canonical for canonical, source in spec.columns.items()}
    return [renamed.get(c, c) for c in columns if c in renamed or c not in spec.columns]


def _file_columns(path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                first = next((line for line in f if line.strip()), None)
            row = json.loads(first) if first else None
            return list(row) if isinstance(row, dict) else None
        if suffix == ".csv":
            with path.open(encoding="utf-8", newline="") as f:
                return next(csv.reader(f), None)
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(path).names)
    except (OSError, ValueError, UnicodeDecodeError):
        return None  # unreadable here: the loader will say why when the stage runs
    return None
