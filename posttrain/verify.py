"""Check that a run directory is complete and valid: what `posttrain verify` prints.

Every stage of the recipe must be complete for it (cached), and every stage folder, judge cache
and materialised preset must pass the checks of posttrain/integrity.py, with every listed
file's sha256 compared. Nothing here loads torch or a model.
"""

from __future__ import annotations

from posttrain import artifacts
from posttrain.integrity import jsonl_problems, model_problems, verify_stage
from posttrain.lock import live_holder
from posttrain.recipe import Recipe
from posttrain.runner import make_plan

__all__ = ["NOT_DONE", "verify_run", "verify_stage"]

NOT_DONE = {
    "run": "not complete: never run, or its config or inputs changed since",
    "resume": "not complete: interrupted, `posttrain run` resumes it",
    "waits": "not complete: a stage it reads is not complete",
    "rebuild": "finished, but its files no longer match its manifest: `posttrain run` rebuilds it",
}


def verify_run(recipe: Recipe) -> list[str]:
    """Every problem of the recipe's run directory, one line each; [] when every stage is
    complete (cached for this recipe) and every file checks out."""
    run_dir = recipe.run_dir
    holder = live_holder(run_dir)
    problems = [f"{run_dir}: a run is live ({holder}); its stages are still being written"] if holder else []
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
