"""Turn a recipe's `data:` block into a `datasets.Dataset` with canonical column names.

Sources: a local JSONL / JSON (a list of records) / Parquet / CSV file, a folder of such files,
a hub dataset id with `name` (config) and `split` (datasets' own loader), a synthetic task,
another stage's `data/` folder, or a mixture of these. Then, in this order:

1. `template:` renders `prompt` from source columns; `columns:` renames source columns to the
   canonical ones (`messages`, `prompt`, `completion`, `answer`, `chosen`, `rejected`,
   `system`), written `{canonical: source}`;
2. text prompts become chat turns (`as_chat`), ShareGPT conversations become role/content;
3. `dedup:` and `decontaminate:` remove rows (recorded in the DataReport), then `n` keeps
   the first n rows;
4. the row's `system` column or `system_prompt:` becomes a system turn;
5. `curriculum:` orders the rows.

    data: {path: data/gsm8k.jsonl, columns: {prompt: question}, dedup: true, decontaminate: true}
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from posttrain import artifacts
from posttrain.data_tools.arithmetic import arithmetic_rows
from posttrain.data_tools.chat import add_system, apply_template, as_conversation
from posttrain.data_tools.curriculum import apply_curriculum
from posttrain.data_tools.file_checks import TEXT_SUFFIXES, check_text_file, json_problem
from posttrain.data_tools.hygiene import DataReport, decontaminate, deduplicate
from posttrain.data_tools.mixture import concatenate, mix
from posttrain.data_tools.shapes import check_shapes
from posttrain.errors import PosttrainError
from posttrain.recipe import DataReference, FileData, MixtureData, RowOptions, SyntheticData

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_rows(
    spec: Any, seed: int = 0, stage_dirs: Mapping[str, Path] | None = None, report: DataReport | None = None
) -> Any:
    """The rows a `data:` spec names (a Dataset), prepared as the module docstring says."""
    stage_dirs = stage_dirs or {}
    report = DataReport() if report is None else report
    if isinstance(spec, DataReference | str):
        if spec in stage_dirs:
            return _stage_rows(str(spec), stage_dirs[spec] / artifacts.DATA)
        spec = FileData(path=str(spec))
    label = describe(spec)

    def load(inner: Any) -> Any:
        return load_rows(inner, seed, stage_dirs, report)

    def clean(datasets: list[Any]) -> list[Any]:
        return clean_rows(datasets, spec, load, report, label)

    if isinstance(spec, MixtureData):
        dataset = mix(spec, seed, load, clean, report, label)
    else:
        dataset = clean([_source_rows(spec, seed)])[0]
    if isinstance(spec, FileData) and spec.n is not None:
        dataset = dataset.select(range(min(spec.n, len(dataset))))
    dataset = add_system(dataset, spec.system_prompt)
    if spec.curriculum is not None:
        dataset = apply_curriculum(dataset, spec.curriculum, seed, label)
    return dataset


def describe(spec: Any) -> str:
    """A short name for a data spec, used in errors and the data report."""
    if isinstance(spec, SyntheticData):
        return f"synthetic:{spec.synthetic}:{spec.split}"
    if isinstance(spec, MixtureData):
        return "mix(" + ", ".join(describe(s.data) for s in spec.mix) + ")"
    if isinstance(spec, FileData):
        return spec.path + (f":{spec.split}" if spec.split else "")
    return str(spec)


def _source_rows(spec: SyntheticData | FileData, seed: int) -> Any:
    from datasets import Dataset

    if isinstance(spec, SyntheticData):
        options = spec.model_dump(include={"n", "split", "digits", "min_digits", "ops", "cot"})
        return Dataset.from_list(arithmetic_rows(**options, seed=seed if spec.seed is None else spec.seed))
    dataset = _file_rows(spec)
    if spec.template:
        dataset = apply_template(dataset, spec.template, spec.path)
    if spec.columns:
        dataset = _map_columns(dataset, spec.columns, spec.path)
    dataset = as_conversation(dataset) if spec.as_chat else dataset
    check_shapes(dataset, spec.path)
    return dataset


def clean_rows(
    datasets: list[Any], spec: RowOptions, load: Callable[[Any], Any], report: DataReport, label: str
) -> list[Any]:
    """Dedup and decontaminate `datasets` together (duplicates across sources count too)."""
    if spec.dedup is None and spec.decontaminate is None:
        return datasets
    pooled = len(datasets) > 1
    tagged = [d.add_column("__source", [i] * len(d)) for i, d in enumerate(datasets)] if pooled else []
    pool = concatenate(tagged, label) if pooled else datasets[0]
    if spec.dedup is not None:
        pool = deduplicate(pool, spec.dedup, report, label)
    if spec.decontaminate is not None:
        eval_sets = [load(against) for against in spec.decontaminate.against]
        pool = decontaminate(pool, eval_sets, spec.decontaminate, report, label)
    if not pooled:
        return [pool]
    return [
        pool.filter(lambda s, i=i: s == i, input_columns="__source").remove_columns("__source")
        for i in range(len(datasets))
    ]


def _stage_rows(stage: str, data_dir: Path) -> Any:
    files = sorted(data_dir.glob("*.jsonl"))
    if not files:
        raise PosttrainError(
            f"stage '{stage}' wrote no data files in {data_dir}", fix="that stage produces no dataset"
        )
    return _load("json", [str(f) for f in files], None, "train")


def _local_files(path: Path) -> list[Path]:
    """The data files a local path names (one file, or every data file under a folder)."""
    if path.is_file():
        if path.suffix.lower() not in BUILDERS:
            raise PosttrainError(f"{path}: unsupported file type", fix=f"use one of {', '.join(BUILDERS)}")
        return [path]
    files = [f for f in sorted(path.rglob("*")) if f.suffix.lower() in BUILDERS]
    if not files:
        raise PosttrainError(f"{path}: no {', '.join(BUILDERS)} files in this folder")
    builders = {BUILDERS[f.suffix.lower()] for f in files}
    if len(builders) > 1:
        raise PosttrainError(f"{path}: mixes file types ({', '.join(sorted(builders))})", fix="keep one type")
    return files


def _looks_local(spec: FileData) -> bool:
    path = Path(spec.path).expanduser()
    return (
        path.exists()
        or spec.path.startswith((".", "/", "~"))
        or path.suffix.lower() in BUILDERS
        or spec.path.count("/") > 1
    )


def _file_rows(spec: FileData) -> Any:
    path = Path(spec.path).expanduser()
    if path.exists():
        files = _local_files(path)
        for file in files:
            if file.suffix.lower() in TEXT_SUFFIXES:
                check_text_file(file)
        return _load(BUILDERS[files[0].suffix.lower()], [str(f) for f in files], spec.path, spec.split)
    if _looks_local(spec):
        raise PosttrainError(
            f"{spec.path}: no such file or folder", fix="check the path (relative to where you run)"
        )
    return _hub_rows(spec)


def _load(builder: str, files: list[str], label: str | None, split: str | None) -> Any:
    from datasets import load_dataset

    try:
        with _datasets_errors_unlogged():
            return load_dataset(builder, data_files=files, split=split or "train")
    except Exception as e:  # datasets raises many types for malformed files
        for file in files if builder == "json" else []:
            if (problem := json_problem(Path(file))) is not None:
                raise problem from None
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PosttrainError(f"{label or files[0]}: cannot read as {builder}: {reason}") from None


@contextlib.contextmanager
def _datasets_errors_unlogged() -> Iterator[None]:
    """datasets logs a malformed file's traceback before it raises; the error we raise instead
    names the file and line, so its log would only be noise above that line."""
    datasets_logger = logging.getLogger("datasets")
    level = datasets_logger.level
    datasets_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        datasets_logger.setLevel(level)


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
