"""What the benchmarks share: a tiny model on disk, timing, interleaved repeats, ratios, a table,
and posttrain as it was at an older commit, so that one bench run can time before against after.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# posttrain's thread count follows the free cores (posttrain.cpu); plain trl would take torch's
# default, so the benches pin one thread for every variant (set OMP_NUM_THREADS to choose another).
os.environ.setdefault("OMP_NUM_THREADS", "1")
BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))  # recipes name this folder's rewards by import path

CPU_ARGS = {"use_cpu": True, "bf16": False, "report_to": "none", "save_strategy": "no", "disable_tqdm": True}
BASELINE = "f25f7a2"  # the commit the figures in bench/README.md call "before"


def tiny_model(folder: Path, preset: str = "tiny-deepseek-v3") -> Path:
    from posttrain.models import materialize_preset

    return materialize_preset(preset, 0, folder / preset)


def load_recipe(path: Path) -> Any:
    """The recipe at `path` through whichever posttrain is imported: posttrain.loading.load since the
    layering refactor, posttrain.recipe.load_recipe at an older `--baseline` commit."""
    import posttrain

    if (Path(posttrain.__file__).parent / "loading.py").exists():
        from posttrain.loading import load

        return load(path)
    from posttrain.recipe import load_recipe as load_old

    return load_old(path)


def timed(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """fn's own figures plus `wall_s`, the whole call (model load and save included)."""
    started = time.perf_counter()
    figures = fn()
    return {**figures, "wall_s": time.perf_counter() - started}


def alternate(runs: dict[str, Callable[[], dict[str, Any]]], repeats: int) -> dict[str, list[dict[str, Any]]]:
    """Run each variant `repeats` times, interleaved (A B A B ...), so drift hits all alike."""
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            results[name].append(timed(fn))
    return results


def median(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def paired_ratio(rows: list[dict[str, Any]], base: list[dict[str, Any]], key: str) -> float:
    """Median over repeats of row[i][key] / base[i][key]: each ratio pairs runs of the same round, so
    a machine that slows down for a while (other jobs on a shared box) moves both sides of it."""
    return statistics.median(r[key] / b[key] for r, b in zip(rows, base, strict=True))


def machine() -> str:
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    print(f"\n{title}  ({machine()})")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)))


# --------------------------------------------------------------------------- clocks


class TrainClock:
    """Wall and CPU seconds of every `Trainer.train` call in this process (patched in, bench only).

    CPU time (`time.process_time`: this process, all its threads) moves far less than wall time
    when other jobs share the cores, so the benches report it beside the wall figure."""

    def __init__(self) -> None:
        from transformers import Trainer

        self.calls: list[dict[str, float]] = []
        original = Trainer.train
        clock = self

        def train(trainer: Any, *args: Any, **kwargs: Any) -> Any:
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return original(trainer, *args, **kwargs)
            finally:
                clock.calls.append({"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu})

        Trainer.train = train

    def last(self) -> dict[str, float]:
        return self.calls[-1]


# --------------------------------------------------------------------------- before / after


def baseline_tree(commit: str, folder: Path) -> Path:
    """posttrain as it was at `commit`, importable with `PYTHONPATH=<returned path>`: the sources from
    `git archive`, laid out as pyproject's package-dir mapping installs them (rewards/, data_tools/
    and recipes/ inside posttrain/). A PYTHONPATH entry wins over the editable install's finder."""
    root = folder / f"posttrain-{commit}"
    if (root / "posttrain" / "__init__.py").exists():
        return root
    src = folder / f"src-{commit}"
    src.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", commit, "posttrain", "rewards", "data_tools", "recipes"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    shutil.copytree(src / "posttrain", root / "posttrain")
    for sub in ("rewards", "data_tools", "recipes"):
        shutil.copytree(src / sub, root / "posttrain" / sub)
    return root


def in_subprocess(script: Path, args: list[str], pythonpath: Path | None = None) -> dict[str, Any]:
    """Run `script args...` in a fresh interpreter and return the JSON object on its last stdout line.

    Each run of a variant gets its own process: nothing (a started worker pool, a warm cache, an
    imported older posttrain) leaks from one variant into the next."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), str(BENCH), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, str(script), *args], env=env, capture_output=True, text=True, check=False
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def old_modules(
    commit: str, paths: list[str], package: str, folder: Path, replace: dict[str, str] | None = None
) -> str:
    """Files of posttrain at `commit` (e.g. "rewards/accuracy.py") as the package `package` in
    `folder` (put on sys.path), their imports of each other pointed at that package and each
    `replace` key replaced by its value, so that a bench can run the old code path beside the new
    one in one process. Returns the package name."""
    names = {Path(p).stem for p in paths}
    root = folder / package
    root.mkdir(parents=True, exist_ok=True)
    (root / "__init__.py").write_text("")
    for path in paths:
        text = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{commit}:{path}"], check=True, capture_output=True, text=True
        ).stdout
        for name in names:
            text = text.replace(f"posttrain.rewards.{name}", f"{package}.{name}")
        for old, new in (replace or {}).items():
            text = text.replace(old, new)
        (root / Path(path).name).write_text(text)
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return package
