"""One compact console line per logging step, in place of the Trainer's raw metric dicts.

transformers prints every log as a dict (about 30 `moe/layer_N/...` keys on an MoE, wrapping
over several lines). The full dicts still go to TensorBoard and the stage's metrics; the console
gets the few numbers that say whether this stage kind is working, which each stage module
names (its `CONSOLE` tuple of (key, label, format)), and a step bar on a terminal:

      sft  step   40/235  loss 1.2345  lr 2.9e-03                    0:12 elapsed, ~1:10 left
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from typing import Any

from transformers import PrinterCallback, ProgressCallback, TrainerCallback

from posttrain.console import console, metric_line, progress

Shown = tuple[tuple[str, str, str], ...]  # (log key, label, format spec)


class StepLog(TrainerCallback):
    """Prints `shown` metrics of each training log (and of each evaluation, `eval_<key>`)."""

    def __init__(self, label: str, shown: Shown) -> None:
        self.label = label
        self.shown = shown
        self._bar = ExitStack()
        self._advance: Any = None
        self._seen = 0
        self._started = 0.0
        self._first_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._started, self._seen, self._first_step = time.time(), state.global_step, state.global_step
        if state.is_world_process_zero:
            self._advance = self._bar.enter_context(progress(f"{self.label} steps", state.max_steps))
            self._advance(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self._advance is not None:
            self._advance(state.global_step - self._seen)
        self._seen = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "train_runtime" in logs:
            return
        evaluation = any(k.startswith("eval_") for k in logs)
        if evaluation:
            values = {k.removeprefix("eval_"): v for k, v in logs.items()}
            shown = (("loss", "loss", ".4f"), *(s for s in self.shown if s[0] != "loss"))
            where = "eval".rjust(5 + 2 * len(str(state.max_steps)))
        else:
            values, shown = logs, self.shown
            width = len(str(state.max_steps))
            where = f"step {state.global_step:>{width}}/{state.max_steps}"
        line = metric_line(values, shown)
        console.print(f"  [dim]{self.label}[/]  {where}  {line}  [dim]{self._timing(state)}[/]")

    def _timing(self, state: Any) -> str:
        elapsed = time.time() - self._started
        done = state.global_step - self._first_step
        if done <= 0 or state.max_steps <= state.global_step:
            return clock(elapsed)
        left = elapsed / done * (state.max_steps - state.global_step)
        return f"{clock(elapsed)} elapsed, ~{clock(left)} left"

    def close(self) -> None:
        """End the step bar (also when training raised, which skips on_train_end)."""
        self._bar.close()
        self._advance = None

    def on_train_end(self, args, state, control, **kwargs):
        self.close()


def clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def use_step_log(trainer: Any, log: StepLog) -> None:
    """Swap the Trainer's own console callbacks (a tqdm bar that writes raw dicts, or a dict printer) for `log`."""
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(log)
