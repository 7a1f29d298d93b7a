"""How many threads torch gets on a CPU: one per core that no other process is busy on.

torch splits each op over its thread pool and joins the threads at a barrier. When another
process holds a core, the thread on that core runs only when the scheduler gives it a slice,
and every op waits for it: on a shared 2-core machine the demo's tiny model generated 17x faster
on one thread than on two. On the same machine, quiet, two threads took 0.61x one thread's time
to generate and 0.64x to train a GRPO step (bench/threads_bench.py). Neither fixed count is right,
so the count follows the free cores: measured when a model loads (`free_cores`) and, during
training, from the CPU time this process and the machine used since the last look
(`CoreWatch`, which `guards.CpuThreads` calls every few seconds).

Linux only (it reads /proc/stat); elsewhere torch keeps its default. `POSTTRAIN_CPU_THREADS` sets
the count, and an explicit `OMP_NUM_THREADS` is left alone.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from posttrain.errors import PosttrainError

PROC_STAT = Path("/proc/stat")
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
SPARE = 0.2  # a core counts as free when at least 80 % of it is idle: a busier one stalls a thread
_DEFAULT: list[int] = []  # torch's own thread count, read before the first change
_USED: list[int] = []  # every count set since `reset_record`, for the stage's manifest


def chosen_threads() -> int | None:
    """The count the user chose with `POSTTRAIN_CPU_THREADS`, None when unset."""
    value = os.environ.get("POSTTRAIN_CPU_THREADS")
    if value:
        if not value.isdigit() or int(value) < 1:
            raise PosttrainError(
                f"POSTTRAIN_CPU_THREADS={value!r} is not a positive whole number of threads",
                fix="export POSTTRAIN_CPU_THREADS=1 (or 2, ...), or unset it to follow the free cores",
            )
        return int(value)
    return None


def cores() -> list[int]:
    """The CPUs this process may run on."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def capacity() -> float:
    """How many cores' worth of CPU time this process may use: its CPUs, capped by a cgroup quota."""
    allowed = float(len(cores()))
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            allowed = min(allowed, int(quota) / int(period))
    except (OSError, ValueError):
        pass
    return allowed


def busy_seconds(cpus: list[int]) -> float | None:
    """CPU seconds spent on `cpus` since boot, by anyone (steal counts: a neighbour had the core);
    None where /proc/stat cannot be read."""
    try:
        lines = PROC_STAT.read_text().splitlines()
    except OSError:
        return None
    wanted = {f"cpu{n}" for n in cpus}
    busy = 0
    for line in lines:
        name, *fields = line.split()
        if name in wanted:
            ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
            busy += sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


def own_seconds() -> float:
    """CPU seconds this process (all its threads) has used."""
    t = os.times()
    return t.user + t.system


class CoreWatch:
    """Free cores between two looks: the cores' busy time less this process's own, over the wall
    time between them."""

    def __init__(self) -> None:
        self.cpus = cores()
        self.last = (time.monotonic(), busy_seconds(self.cpus), own_seconds())

    def free(self) -> float | None:
        """Cores no other process used since the last call (or since creation); None without
        /proc/stat or when no time has passed."""
        now = (time.monotonic(), busy_seconds(self.cpus), own_seconds())
        (t0, busy0, own0), self.last = self.last, now
        if busy0 is None or now[1] is None or now[0] - t0 <= 0:
            return None
        others = max(0.0, (now[1] - busy0) - (now[2] - own0)) / (now[0] - t0)
        return max(0.0, capacity() - others)


_LAST: list[tuple[float, float | None]] = []  # (when, free cores) of the last `free_cores`


def free_cores(window_s: float = 0.2, reuse_s: float = 10.0) -> float | None:
    """Cores no other process is busy on, measured over `window_s` while this one waits (a
    measurement under `reuse_s` old is reused: a stage may load several models in a row)."""
    if _LAST and time.monotonic() - _LAST[0][0] < reuse_s:
        return _LAST[0][1]
    watch = CoreWatch()
    if watch.last[1] is not None:  # without /proc/stat there is nothing to wait for
        time.sleep(window_s)
    _LAST[:] = [(time.monotonic(), watch.free())]
    return _LAST[0][1]


def pick(free: float | None) -> int:
    """torch's thread count for `free` cores: at most torch's default, at least one."""
    import torch

    if not _DEFAULT:
        _DEFAULT.append(torch.get_num_threads())
    if free is None:
        return _DEFAULT[0]
    return max(1, min(_DEFAULT[0], int(free + SPARE)))


def set_threads(count: int) -> int:
    """Set torch's intra-op thread count (recorded for the manifest); returns it."""
    import torch

    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    if count not in _USED:
        _USED.append(count)
    return count


def follow_free_cores(free: float | None = None) -> int | None:
    """Give torch one thread per free core (measured now unless `free` is given), unless the user
    fixed the count or an accelerator does the work; returns the count set, or None."""
    import torch

    chosen = chosen_threads()
    if torch.accelerator.is_available() or (chosen is None and "OMP_NUM_THREADS" in os.environ):
        return None
    if chosen is not None:
        return set_threads(chosen)
    if free is None and (measured := free_cores()) is not None:
        # the ranks on this machine measure at the same moment, so they share what is free
        free = measured / int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return set_threads(pick(free))


def reset_record() -> None:
    _USED.clear()


def threads_used() -> list[int]:
    """The thread counts set since the last `reset_record`, in the order first set."""
    return list(_USED)
