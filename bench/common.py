"""What the trainer benchmarks share: a tiny model on disk, timing, medians, and a table."""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # recipes name this folder's rewards by import path

CPU_ARGS = {"use_cpu": True, "bf16": False, "report_to": "none", "save_strategy": "no", "disable_tqdm": True}


def tiny_model(folder: Path, preset: str = "tiny-deepseek-v3") -> Path:
    from posttrain.models import materialize_preset

    return materialize_preset(preset, 0, folder / preset)


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


def machine() -> str:
    import platform

    import torch

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    print(f"\n{title}  ({machine()})")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)))
