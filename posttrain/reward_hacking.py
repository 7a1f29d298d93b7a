"""The reward-hacking guard of RL stages that mix a learned reward with verifiable ones.

A reward model or a judge can be gamed: the policy finds answers it scores highly that are not
better (the demo's RM at weight 0.1 took held-out accuracy from 0.448 to 0.006). The sign is
two curves pulling apart: the learned reward's weighted mean keeps rising while the verifiable
rewards' weighted mean falls. `HackingGuard` reads both from every logged step
(`rewards/<label>/mean`, as trl logs them) and, when over the last `steps` logged steps the
learned curve trends up and the verifiable one down (each curve's correlation with the step at
least TREND in size), warns or stops as the stage's `guard:` says. A stop ends training
cleanly: the model of that step is saved, the stage completes, and metrics.json (`guard`) and
the report say why, with the step and both curves.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import TrainerCallback

from posttrain.errors import warn

TREND = 0.6  # |correlation with the step| of each curve over the window (pure noise: p < 0.04 each)


class HackingGuard(TrainerCallback):
    """Watches the learned and the verifiable part of the reward at every log."""

    def __init__(
        self,
        stage: str,
        learned: dict[str, float],
        verifiable: dict[str, float],
        steps: int,
        action: str = "warn",
    ) -> None:
        self.stage = stage
        self.learned = learned  # reward label -> weight
        self.verifiable = verifiable
        self.steps = steps
        self.action = action
        self.curves: dict[str, list[tuple[int, float]]] = {"learned": [], "verifiable": []}
        self.tripped: dict[str, Any] | None = None  # what metrics.json keeps of a warning or stop

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        learned, verifiable = part(logs, self.learned), part(logs, self.verifiable)
        if learned is None or verifiable is None:
            return control
        self.curves["learned"].append((state.global_step, learned))
        self.curves["verifiable"].append((state.global_step, verifiable))
        if self.tripped is None and pulling_apart(self.curves, self.steps):
            self.tripped = self._record(state.global_step)
            warn(f"stages.{self.stage}: {self.tripped['reason']}")
            if self.action == "stop":
                control.should_training_stop = True
                control.should_save = False
        return control

    def _record(self, step: int) -> dict[str, Any]:
        window = {name: curve[-self.steps :] for name, curve in self.curves.items()}
        learned, verifiable = window["learned"], window["verifiable"]
        reason = (
            f"possible reward hacking at step {step}: the learned reward ({', '.join(self.learned)}) rose "
            f"{learned[0][1]:.3f} → {learned[-1][1]:.3f} while the verifiable rewards "
            f"({', '.join(self.verifiable)}) fell {verifiable[0][1]:.3f} → {verifiable[-1][1]:.3f} over "
            f"{self.steps} logged steps"
            + ("; training stopped and this step's model saved" if self.action == "stop" else "")
        )
        return {"action": self.action, "step": step, "reason": reason, "learned": list(self.learned),
                "verifiable": list(self.verifiable)}  # fmt: skip

    def summary(self) -> dict[str, Any]:
        """metrics.json's `guard`: whether it tripped, and both curves (step, weighted mean) in full."""
        return {
            **(self.tripped or {"action": None}),
            "curves": {k: [list(p) for p in v] for k, v in self.curves.items()},
        }


def part(logs: dict[str, Any], weights: dict[str, float]) -> float | None:
    """The weighted sum of these rewards' logged means; None unless every one was logged."""
    values = [logs.get(f"rewards/{label}/mean") for label in weights]
    if any(not isinstance(v, int | float) or not math.isfinite(v) for v in values):
        return None
    return sum(w * v for w, v in zip(weights.values(), values, strict=True))


def pulling_apart(curves: dict[str, list[tuple[int, float]]], steps: int) -> bool:
    """Over the last `steps` logged points, the learned curve trends up and the verifiable down."""
    if len(curves["learned"]) < steps:
        return False
    up = trend([v for _, v in curves["learned"][-steps:]])
    down = trend([v for _, v in curves["verifiable"][-steps:]])
    return up >= TREND and down <= -TREND


def trend(values: list[float]) -> float:
    """Pearson correlation of the values with their index: +1 a steady rise, -1 a steady fall."""
    n = len(values)
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    cov = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    var_x = sum((i - mean_x) ** 2 for i in range(n))
    var_y = sum((v - mean_y) ** 2 for v in values)
    return 0.0 if var_y == 0 else cov / math.sqrt(var_x * var_y)
