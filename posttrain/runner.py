"""Turn a validated recipe into a plan of stages, then run it: cache, resume, evaluate, record.

The plan orders stages by their references (`model: sft` runs after `sft`) and gives each
a fingerprint: the hash of its config and of what it reads (upstream completion ids, data
file contents). A stage whose fingerprint matches a COMPLETE stage is skipped; one whose
RUNNING marker matches resumes from its last checkpoint; anything else starts fresh.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from posttrain import artifacts, cards, cpu
from posttrain.architecture import root_slot
from posttrain.context import StageContext
from posttrain.distributed import launch_info, on_main, state
from posttrain.errors import PosttrainError
from posttrain.evaluation import check_gate, eval_hash, evaluate_model
from posttrain.integrity import CHEAP_HASH, verify_stage
from posttrain.lock import RunLock
from posttrain.recipe import (
    FileData,
    PathModel,
    Recipe,
    StageBase,
    references,
    stage_dependencies,
)
from posttrain.report import write_report
from posttrain.stages import stage_module

# --------------------------------------------------------------------------- plan


@dataclasses.dataclass(frozen=True)
class PlannedStage:
    stage: StageBase
    deps: list[str]
    status: str  # "cached" | "run" | "resume" | "waits" (an upstream stage runs first)
    fingerprint: str | None  # None while an upstream stage has still to run


def order_stages(recipe: Recipe) -> list[StageBase]:
    """Stages in an order where every stage comes after those it reads; recipe order otherwise."""
    deps = {s.name: stage_dependencies(recipe, s) for s in recipe.stages}
    ordered: list[StageBase] = []
    state: dict[str, str] = {}

    def visit(stage: StageBase, trail: list[str]) -> None:
        if state.get(stage.name) == "done":
            return
        if state.get(stage.name) == "visiting":
            cycle = " -> ".join([*trail[trail.index(stage.name) :], stage.name])
            index = recipe.stage_names().index(stage.name)
            raise recipe.error(("stages", index), f"stages depend on each other in a cycle: {cycle}")
        state[stage.name] = "visiting"
        for dep in deps[stage.name]:
            visit(recipe.stage(dep), [*trail, stage.name])
        state[stage.name] = "done"
        ordered.append(stage)

    for stage in recipe.stages:
        visit(stage, [])
    return ordered


def fingerprint_config(recipe: Recipe, stage: StageBase) -> dict[str, Any]:
    """Everything about a stage's own config that changes its result: its part of the fingerprint
    (the rest is what it reads from upstream stages)."""
    files = {}
    for _, value in references(stage):
        if value not in recipe.stage_names() and Path(value).exists():
            files[str(value)] = artifacts.path_fingerprint(Path(value))
    for block in _file_data(stage):
        if Path(block.path).exists():
            files[block.path] = artifacts.path_fingerprint(Path(block.path))
    return {
        "stage": stage.model_dump(mode="json", exclude={"gate"}),  # a gate never retrains
        "seed": recipe.seed,
        "base_model": recipe.base_model.model_dump(mode="json"),
        "files": files,
    }


def _file_data(value: Any) -> list[FileData]:
    if isinstance(value, FileData):
        return [value]
    if isinstance(value, StageBase) or hasattr(value, "model_fields"):
        return [b for f in type(value).model_fields for b in _file_data(getattr(value, f))]
    if isinstance(value, list | tuple):
        return [b for item in value for b in _file_data(item)]
    return []


def fingerprint(recipe: Recipe, stage: StageBase, upstream: Mapping[str, dict]) -> str:
    inputs = {name: upstream[name]["completion_id"] for name in stage_dependencies(recipe, stage)}
    return artifacts.canonical_hash({"config": fingerprint_config(recipe, stage), "inputs": inputs})


def stage_status(
    recipe: Recipe,
    stage: StageBase,
    finished: Mapping[str, dict],
    force: tuple[str, ...],
    hash_limit: int | None = CHEAP_HASH,
) -> tuple[str, str, dict | None]:
    """("cached", fp, manifest) for a finished stage of this fingerprint whose files still match its
    manifest, ("rebuild", fp, None) for one whose files do not, else ("resume" | "run", fp, None)."""
    fp = fingerprint(recipe, stage, finished)
    stage_dir = recipe.run_dir / stage.name
    forced = stage.name in force
    manifest = artifacts.completed_manifest(stage_dir)
    if manifest and manifest.get("fingerprint") == fp and not forced:
        intact = damage(stage_dir, stage, hash_limit) is None
        return ("cached", fp, manifest) if intact else ("rebuild", fp, None)
    running = artifacts.read_json(stage_dir / artifacts.RUNNING)
    resumable = running is not None and running.get("fingerprint") == fp and not forced
    return ("resume" if resumable else "run"), fp, None


def damage(stage_dir: Path, stage: StageBase, hash_limit: int | None = CHEAP_HASH) -> str | None:
    """What is wrong with a finished stage's files, in one line (None when they match its manifest):
    a stage is reused only when it is intact, so nothing downstream starts on a damaged input."""
    problems = verify_stage(stage_dir, stage, hash_limit)
    if not problems:
        return None
    return problems[0] + (
        f" (+{len(problems) - 1} more: `posttrain verify` lists them)" if len(problems) > 1 else ""
    )


def make_plan(recipe: Recipe, force: tuple[str, ...] = ()) -> list[PlannedStage]:
    """The stages in run order, each with what `posttrain run` would do to it now."""
    for name in force:
        recipe.stage(name)  # unknown names fail here, with a did-you-mean
    plan: list[PlannedStage] = []
    finished: dict[str, dict] = {}
    for stage in order_stages(recipe):
        deps = stage_dependencies(recipe, stage)
        if any(d not in finished for d in deps):
            plan.append(PlannedStage(stage, deps, "waits", None))
            continue
        status, fp, manifest = stage_status(recipe, stage, finished, force)
        if manifest is not None:
            finished[stage.name] = manifest
        plan.append(PlannedStage(stage, deps, status, fp))
    return plan


# --------------------------------------------------------------------------- run

Reporter = Callable[[str, str, dict], None]  # (stage name, event, details)


def run(
    recipe: Recipe,
    *,
    force: tuple[str, ...] = (),
    only: str | None = None,
    report: Reporter | None = None,
    verify_hashes: bool = False,
) -> dict[str, dict]:
    """Run the recipe; returns each stage's metrics. Each stage is skipped, resumed or run fresh.

    The main process holds the run directory's lock throughout (a second run is refused; a lock
    left by a killed run is taken over and said so). A finished stage is reused when its files
    match its manifest: sizes and safetensors headers always, sha256 of files up to CHEAP_HASH
    (of every listed file with `verify_hashes`); otherwise it is rebuilt."""
    report = _main_only(report or (lambda name, event, details: None))
    for name in (*force, *([only] if only else [])):
        recipe.stage(name)
    lock = RunLock(recipe.run_dir)
    previous = on_main(lock.acquire)
    if previous is not None:
        report(recipe.name, "lock", {"dir": str(recipe.run_dir), "holder": str(previous)})
    try:
        return _run_stages(recipe, force, only, report, None if verify_hashes else CHEAP_HASH)
    finally:
        if state().is_main_process:
            lock.release()


def _run_stages(
    recipe: Recipe, force: tuple[str, ...], only: str | None, report: Reporter, hash_limit: int | None
) -> dict[str, dict]:
    """The loop of `run`. Under `accelerate launch` every rank runs it and trains together; the
    main process alone decides what is cached, writes the run directory and evaluates, and every
    decision reaches the other ranks through `on_main` (which doubles as the barrier after each
    stage)."""
    needed = _upstream_of(recipe, only) if only else set()
    on_main(_write_resolved, recipe)
    finished: dict[str, dict] = {}
    results: dict[str, dict] = {}
    ordered = order_stages(recipe)
    for index, stage in enumerate(ordered, 1):
        position = {"index": index, "total": len(ordered)}
        stage_dir = recipe.run_dir / stage.name
        if only is not None and stage.name != only:
            manifest = on_main(artifacts.completed_manifest, stage_dir)
            if manifest is None and stage.name in needed:
                raise PosttrainError(
                    f"--only {only} needs stage '{stage.name}' to be complete first",
                    fix=f"run without --only, or with --only {stage.name} first",
                )
            if manifest is not None and stage.name in needed:
                _require_intact(only, stage, stage_dir, hash_limit)
            if manifest is not None:
                finished[stage.name] = manifest
            continue
        status, fp, manifest = on_main(stage_status, recipe, stage, finished, force, hash_limit)
        if manifest is not None:
            finished[stage.name] = manifest
            metrics = on_main(_cached_metrics, stage_dir)
            results[stage.name] = _refresh_eval(recipe, stage, stage_dir, finished, metrics, report)
            report(stage.name, "cached", {"dir": str(stage_dir), **position})
            _after_stage(recipe, stage, results[stage.name])
            continue
        if status == "rebuild":
            report(stage.name, "rebuild", {"why": on_main(damage, stage_dir, stage, hash_limit)})
        resume = on_main(artifacts.start_stage, stage_dir, fp, fresh=status != "resume")
        ctx = _context(recipe, stage, stage_dir, finished, resume)
        event = "resume" if resume else "start"
        report(stage.name, event, {"kind": stage.kind, "dir": str(stage_dir), **position})
        started = time.time()
        cpu.reset_record()
        try:
            metrics = stage_module(stage).run(stage, ctx)
            require_training(stage, metrics)
            metrics = _with_eval(recipe, stage_dir, ctx, metrics)  # every rank generates a share
        except PosttrainError as e:
            e.key = e.key or f"stages.{stage.name}"
            raise
        wall = time.time() - started
        on_main(cards.write_cards, recipe.run_dir, stage.name, metrics, fp)
        manifest = _manifest(recipe, stage, fp, finished, wall)
        finished[stage.name] = on_main(
            artifacts.finish_stage, stage_dir, manifest, {**metrics, "wall_time_s": round(wall, 2)}
        )
        results[stage.name] = metrics
        report(stage.name, "done", {"kind": stage.kind, "wall_time_s": wall, "metrics": metrics})
        _push(recipe, stage, report)
        _after_stage(recipe, stage, metrics)
    return results


def _require_intact(only: str, stage: StageBase, stage_dir: Path, hash_limit: int | None) -> None:
    """`--only` never starts on a finished input stage whose files are damaged."""
    why = on_main(damage, stage_dir, stage, hash_limit)
    if why is not None:
        raise PosttrainError(
            f"--only {only} reads stage '{stage.name}', whose files are damaged: {why}",
            fix=f"run without --only (it rebuilds '{stage.name}'), or with --only {stage.name} first",
        )


def require_training(stage: StageBase, metrics: dict[str, Any]) -> None:
    """A trainer stage that took no optimisation step produced nothing worth marking COMPLETE
    (`num_train_epochs` at or below 0, or no rows left to batch)."""
    for where, steps in _train_steps(metrics):
        if steps == 0:
            raise PosttrainError(
                f"trained 0 steps{where}: the model is untrained",
                key=f"stages.{stage.name}.train",
                fix="set num_train_epochs > 0 or max_steps > 0, and check that the data has rows",
            )


def _train_steps(metrics: dict[str, Any], where: str = "") -> list[tuple[str, int]]:
    """(`' (student x)'`, steps) of every `train` block in a stage's metrics (distill nests them)."""
    found = []
    train = metrics.get("train")
    if isinstance(train, dict) and isinstance(train.get("steps"), int):
        found.append((where, train["steps"]))
    for name, value in (metrics.get("students") or {}).items():
        if isinstance(value, dict):
            found += _train_steps(value, f" (student {name})")
    return found


def _main_only(report: Reporter) -> Reporter:
    """Progress is printed once, by the main process."""
    return report if state().is_main_process else (lambda name, event, details: None)


def _cached_metrics(stage_dir: Path) -> dict:
    """A finished stage's metrics, after dropping what a kill right after its COMPLETE left behind."""
    artifacts.drop_leftovers(stage_dir)
    return artifacts.read_json(stage_dir / artifacts.METRICS) or {}


def _push(recipe: Recipe, stage: StageBase, report: Reporter) -> None:
    """`train: {push_to_hub: true}`: upload the finished model/ (merged, with its card) to the Hub."""
    from posttrain.export import hub_settings, push_stage

    settings = hub_settings(stage)
    if settings is not None:
        urls = on_main(push_stage, recipe.run_dir, stage.name, settings, recipe.name)
        report(stage.name, "pushed", {"urls": urls})


def _after_stage(recipe: Recipe, stage: StageBase, metrics: dict) -> None:
    """Rewrite the run report (main process), then stop here if the stage misses its gate.

    Every rank checks the gate on the same metrics (broadcast by `on_main`), so all stop together."""
    on_main(write_report, recipe.run_dir)
    check_gate(recipe, stage, metrics)


def _upstream_of(recipe: Recipe, name: str) -> set[str]:
    seen: set[str] = set()
    todo = list(stage_dependencies(recipe, recipe.stage(name)))
    while todo:
        dep = todo.pop()
        if dep not in seen:
            seen.add(dep)
            todo.extend(stage_dependencies(recipe, recipe.stage(dep)))
    return seen


def _context(recipe: Recipe, stage: StageBase, stage_dir: Path, finished: dict, resume: bool) -> StageContext:
    return StageContext(
        stage=stage.name,
        out_dir=stage_dir,
        run_dir=recipe.run_dir,
        seed=recipe.seed,
        base_model=recipe.base_model,
        stage_dirs={name: recipe.run_dir / name for name in finished},
        resume=resume,
        eval=recipe.eval,
    )


def _with_eval(recipe: Recipe, stage_dir: Path, ctx: StageContext, metrics: dict) -> dict:
    """Evaluate the stage's model on the recipe's held-out data, when both exist."""
    if (
        recipe.eval is None
        or not (stage_dir / artifacts.MODEL).is_dir()
        or not recipe.stage(ctx.stage).generative
    ):
        return metrics
    result = evaluate_model(PathModel(path=str(stage_dir / artifacts.MODEL)), recipe.eval, ctx)
    return {**metrics, "eval": result}


def _refresh_eval(
    recipe: Recipe, stage: StageBase, stage_dir: Path, finished: dict, metrics: dict, report: Reporter
) -> dict:
    """A cached stage whose recipe `eval:` changed is re-evaluated (on every rank), not re-trained."""
    manifest = finished[stage.name]
    if manifest.get("eval_hash") == eval_hash(recipe.eval) or not (stage_dir / artifacts.MODEL).is_dir():
        return metrics
    report(stage.name, "re-evaluate", {})
    ctx = _context(recipe, stage, stage_dir, finished, False)
    metrics = {k: v for k, v in metrics.items() if k != "eval"}
    metrics = _with_eval(recipe, stage_dir, ctx, metrics)
    on_main(_record_eval, recipe, stage, stage_dir, manifest, metrics)
    return metrics


def _record_eval(recipe: Recipe, stage: StageBase, stage_dir: Path, manifest: dict, metrics: dict) -> None:
    """Rank 0 writes a cached stage's new evaluation into its files."""
    artifacts.write_json(stage_dir / artifacts.METRICS, metrics)
    cards.write_cards(recipe.run_dir, stage.name, metrics, manifest.get("fingerprint"))  # the new eval
    manifest = {**manifest, "eval_hash": eval_hash(recipe.eval), "files": artifacts.list_files(stage_dir)}
    artifacts.write_json(stage_dir / artifacts.MANIFEST, manifest)


def _manifest(recipe: Recipe, stage: StageBase, fp: str, finished: dict, wall: float) -> dict[str, Any]:
    deps = stage_dependencies(recipe, stage)
    return {
        "stage": stage.name,
        "kind": stage.kind,
        "fingerprint": fp,
        "config_hash": artifacts.canonical_hash(fingerprint_config(recipe, stage)),
        "config": stage.model_dump(mode="json"),
        # How the model it starts from loads (at the root of its chain of stages): dtype,
        # attention, quantisation, config overrides, ...
        "model_loading": root_slot(recipe, stage.starting_model()).load_options(),
        "inputs": {
            d: {"path": str(recipe.run_dir / d), "completion_id": finished[d]["completion_id"]} for d in deps
        },
        "eval_hash": eval_hash(recipe.eval),
        "versions": artifacts.package_versions(),
        "git_commit": artifacts.git_commit(Path(recipe.source.file).resolve().parent),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_time_s": round(wall, 2),
        "cpu_threads": cpu.threads_used(),  # torch's thread counts on a CPU (posttrain.cpu); [] on GPU
        **launch_info(),
    }


def _write_resolved(recipe: Recipe) -> None:

    text = yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
    try:
        recipe.run_dir.mkdir(parents=True, exist_ok=True)
        artifacts.write_atomic(recipe.run_dir / artifacts.RESOLVED_RECIPE, text)
    except OSError as e:
        raise recipe.error(
            ("output_dir",),
            f"cannot write the run directory {recipe.run_dir}: {e.strerror}",
            "pick a writable folder",
        ) from None
