"""Ctrl-C saves and stops (then resumes); NaN losses and reward collapse stop or warn."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from transformers import TrainerControl, TrainerState

from posttrain.errors import PosttrainError
from posttrain.guards import TrainingGuard

RECIPE = """\
name: guard-test
base_model: {preset: tiny-deepseek-v3}
stages:
  - name: sft
    kind: sft
    data: {synthetic: arithmetic, n: 64}
    train: {max_steps: 60, per_device_train_batch_size: 4, gradient_checkpointing: false, save_steps: 50, logging_steps: 5}
"""


def test_ctrl_c_saves_a_checkpoint_stops_and_the_next_run_resumes(write_recipe, cli, tmp_path):
    recipe = write_recipe(RECIPE)
    stage = tmp_path / "runs" / "sft"
    proc = subprocess.Popen(
        [sys.executable, "-m", "posttrain", "run", str(recipe)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 180
    while time.time() < deadline and not list((stage / "logs").glob("events.*")):
        time.sleep(0.05)
    time.sleep(1.0)  # a few steps in, well before the first periodic save at step 50
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err
    assert "after saving a checkpoint" in err
    saved = [p for p in (stage / "checkpoints").glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    assert len(saved) == 1 and int(saved[0].name.split("-")[1]) < 50, saved
    assert not (stage / "COMPLETE").exists()

    code, _, err = cli("run", recipe)
    assert code == 0 and "resuming" in err, err
    assert json.loads((stage / "metrics.json").read_text())["train"]["steps"] == 60


def log(guard: TrainingGuard, step: int, **logs: float) -> TrainerControl:
    state = TrainerState()
    state.global_step = step
    return guard.on_log(None, state, TrainerControl(), logs=logs)


def test_nan_loss_stops_with_a_fix():
    guard = TrainingGuard("sft")
    log(guard, 1, loss=1.5, grad_norm=2.0)
    with pytest.raises(PosttrainError, match="loss became nan at step 2") as info:
        log(guard, 2, loss=float("nan"))
    assert info.value.key == "stages.sft" and "learning rate" in str(info.value)


def test_nan_can_warn_instead(capsys):
    control = log(TrainingGuard("sft", nan="warn"), 3, grad_norm=float("inf"))
    assert not control.should_training_stop
    assert "grad_norm became inf at step 3" in capsys.readouterr().err


def test_reward_without_signal_for_n_logged_steps():
    guard = TrainingGuard("grpo", constant_reward_steps=3, constant_reward="stop")
    log(guard, 1, frac_reward_zero_std=1.0)
    log(guard, 2, frac_reward_zero_std=1.0)
    log(guard, 3, frac_reward_zero_std=0.5)  # one group with signal resets the count
    log(guard, 4, frac_reward_zero_std=1.0)
    log(guard, 5, frac_reward_zero_std=1.0)
    with pytest.raises(PosttrainError, match="identical rewards for 3 logged steps"):
        log(guard, 6, frac_reward_zero_std=1.0)


def test_reward_collapse_warns_once(capsys):
    guard = TrainingGuard("grpo", constant_reward_steps=2)
    for step in range(6):
        control = log(guard, step, frac_reward_zero_std=1.0)
    assert not control.should_training_stop
    assert capsys.readouterr().err.count("no learning signal") == 1


def test_nan_stops_a_real_stage(write_recipe, cli):
    recipe = write_recipe(
        RECIPE.replace(
            "train: {max_steps: 60,",
            "train: {learning_rate: 1.0e+6, max_grad_norm: 0, logging_steps: 1, max_steps: 8,",
        ).replace(" logging_steps: 5}", "}")
    )
    code, _, err = cli("run", recipe)
    assert code == 2 and "became nan" in err, err
