"""A model under 10 M parameters runs on one CPU thread (posttrain.models.cpu_threads); bigger ones and
explicit settings keep theirs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from posttrain import models
from posttrain.recipe import PathModel


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_a_tiny_model_runs_on_one_thread_and_a_big_one_gets_the_default_back(
    tiny_moe: Path, restore_threads, monkeypatch
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("POSTTRAIN_CPU_THREADS", raising=False)
    monkeypatch.setattr(models, "_TORCH_THREADS", [3])  # torch's own count, as if read at start
    models.load_causal_lm(PathModel(path=str(tiny_moe)))
    assert torch.get_num_threads() == 1
    monkeypatch.setattr(models, "SMALL_MODEL", 1000)  # now the same model counts as big
    models.load_causal_lm(PathModel(path=str(tiny_moe)))
    assert torch.get_num_threads() == 3


def test_explicit_thread_settings_win(tiny_moe: Path, restore_threads, monkeypatch) -> None:
    monkeypatch.setenv("POSTTRAIN_CPU_THREADS", "2")
    models.load_causal_lm(PathModel(path=str(tiny_moe)))
    assert torch.get_num_threads() == 2
    monkeypatch.delenv("POSTTRAIN_CPU_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)
    models.load_causal_lm(PathModel(path=str(tiny_moe)))
    assert torch.get_num_threads() == 2  # left alone
