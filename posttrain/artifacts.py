"""The run directory: atomic files, content hashes, manifests and the COMPLETE marker.

    runs/<name>/<stage>/  model/  data/  metrics.json  manifest.json  COMPLETE

(the names are the constants below: every module uses them, none spells them again).

A stage is done only when COMPLETE exists; it is written last, atomically, after the
manifest, so a crash at any moment leaves either a finished stage or an unfinished one,
never a stage that looks finished with files missing. RUNNING marks a stage in progress
with the fingerprint it was started with, so a re-run can tell "resume" from "start over".
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterable, Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from posttrain.errors import PosttrainError

# The run directory's names, used by every module that reads or writes it (nowhere spelled twice).
RESOLVED_RECIPE = "recipe.resolved.yaml"  # the recipe as run: defaults and --set overrides filled in
REPORT = "report.md"
PRESETS = "presets"  # <run>/presets/<preset>-seed<seed>/: materialised tiny models
CACHE = "cache"  # <run>/cache/judges/<judge id>.jsonl: judge verdicts, shared by stages and re-runs
JUDGE_CACHE = "judges"
LOCK = "run.lock"  # held by the live run (posttrain/lock.py)
# A stage's folder, <run>/<stage>/:
COMPLETE = "COMPLETE"
MANIFEST = "manifest.json"
METRICS = "metrics.json"
RUNNING = "RUNNING"
MODEL = "model"  # the stage's model (a distill student's: <stage>/<student>/model/)
MODEL_PARTIAL = "model.partial"  # model/ while it is being written
MODEL_CONFIG = "config.json"  # inside a model folder: transformers' config
DATA = "data"  # datasets a stage writes for the next ones (JSONL)
CHECKPOINTS = "checkpoints"  # trainer checkpoints, deleted once the stage is COMPLETE
LOGS = "logs"  # TensorBoard event files
DATA_REPORT = "data_report.json"  # what dedup / decontamination removed from each data slot
SAMPLES = "samples.jsonl"  # RL completions with their rewards; a distill teacher's scored samples
EVAL_SAMPLES = "eval_samples.jsonl"  # every held-out prompt with its completions
MOE_HEATMAP = "moe_expert_load.png"  # share of routed tokens per expert and layer
HARNESS_RESULTS = "harness_results.json"  # lm-eval's whole output
# Written by one stage kind:
PREFERENCES = f"{DATA}/preferences.jsonl"  # rlaif_label: the kept preference pairs
CANDIDATES = "candidates.jsonl"  # rlaif_label: the policy's answers, judged on resume too
LABEL_METRICS = "label_metrics.json"  # rlaif_label: its metrics, for the other ranks
TRACES = f"{DATA}/traces.jsonl"  # distill: the kept teacher traces
TEACHER = "teacher"  # distill: <stage>/teacher/, the teacher's description
STUDENT_INIT = "init"  # distill: <stage>/<student>/init/, a dense student's random init
DESCRIPTION = "description.json"  # distill: a model's size, accuracy and speed
PHASE_MARKER = "train_{phase}.json"  # distill: a student's finished training phase
LARGE_FILE = 256 * 1024 * 1024  # past this, a file is fingerprinted by size and mtime, not content
HASHED_FILE = 64 * 1024 * 1024  # a finished stage's files up to this size are listed with their sha256
# Left out of a finished stage's file list: the markers, the checkpoints (deleted right after
# COMPLETE), and what re-evaluating a cached stage rewrites (metrics, eval samples).
UNLISTED = {COMPLETE, MANIFEST, METRICS, RUNNING, CHECKPOINTS, EVAL_SAMPLES}


def write_atomic(path: Path, text: str) -> None:
    """Write `text` so that readers see the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    """The parsed file, or None when it is missing or unreadable (a torn file from an old crash)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def canonical_hash(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def path_fingerprint(path: Path) -> str:
    """Content hash of a file (or every file under a folder); size+mtime for very large files."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        stat = f.stat()
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        if stat.st_size > LARGE_FILE:
            h.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
            continue
        _feed(h, f)
    return h.hexdigest()[:16]


def _feed(h: Any, path: Path) -> None:
    """Stream a file's bytes into hash `h`, a megabyte at a time."""
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def completed_manifest(stage_dir: Path) -> dict | None:
    """The manifest of a finished stage, or None when the stage is not COMPLETE."""
    marker = read_json(stage_dir / COMPLETE)
    manifest = read_json(stage_dir / MANIFEST)
    if marker is None or manifest is None or marker.get("completion_id") != manifest.get("completion_id"):
        return None
    return manifest


def invalidate(stage_dir: Path) -> None:
    """Un-finish a stage before touching any of its files (COMPLETE goes first)."""
    (stage_dir / COMPLETE).unlink(missing_ok=True)


def start_stage(stage_dir: Path, fingerprint: str, fresh: bool = False) -> bool:
    """Prepare `stage_dir` for a run; True when an interrupted run of the same config can resume.

    Anything else in the folder (an older config's run, a forced re-run) is deleted first, but
    only from a folder posttrain's markers identify as a stage (`require_stage_dir`)."""
    require_stage_dir(stage_dir)
    invalidate(stage_dir)
    running = read_json(stage_dir / RUNNING)
    resume = not fresh and running is not None and running.get("fingerprint") == fingerprint
    if not resume and stage_dir.exists():
        shutil.rmtree(stage_dir)
    write_json(stage_dir / RUNNING, {"fingerprint": fingerprint, "pid": os.getpid()})
    return resume


def require_stage_dir(stage_dir: Path) -> None:
    """Refuse to touch a folder that holds files but none of posttrain's stage markers: it is
    someone's own folder (their data, say), and starting the stage would delete it."""
    if not stage_dir.is_dir() or is_stage_dir(stage_dir) or not any(stage_dir.iterdir()):
        return
    raise PosttrainError(
        f"{stage_dir} exists and was not written by posttrain (it has no {RUNNING}, {COMPLETE} or "
        f"{MANIFEST} of a stage); refusing to delete it",
        fix="move your files out of it, or set output_dir to another folder",
    )


def is_stage_dir(stage_dir: Path) -> bool:
    """A folder posttrain made for a stage: its RUNNING marker, its COMPLETE marker, or a stage
    manifest (which outlives COMPLETE when a re-run is cut short right after un-finishing it)."""
    markers = {RUNNING: "fingerprint", COMPLETE: "completion_id", MANIFEST: "completion_id"}
    return any(
        isinstance(found := read_json(stage_dir / name), dict) and key in found
        for name, key in markers.items()
    )


def finish_stage(stage_dir: Path, manifest: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """Write metrics and manifest (with the stage's file list), then COMPLETE, then drop the
    leftovers."""
    manifest = {**manifest, "completion_id": uuid.uuid4().hex, "files": list_files(stage_dir)}
    write_json(stage_dir / METRICS, metrics)
    write_json(stage_dir / MANIFEST, manifest)
    write_json(stage_dir / COMPLETE, {"completion_id": manifest["completion_id"]})
    drop_leftovers(stage_dir)
    return manifest


def drop_leftovers(stage_dir: Path) -> None:
    """Remove what only an unfinished stage needs. Also called on cached stages: a kill right
    after COMPLETE leaves the RUNNING marker and checkpoints behind."""
    (stage_dir / RUNNING).unlink(missing_ok=True)
    shutil.rmtree(stage_dir / CHECKPOINTS, ignore_errors=True)


def list_files(stage_dir: Path) -> list[dict[str, Any]]:
    """Every file of a finished stage but the `UNLISTED` ones: path, size, and the sha256 of
    files up to HASHED_FILE (larger ones by size only), so `posttrain verify` can tell a run
    directory that lost or changed a file since its stage finished."""
    listed = []
    for path in sorted(stage_dir.rglob("*")):
        rel = path.relative_to(stage_dir)
        if rel.parts[0] in UNLISTED or path.name.endswith(".tmp") or not path.is_file():
            continue
        size = path.stat().st_size
        listed.append(
            {
                "path": rel.as_posix(),
                "size": size,
                "sha256": file_sha256(path) if size <= HASHED_FILE else None,
            }
        )
    return listed


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    _feed(h, path)
    return h.hexdigest()


def package_versions() -> dict[str, str]:

    names = ["posttrain", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "deepspeed"]
    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def git_commit(cwd: Path | None = None) -> str | None:
    """The commit of the checkout the recipe lives in, when there is one (with -dirty if modified)."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


# --------------------------------------------------------------------------- append-only JSONL


def append_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append rows to a JSONL file so that a SIGKILL at any moment loses at most a torn last line.

    A torn line left by an earlier crash is cut off first, so new rows never glue onto it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as f:
        _cut_torn_tail(f, path)
        f.write(b"".join(json.dumps(row, ensure_ascii=False, default=str).encode() + b"\n" for row in rows))
        f.flush()
        os.fsync(f.fileno())


def _cut_torn_tail(f: Any, path: Path) -> None:
    size = os.path.getsize(path)
    if size == 0:
        return
    with open(path, "rb") as r:
        r.seek(size - 1)
        if r.read(1) == b"\n":
            return
        r.seek(0)
        keep = r.read().rfind(b"\n") + 1
    f.truncate(keep)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file; a missing file is empty and a torn or corrupt line is skipped
    (a last line without its newline is torn even when it parses: `append_jsonl` cuts it off)."""
    return list(iter_jsonl(path))


def iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """`read_jsonl` one row at a time, for files too large to hold (distillation traces)."""
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed by the with below; a missing file is empty)
    except FileNotFoundError:
        return
    with f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(row, dict):
                yield row


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows as a JSONL file atomically (a temp file, then one rename); returns their number."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    count = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            count += 1
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return count
