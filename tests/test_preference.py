"""The preference-optimisation stages (dpo, kto): recipe-time checks (exit 2, one line), soft
labels, and tiny runs that learn a clear preference and resume after a kill."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from posttrain import artifacts


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train several times faster on one CPU thread than on two when another process
    holds the other core (bench figures on the perf branch); the in-process runs here use one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def clear_pairs(path: Path, n: int = 96, seed: int = 3, p_chosen=None) -> Path:
    """Arithmetic prompts; the chosen answer is the worked solution, the rejected one a bare wrong answer."""
    from posttrain.data_tools import arithmetic_rows

    rows = []
    for i, row in enumerate(arithmetic_rows(n, seed=seed)):
        right = row["messages"][-1]["content"]
        wrong = f"<answer>{int(row['answer']) + 1}</answer>"
        p = p_chosen(i) if p_chosen else 0.9
        rows.append({"prompt": row["prompt"], "chosen": right, "rejected": wrong, "p_chosen": p,
                     "answer": row["answer"]})  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


DPO_RECIPE = """
name: tiny-dpo
seed: 0
base_model: {{path: {model}}}
stages:
  - name: dpo
    kind: dpo
    data: {{path: {data}}}
    eval_fraction: 0.25
{extra}    train: {train}
"""
TRAIN = ("{{max_steps: {steps}, per_device_train_batch_size: 8, learning_rate: 5.0e-3, beta: 0.1, "
         "gradient_checkpointing: false, logging_steps: 1, save_steps: {save}{more}}}")  # fmt: skip


def dpo_recipe(write_recipe, model, data, steps=12, save=100, more="", extra="") -> Path:
    train = TRAIN.format(steps=steps, save=save, more=more)
    return write_recipe(DPO_RECIPE.format(model=model, data=data, train=train, extra=extra))


def test_dpo_learns_a_clear_preference_on_held_out_prompts(write_recipe, cli, tiny_dense, tmp_path, declared):
    data = clear_pairs(tmp_path / "pairs.jsonl")
    code, _, err = cli("run", dpo_recipe(write_recipe, tiny_dense, data))
    assert code == 0, err
    stage = tmp_path / "runs" / "dpo"
    assert (stage / "COMPLETE").exists() and (stage / "model" / "config.json").exists()
    metrics = json.loads((stage / "metrics.json").read_text())
    held = metrics["held_out"]
    assert held["n"] == metrics["pairs"]["held_out"] > 10 and metrics["pairs"]["train"] == metrics["rows"]
    assert held["pairwise_accuracy"] >= 0.8 > held["start_accuracy"] + 0.2, held
    assert held["mean_margin"] > 0
    assert metrics["train"]["loss_last"] < metrics["train"]["loss_first"]
    assert metrics["preference"]["rewards/margins"]["last"] > metrics["preference"]["rewards/margins"]["first"]
    assert metrics["soft_labels"] == {"mode": "filter", "min_p_chosen": 0.75, "mean_p_chosen": pytest.approx(0.9)}
    assert declared(tmp_path / "runs") == []
    report = (tmp_path / "runs" / "report.md").read_text()
    assert "implicit reward ranks the chosen answer first" in report
