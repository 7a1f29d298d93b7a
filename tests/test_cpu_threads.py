"""torch's CPU thread count follows the cores no other process is busy on (posttrain.cpu): measured
at each model load and, while training, every few seconds; explicit settings win."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from posttrain import cpu, guards, models
from posttrain.errors import PosttrainError
from posttrain.recipe import PathModel


@pytest.fixture
def picked(monkeypatch):
    """posttrain picks (no explicit setting); torch's default is 2; threads and records restored."""
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("POSTTRAIN_CPU_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(cpu, "_DEFAULT", [2])
    monkeypatch.setattr(cpu, "_LAST", [])
    cpu.reset_record()
    yield
    torch.set_num_threads(before)


def _stat(path: Path, cpus: dict[int, tuple[int, int]]) -> None:
    """A /proc/stat with each CPU's (busy, idle) ticks."""
    lines = ["cpu  0 0 0 0 0 0 0 0 0 0"]
    lines += [f"cpu{n} {busy} 0 0 {idle} 0 0 0 0 0 0" for n, (busy, idle) in cpus.items()]
    path.write_text("\n".join([*lines, "intr 0", ""]))


def test_the_count_is_one_per_free_core_within_torchs_default(picked) -> None:
    assert [cpu.pick(free) for free in (2.0, 1.85, 1.7, 1.0, 0.2, 0.0, 7.9)] == [2, 2, 1, 1, 1, 1, 2]
    assert cpu.pick(None) == 2  # nothing measured (no /proc/stat): torch's default


def test_other_processes_time_counts_and_this_ones_does_not(picked, tmp_path, monkeypatch) -> None:
    """Over 10 s on 2 CPUs: 12 s busy in all, 8 of them this process's own, so others held 0.4 of a
    core and 1.6 are free."""
    stat = tmp_path / "stat"
    monkeypatch.setattr(cpu, "PROC_STAT", stat)
    monkeypatch.setattr(cpu, "cores", lambda: [0, 1])
    monkeypatch.setattr(cpu, "capacity", lambda: 2.0)
    clock, own = iter([100.0, 110.0]), iter([50.0, 58.0])
    monkeypatch.setattr(cpu.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(cpu, "own_seconds", lambda: next(own))
    ticks = cpu.os.sysconf("SC_CLK_TCK")
    _stat(stat, {0: (0, 0), 1: (0, 0), 2: (0, 0)})
    watch = cpu.CoreWatch()
    _stat(stat, {0: (6 * ticks, 4 * ticks), 1: (6 * ticks, 4 * ticks), 2: (99 * ticks, 0)})  # cpu2: not ours
    assert watch.free() == pytest.approx(1.6)


def test_a_busy_process_takes_its_core_off_the_count(picked) -> None:
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # the hog is running
        free = cpu.free_cores(window_s=0.5, reuse_s=0)
    finally:
        hog.kill()
        hog.wait()
    assert free is not None and free <= cpu.capacity() - 0.6


def test_without_proc_stat_nothing_waits_and_torch_keeps_its_default(picked, tmp_path, monkeypatch) -> None:
    """Off Linux the training callback looks every few seconds: each look must not sleep."""
    monkeypatch.setattr(cpu, "PROC_STAT", tmp_path / "absent")
    slept: list[float] = []
    monkeypatch.setattr(cpu.time, "sleep", slept.append)
    assert cpu.free_cores(reuse_s=0) is None and slept == []
    assert cpu.follow_free_cores() == 2


def test_loading_a_model_sets_the_count_and_the_ranks_share_the_free_cores(
    tiny_moe: Path, picked, monkeypatch
) -> None:
    monkeypatch.setattr(cpu, "free_cores", lambda: 2.0)
    models.load_causal_lm(PathModel(path=str(tiny_moe)))
    assert torch.get_num_threads() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks on this machine: one core each
    models.load_causal_lm(PathModel(path=str(tiny_moe)))
    assert torch.get_num_threads() == 1
    assert cpu.threads_used() == [2, 1]  # what the stage's manifest records


def test_training_follows_a_change_in_the_free_cores(picked, monkeypatch) -> None:
    free = iter([0.9, 2.0])
    monkeypatch.setattr(cpu.CoreWatch, "free", lambda self: next(free))
    watch = guards.CpuThreads(every_s=0.0)
    watch.on_train_begin(None, None, None)
    watch.on_step_end(None, None, None)
    assert torch.get_num_threads() == 1  # another job took a core
    watch.on_step_end(None, None, None)
    assert torch.get_num_threads() == 2  # and gave it back


def test_explicit_thread_settings_win(tiny_moe: Path, picked, monkeypatch) -> None:
    monkeypatch.setattr(cpu, "free_cores", lambda: 0.0)
    monkeypatch.setenv("POSTTRAIN_CPU_THREADS", "2")
    models.load_causal_lm(PathModel(path=str(tiny_moe)))
    assert torch.get_num_threads() == 2
    monkeypatch.delenv("POSTTRAIN_CPU_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    models.load_causal_lm(PathModel(path=str(tiny_moe)))
    assert torch.get_num_threads() == 2 and cpu.follow_free_cores(0.0) is None  # left alone


@pytest.mark.parametrize("value", ["two", "0", "-1", "1.5"])
def test_a_bad_thread_count_is_one_clear_error(picked, monkeypatch, value) -> None:
    monkeypatch.setenv("POSTTRAIN_CPU_THREADS", value)
    with pytest.raises(PosttrainError, match="POSTTRAIN_CPU_THREADS=.* is not a positive whole number"):
        cpu.follow_free_cores()
