"""What a person sees while posttrain works: one console on stderr, and progress bars.

Every line goes through `console`, so lines printed while a bar is live land above it instead
of tearing it. rich allows one live display at a time, so `progress` bars nest: an inner bar
(the batches of one `generate`) is a second row of the outer one (the prompts of a labelling
stage), not a second display. Bars show on the main process of a launch only, and only on a
terminal: a log file gets the finished lines, not a thousand redraws.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

console = Console(stderr=True, highlight=False)

_live: Progress | None = None
_depth = 0
_lock = threading.Lock()


def is_main_process() -> bool:
    """Rank 0 of an `accelerate launch` (or a plain run), read from the environment accelerate sets."""
    return os.environ.get("RANK", "0") == "0"


@contextmanager
def progress(description: str | None, total: int | None) -> Iterator[Callable[[int], None]]:
    """A bar for `total` items of work; yields `advance(n)`. Silent without a description, off the
    terminal and on other ranks."""
    if description is None or total == 0 or not (console.is_terminal and is_main_process()):
        yield lambda n=1: None
        return
    bars = _enter()
    task = bars.add_task(description, total=total)
    try:
        yield lambda n=1: bars.advance(task, n)
    finally:
        bars.remove_task(task)
        _leave()


def _enter() -> Progress:
    global _live, _depth
    with _lock:
        if _live is None:
            _live = Progress(
                TextColumn("  {task.description}"),
                BarColumn(bar_width=30),
                MofNCompleteColumn(),
                TimeRemainingColumn(elapsed_when_finished=True),
                console=console,
                transient=True,
            )
            _live.start()
        _depth += 1
        return _live


def _leave() -> None:
    global _live, _depth
    with _lock:
        _depth -= 1
        if _depth == 0 and _live is not None:
            _live.stop()
            _live = None


def metric_line(values: dict[str, Any], shown: tuple[tuple[str, str, str], ...]) -> str:
    """`label value` pairs for the keys of `shown` ((key, label, format)) that `values` holds."""
    parts = []
    for key, label, fmt in shown:
        value = values.get(key)
        if isinstance(value, int | float):
            parts.append(f"{label} [bold]{value:{fmt}}[/]")
    return "  ".join(parts)
