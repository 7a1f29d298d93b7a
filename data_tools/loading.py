"""Turn a recipe's `data:` block into a `datasets.Dataset` with canonical column names.

Sources: a local JSONL / JSON / Parquet / CSV file, a folder of such files, a hub dataset
id (datasets' own loader), a synthetic task, or another stage's `data/` folder. `columns:`
maps canonical names (`messages`, `prompt`, `answer`, ...) to the source's own columns.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from posttrain.errors import PosttrainError
from posttrain.recipe import DataReference, FileData, SyntheticData

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_rows(spec: Any, seed: int = 0, stage_dirs: Mapping[str, Path] | None = None) -> Any:
    """The rows a `data:` spec names (a Dataset), with `columns:` applied and `n` kept."""
    from datasets import Dataset

    stage_dirs = stage_dirs or {}
    if isinstance(spec, DataReference | str):
        if spec in stage_dirs:
            return _stage_rows(str(spec), stage_dirs[spec] / "data")
        spec = FileData(path=str(spec))
    if isinstance(spec, SyntheticData):
        from posttrain.data_tools.arithmetic import arithmetic_rows

        options = spec.model_dump(exclude={"synthetic", "seed"})
        return Dataset.from_list(arithmetic_rows(**options, seed=seed if spec.seed is None else spec.seed))
    dataset = _file_rows(spec)
    if spec.columns:
        dataset = _map_columns(dataset, spec.columns, spec.path)
    if spec.n is not None:
        dataset = dataset.select(range(min(spec.n, len(dataset))))
    return dataset


def _stage_rows(stage: str, data_dir: Path) -> Any:
    files = sorted(data_dir.glob("*.jsonl"))
    if not files:
        raise PosttrainError(
            f"stage '{stage}' wrote no data files in {data_dir}", fix="that stage produces no dataset"
        )
    return _load("json", [str(f) for f in files], None)


def _file_rows(spec: FileData) -> Any:
    path = Path(spec.path).expanduser()
    if path.is_file():
        builder = BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise PosttrainError(f"{path}: unsupported file type", fix=f"use one of {', '.join(BUILDERS)}")
        return _load(builder, [str(path)], spec.path)
    if path.is_dir():
        files = [f for f in sorted(path.rglob("*")) if f.suffix.lower() in BUILDERS]
        if not files:
            raise PosttrainError(f"{path}: no {', '.join(BUILDERS)} files in this folder")
        builders = {BUILDERS[f.suffix.lower()] for f in files}
        if len(builders) > 1:
            raise PosttrainError(
                f"{path}: mixes file types ({', '.join(sorted(builders))})", fix="keep one type"
            )
        return _load(builders.pop(), [str(f) for f in files], spec.path)
    if spec.path.startswith((".", "/", "~")) or path.suffix.lower() in BUILDERS or spec.path.count("/") > 1:
        raise PosttrainError(
            f"{spec.path}: no such file or folder", fix="check the path (relative to where you run)"
        )
    return _hub_rows(spec)


def _load(builder: str, files: list[str], label: str | None) -> Any:
    from datasets import load_dataset

    try:
        return load_dataset(builder, data_files=files, split="train")
    except Exception as e:  # datasets raises many types for malformed files
        raise PosttrainError(
            f"{label or files[0]}: cannot read as {builder}: {str(e).splitlines()[0]}"
        ) from None


def _hub_rows(spec: FileData) -> Any:
    from datasets import load_dataset

    try:
        return load_dataset(spec.path, spec.name, split=spec.split or "train")
    except Exception as e:  # offline, unknown id, unknown split: all surface as one line
        raise PosttrainError(f"cannot load hub dataset '{spec.path}': {str(e).splitlines()[0]}") from None


def _map_columns(dataset: Any, columns: Mapping[str, str], label: str) -> Any:
    missing = [source for source in columns.values() if source not in dataset.column_names]
    if missing:
        raise PosttrainError(
            f"{label}: no column '{missing[0]}'; the data has: {', '.join(dataset.column_names)}",
            fix="fix `columns:` ({canonical: column in the file})",
        )
    renames = {source: canonical for canonical, source in columns.items() if source != canonical}
    clashes = [c for c in renames.values() if c in dataset.column_names and c not in renames]
    if clashes:
        dataset = dataset.remove_columns(clashes)
    return dataset.rename_columns(renames) if renames else dataset


def require_columns(dataset: Any, needed: Iterable[str], what: str, label: str = "data") -> None:
    """Fail with the columns the data really has when `what` needs others."""
    missing = [c for c in needed if c not in dataset.column_names]
    if missing:
        raise PosttrainError(
            f"{label}: {what} needs column '{missing[0]}', but the data has: {', '.join(dataset.column_names)}",
            fix=f"map it with `columns: {{{missing[0]}: <your column>}}`",
        )
