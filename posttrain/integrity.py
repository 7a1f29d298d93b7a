"""Does a stage folder still hold what it held when it finished? The checks behind `posttrain
verify` and behind the runner's decision to reuse a finished stage.

A stage marked COMPLETE must still hold every file its manifest lists (same size, same sha256
for files that are not huge), a metrics.json that parses, a loadable model/ where its kind
writes one, and JSONL files whose every line parses. Files written incrementally (judge caches,
`samples.jsonl` of an unfinished stage) may end in a torn line, as a SIGKILL leaves it: every
reader skips that line and the next append cuts it off (artifacts.iter_jsonl, judges/cache.py).
Any other unparsable line is corruption. Nothing here loads torch or a model.

`posttrain verify` hashes every listed file. Before reusing a finished stage, `posttrain run`
hashes (and parses, for JSONL) only the files up to `CHEAP_HASH`: sizes, safetensors headers and
torn tails catch truncation and loss of any file at once, and content changes in the small
files (configs, tokenizer, metrics, data); `run --verify-hashes` hashes everything listed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from posttrain import artifacts
from posttrain.recipe import StageBase

CHEAP_HASH = 32 * 1024 * 1024  # files up to this size are hashed before a finished stage is reused


def verify_stage(stage_dir: Path, stage: StageBase | None = None, hash_limit: int | None = None) -> list[str]:
    """The problems of one stage folder. A COMPLETE stage is checked in full (files larger than
    `hash_limit`, when given, by size and structure only); an unfinished one only for corrupted
    JSONL (a torn last line is allowed: the resumed stage cuts it off)."""
    if not stage_dir.is_dir():
        return []
    complete = (stage_dir / artifacts.COMPLETE).exists()
    problems = []
    for path in sorted(stage_dir.rglob("*.jsonl")):
        rel = path.relative_to(stage_dir)
        if rel.parts[0] != artifacts.CHECKPOINTS and not path.name.startswith("."):
            parse = hash_limit is None or path.stat().st_size <= hash_limit
            problems += [f"{rel.as_posix()}: {p}" for p in jsonl_problems(path, not complete, parse)]
    if not complete:
        return problems
    manifest = artifacts.completed_manifest(stage_dir)
    if manifest is None:
        return [*problems, "COMPLETE, but manifest.json is missing, torn or from another completion"]
    if not isinstance(artifacts.read_json(stage_dir / artifacts.METRICS), dict):
        problems.append("COMPLETE, but metrics.json is missing or does not parse")
    problems += listed_file_problems(stage_dir, manifest.get("files", []), hash_limit)
    for folder in model_folders(stage_dir, stage):
        problems += [f"{folder}/: {p}" for p in model_problems(stage_dir / folder)]
    return problems


def listed_file_problems(
    stage_dir: Path, files: list[dict[str, Any]], hash_limit: int | None = None
) -> list[str]:
    """Files of the manifest's list that are gone, or whose size or sha256 changed (the sha256 of
    files up to `hash_limit` only, when given)."""
    problems = []
    for entry in files:
        path = stage_dir / entry["path"]
        if not path.is_file():
            problems.append(f"{entry['path']}: listed in the manifest, but missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(
                f"{entry['path']}: {path.stat().st_size} bytes, the manifest says {entry['size']}"
            )
        elif (
            entry.get("sha256")
            and (hash_limit is None or entry["size"] <= hash_limit)
            and artifacts.file_sha256(path) != entry["sha256"]
        ):
            problems.append(f"{entry['path']}: content changed since the stage finished (sha256 differs)")
    return problems


def model_folders(stage_dir: Path, stage: StageBase | None) -> list[str]:
    """The model folders a stage must have (trainer stages: model/; distill: <student>/model/),
    and any other model/ it wrote."""
    owners = stage.saved_models() if stage is not None else []
    expected = [f"{owner}/{artifacts.MODEL}" if owner else artifacts.MODEL for owner in owners]
    found = [
        p.relative_to(stage_dir).as_posix()
        for p in stage_dir.rglob(artifacts.MODEL)
        if p.is_dir() and artifacts.CHECKPOINTS not in p.relative_to(stage_dir).parts
    ]
    return list(dict.fromkeys([*expected, *sorted(found)]))


def model_problems(folder: Path) -> list[str]:
    """Why `folder` would not load with from_pretrained: no config, or missing or truncated weights."""
    if not folder.is_dir():
        return ["missing"]
    configs = [folder / n for n in (artifacts.MODEL_CONFIG, "adapter_config.json") if (folder / n).exists()]
    if not configs:
        return ["no config.json (nor adapter_config.json)"]
    problems = [f"{c.name} does not parse" for c in configs if artifacts.read_json(c) is None]
    weights = sorted(folder.glob("*.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = set((artifacts.read_json(index) or {}).get("weight_map", {}).values())
        problems += [f"{s}: in the index, but missing" for s in sorted(shards) if not (folder / s).exists()]
    if not weights and not (folder / "pytorch_model.bin").exists():
        problems.append("no weights (*.safetensors)")
    problems += [f"{w.name}: {why}" for w in weights if (why := safetensors_problem(w))]
    return problems


def safetensors_problem(path: Path) -> str | None:
    """None when the header parses and its tensors cover the file exactly (not truncated)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            f.keys()
    except (SafetensorError, OSError) as e:
        return f"unreadable ({e})"
    return None


def jsonl_problems(path: Path, torn_ok: bool, parse: bool = True) -> list[str]:
    """Lines that do not parse as JSON; a last line without its newline is a problem unless
    `torn_ok` (an append-only file a kill interrupted: readers skip it, the next append cuts it).
    Without `parse`, only the end of the file is read (is it torn?)."""
    if not parse:
        size = path.stat().st_size
        with open(path, "rb") as f:
            f.seek(max(size - 1, 0))
            torn = size > 0 and f.read(1) != b"\n"
        return ["the last line is torn (no newline at the end of the file)"] if torn and not torn_ok else []
    bad, torn, number = [], False, 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                torn = True
                break
            try:
                json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                bad.append(number)
    problems = [f"line {bad[0]} is not JSON ({len(bad)} such line(s)): corrupted"] if bad else []
    if torn and not torn_ok:
        problems.append(f"line {number} is torn (no newline at the end of the file)")
    return problems
