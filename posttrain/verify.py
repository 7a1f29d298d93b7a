"""Check that a run directory is complete and valid: what `posttrain verify` prints.

A stage marked COMPLETE must still hold every file its manifest lists (same size, same sha256
for files that are not huge), a metrics.json that parses, a loadable model/ where its kind
writes one, and JSONL files whose every line parses. Files written incrementally (judge caches,
`samples.jsonl` of an unfinished stage) may end in a torn line, as a SIGKILL leaves it: every
reader skips that line and the next append cuts it off (artifacts.iter_jsonl, judges/cache.py).
Any other unparsable line is corruption. Nothing here loads torch or a model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from posttrain import artifacts
from posttrain.recipe import Recipe, StageBase
from posttrain.runner import make_plan

NOT_DONE = {
    "run": "not complete: never run, or its config or inputs changed since",
    "resume": "not complete: interrupted, `posttrain run` resumes it",
    "waits": "not complete: a stage it reads is not complete",
}


def verify_run(recipe: Recipe) -> list[str]:
    """Every problem of the recipe's run directory, one line each; [] when every stage is
    complete (cached for this recipe) and every file checks out."""
    run_dir = recipe.run_dir
    problems = []
    for planned in make_plan(recipe):
        name = planned.stage.name
        if planned.status != "cached":
            problems.append(f"{name}: {NOT_DONE[planned.status]}")
        problems += [f"{name}: {p}" for p in verify_stage(run_dir / name, planned.stage)]
    for path in sorted((run_dir / artifacts.CACHE).rglob("*.jsonl")):
        problems += [f"{path.relative_to(run_dir)}: {p}" for p in jsonl_problems(path, torn_ok=True)]
    for folder in sorted((run_dir / artifacts.PRESETS).glob("*")):
        if folder.is_dir() and not folder.name.endswith(".partial"):
            problems += [f"presets/{folder.name}: {p}" for p in model_problems(folder)]
    return problems


def verify_stage(stage_dir: Path, stage: StageBase | None = None) -> list[str]:
    """The problems of one stage folder. A COMPLETE stage is checked in full; an unfinished one
    only for corrupted JSONL (a torn last line is allowed: the resumed stage cuts it off)."""
    if not stage_dir.is_dir():
        return []
    complete = (stage_dir / artifacts.COMPLETE).exists()
    problems = []
    for path in sorted(stage_dir.rglob("*.jsonl")):
        rel = path.relative_to(stage_dir)
        if rel.parts[0] != artifacts.CHECKPOINTS and not path.name.startswith("."):
            problems += [f"{rel.as_posix()}: {p}" for p in jsonl_problems(path, torn_ok=not complete)]
    if not complete:
        return problems
    manifest = artifacts.completed_manifest(stage_dir)
    if manifest is None:
        return [*problems, "COMPLETE, but manifest.json is missing, torn or from another completion"]
    if not isinstance(artifacts.read_json(stage_dir / artifacts.METRICS), dict):
        problems.append("COMPLETE, but metrics.json is missing or does not parse")
    problems += listed_file_problems(stage_dir, manifest.get("files", []))
    for folder in model_folders(stage_dir, stage):
        problems += [f"{folder}/: {p}" for p in model_problems(stage_dir / folder)]
    return problems


def listed_file_problems(stage_dir: Path, files: list[dict[str, Any]]) -> list[str]:
    """Files of the manifest's list that are gone, or whose size or sha256 changed."""
    problems = []
    for entry in files:
        path = stage_dir / entry["path"]
        if not path.is_file():
            problems.append(f"{entry['path']}: listed in the manifest, but missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(
                f"{entry['path']}: {path.stat().st_size} bytes, the manifest says {entry['size']}"
            )
        elif entry.get("sha256") and artifacts.file_sha256(path) != entry["sha256"]:
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


def jsonl_problems(path: Path, torn_ok: bool) -> list[str]:
    """Lines that do not parse as JSON; a last line without its newline is a problem unless
    `torn_ok` (an append-only file a kill interrupted: readers skip it, the next append cuts it)."""
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
