"""Trainer callbacks that keep a long run from wasting hours or losing work.

- `GracefulStop`: the first Ctrl-C (SIGINT) saves a checkpoint at the end of the current step
  and stops; the stage stays unfinished, so `posttrain run` again resumes from there. A second
  Ctrl-C stops at once. Under several processes, the ranks agree on the step to stop at.
- `TrainingGuard`: a NaN/inf loss or gradient norm, or an RL reward that gives no signal
  (every group scored alike) for N logged steps, stops the stage with one clear line or warns,
  as the stage's `guard:` block says.
- `RewardGuard`: an RL reward that scores nothing at all (every completion None, or an error)
  for `NO_SCORE_LOGS` logged steps in a row always stops the stage, naming the reward and its
  last error: trl leaves None out of the advantage, so such a reward trains nothing while the
  run looks healthy.
- `CpuThreads`: on a CPU, torch's thread count follows the cores no other process is busy on
  (posttrain.cpu), looked at every `CPU_CHECK_S` seconds: a job that starts on the other core
  mid-stage would otherwise stall every op of a two-thread run, up to 17x.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from typing import Any

from transformers import TrainerCallback

from posttrain.cpu import CoreWatch, follow_free_cores
from posttrain.errors import PosttrainError, warn

NO_SCORE_LOGS = 3  # logged steps in a row in which a reward scored no completion at all
CPU_CHECK_S = 10.0  # seconds between two looks at the free cores


class Interrupted(KeyboardInterrupt):
    """Training stopped on request after saving a checkpoint; the stage resumes on the next run."""


class GracefulStop(TrainerCallback):
    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True

    def on_step_end(self, args, state, control, **kwargs):
        if _any_rank(self.requested):
            self.requested = True
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.requested:
            self._restore()
            raise Interrupted(
                f"stopped at step {state.global_step} after saving a checkpoint; run again to resume"
            )

    def on_train_end(self, args, state, control, **kwargs):
        self._restore()

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def _any_rank(flag: bool) -> bool:
    """True when any process saw the signal, so every rank stops at the same step."""
    return _reduce([flag], every=False)[0]


def _reduce(flags: list[bool], every: bool) -> list[bool]:
    """Each flag combined over the processes: true on every rank (`every`) or on any rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flags
    import torch

    values = torch.tensor([1.0 if f else 0.0 for f in flags])
    if dist.get_backend() == "nccl":
        values = values.cuda()
    dist.all_reduce(values, op=dist.ReduceOp.MIN if every else dist.ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]


class TrainingGuard(TrainerCallback):
    """Watches every log: NaN/inf loss or grad norm; GRPO rewards without signal."""

    def __init__(
        self,
        stage: str,
        nan: str = "stop",
        constant_reward_steps: int | None = None,
        constant_reward: str = "warn",
    ):
        self.stage = stage
        self.nan = nan
        self.constant_reward_steps = constant_reward_steps
        self.constant_reward = constant_reward
        self.flat_logs = 0
        self.warned: set[str] = set()

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        for key in ("loss", "grad_norm"):
            value = logs.get(key)
            if isinstance(value, int | float) and not math.isfinite(value):
                self._act(
                    self.nan,
                    key,
                    f"{key} became {value} at step {state.global_step}",
                    "lower the learning rate, clip gradients (max_grad_norm), or use bf16 instead of fp16",
                    control,
                )
        if self.constant_reward_steps and "frac_reward_zero_std" in logs:
            self.flat_logs = self.flat_logs + 1 if logs["frac_reward_zero_std"] >= 1.0 else 0
            if self.flat_logs >= self.constant_reward_steps:
                self._act(
                    self.constant_reward,
                    "reward",
                    f"every group got identical rewards for {self.flat_logs} logged steps (no learning signal)",
                    "raise temperature or num_generations, use harder prompts, or check the rewards "
                    "with `posttrain rewards score`",
                    control,
                )
        return control

    def _act(self, action: str, key: str, problem: str, fix: str, control: Any) -> None:
        if action == "stop":
            control.should_training_stop = True
            raise PosttrainError(problem, key=f"stages.{self.stage}", fix=fix)
        if key not in self.warned:
            self.warned.add(key)
            warn(f"stages.{self.stage}: {problem} ({fix})")


class RewardGuard(TrainerCallback):
    """Stops an RL stage when one of its rewards (posttrain.rewards.Reward) scored no completion,
    on any rank, in each of the last `logs` logged steps."""

    def __init__(self, stage: str, rewards: list[Any], logs: int = NO_SCORE_LOGS) -> None:
        self.stage = stage
        self.rewards = rewards
        self.logs = logs
        self.totals = {r.name: (0.0, 0.0) for r in rewards}  # (samples, None scores) at the last log
        self.silent = dict.fromkeys(self.totals, 0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        silent = []
        for reward in self.rewards:
            totals = reward.stats.as_dict()
            before, now = self.totals[reward.name], (totals["samples"], totals["none"])
            self.totals[reward.name] = now
            scored = now[0] - before[0] - (now[1] - before[1])
            silent.append(now[0] > before[0] and scored == 0)
        for reward, quiet in zip(self.rewards, _reduce(silent, every=True), strict=True):
            self.silent[reward.name] = self.silent[reward.name] + 1 if quiet else 0
            if self.silent[reward.name] >= self.logs:
                control.should_training_stop = True
                error = f"; its last error: {reward.last_error}" if reward.last_error else ""
                raise PosttrainError(
                    f"reward '{reward.name}' scored no completion in {self.logs} logged steps in a row "
                    f"(every score None, up to step {state.global_step}){error}",
                    key=f"stages.{self.stage}.rewards",
                    fix="try it on real completions with `posttrain rewards score samples.jsonl --reward ...`: "
                    "a reward returns one float (or None) per completion",
                )
        return control


class CpuThreads(TrainerCallback):
    def __init__(self, every_s: float = CPU_CHECK_S) -> None:
        self.every_s = every_s
        self.watch: CoreWatch | None = None
        self.due = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.watch, self.due = CoreWatch(), time.monotonic() + self.every_s

    def on_step_end(self, args, state, control, **kwargs):
        if self.watch is not None and time.monotonic() >= self.due:
            follow_free_cores(self.watch.free())
            self.due = time.monotonic() + self.every_s
