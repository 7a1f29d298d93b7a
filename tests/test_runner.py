"""Caching, --force, --only and resume after a killed run, through the real CLI."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

RECIPE = """\
name: cache-test
base_model: {preset: tiny-deepseek-v3}
stages:
  - name: a
    kind: sft
    data: {synthetic: arithmetic, n: 64}
    train: {max_steps: 3, per_device_train_batch_size: 16, gradient_checkpointing: false, save_strategy: 'no'}
  - name: b
    kind: sft
    model: a
    data: {synthetic: arithmetic, n: 64, seed: 1}
    train: {max_steps: 2, per_device_train_batch_size: 16, gradient_checkpointing: false, save_strategy: 'no',
            logging_steps: 1}
eval: {data: {synthetic: arithmetic, split: test, n: 8}, max_new_tokens: 16}
"""


def completion_id(run_dir: Path, stage: str) -> str:
    return json.loads((run_dir / stage / "manifest.json").read_text())["completion_id"]


def test_second_run_is_cached_and_changes_rerun_only_what_they_touch(write_recipe, cli, tmp_path):
    recipe = write_recipe(RECIPE)
    runs = tmp_path / "runs"
    code, _, err = cli("run", recipe)
    assert code == 0, err
    lines = err.splitlines()
    assert lines[0].endswith("checking the recipe…") and "cache-test: 2 stages (a → b)" in lines[1]
    assert any("stage 2/2 · b (sft): running" in line for line in lines)
    steps = [line.split() for line in lines if line.startswith("  b  step ")]
    assert [s[2] for s in steps] == ["1/2", "2/2"] and all(s[3] == "loss" and s[5] == "lr" for s in steps)
    assert "{'" not in err and "moe/" not in err
    first = {s: completion_id(runs, s) for s in "ab"}
    assert json.loads((runs / "b" / "metrics.json").read_text())["eval"]["n"] == 8
    # What a kill between COMPLETE and the cleanup after it leaves behind.
    (runs / "a" / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    (runs / "a" / "RUNNING").write_text("{}")

    code, _, err = cli("run", recipe)
    assert code == 0 and "stage 1/2 a: cached" in err and "stage 2/2 b: cached" in err, err
    assert {s: completion_id(runs, s) for s in "ab"} == first
    assert not (runs / "a" / "checkpoints").exists() and not (runs / "a" / "RUNNING").exists()

    # A change to b alone re-runs b, not a.
    code, _, err = cli("run", recipe, "--set", "stages.b.train.learning_rate=1e-3")
    assert code == 0, err
    assert completion_id(runs, "a") == first["a"] and completion_id(runs, "b") != first["b"]

    # --force a re-runs a, and b after it because its input changed.
    second_b = completion_id(runs, "b")
    code, _, err = cli("run", recipe, "--set", "stages.b.train.learning_rate=1e-3", "--force", "a")
    assert code == 0, err
    assert completion_id(runs, "a") != first["a"] and completion_id(runs, "b") != second_b

    # A new eval block re-evaluates cached stages without retraining them.
    ids = {s: completion_id(runs, s) for s in "ab"}
    code, _, err = cli("run", recipe, "--set", "stages.b.train.learning_rate=1e-3", "--set", "eval.data.n=4")
    assert code == 0 and "re-evaluating" in err, err
    assert {s: completion_id(runs, s) for s in "ab"} == ids
    assert json.loads((runs / "b" / "metrics.json").read_text())["eval"]["n"] == 4


def test_only_needs_finished_inputs(write_recipe, cli, tmp_path):
    recipe = write_recipe(RECIPE)
    code, _, err = cli("run", recipe, "--only", "b")
    assert code == 2 and "--only b needs stage 'a' to be complete first" in err
    code, _, err = cli("run", recipe, "--only", "a")
    assert (
        code == 0
        and (tmp_path / "runs" / "a" / "COMPLETE").exists()
        and not (tmp_path / "runs" / "b").exists()
    )
    code, _, err = cli("run", recipe, "--only", "bb")
    assert code == 2 and "did you mean 'b'" in err


def test_plan_shows_statuses_as_json(write_recipe, cli):
    recipe = write_recipe(RECIPE)
    code, out, _ = cli("plan", recipe, "--json")
    assert code == 0
    plan = json.loads(out)
    assert [(s["name"], s["status"], s["inputs"]) for s in plan["stages"]] == [
        ("a", "run", []),
        ("b", "waits", ["a"]),
    ]


LONG = (
    "train: {max_steps: 60, per_device_train_batch_size: 4, gradient_checkpointing: false,"
    " save_steps: 5, logging_steps: 5}"
)
SHORT = "train: {max_steps: 3, per_device_train_batch_size: 16, gradient_checkpointing: false, save_strategy: 'no'}"


def test_killed_stage_resumes_from_its_last_complete_checkpoint(write_recipe, cli, tmp_path):
    recipe = write_recipe(RECIPE.replace(SHORT, LONG, 1))
    stage = tmp_path / "runs" / "a"
    proc = subprocess.Popen(
        [sys.executable, "-m", "posttrain", "run", str(recipe), "--only", "a"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 180
        while (
            time.time() < deadline
            and not (stage / "checkpoints" / "checkpoint-10" / "trainer_state.json").exists()
        ):
            time.sleep(0.02)
        assert proc.poll() is None, "training finished before it could be interrupted"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (stage / "COMPLETE").exists() and (stage / "RUNNING").exists()
    torn = stage / "checkpoints" / "checkpoint-55"  # what a kill in the middle of a save leaves
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"partial")

    code, out, _ = cli("plan", recipe, "--json")
    assert json.loads(out)["stages"][0]["status"] == "resume"
    code, _, err = cli("run", recipe, "--only", "a")
    assert code == 0 and "resuming" in err, err
    assert json.loads((stage / "metrics.json").read_text())["train"]["steps"] == 60
    assert (stage / "COMPLETE").exists() and not (stage / "checkpoints").exists()
    assert len(list((stage / "logs").glob("events.*"))) == 2  # the killed run's log and the resumed one's


def test_leftovers_of_another_config_are_discarded(write_recipe, cli, tmp_path):
    recipe = write_recipe(RECIPE)
    stage = tmp_path / "runs" / "a"
    (stage / "checkpoints" / "checkpoint-5").mkdir(parents=True)
    (stage / "checkpoints" / "checkpoint-5" / "trainer_state.json").write_text("{}")
    (stage / "RUNNING").write_text(json.dumps({"fingerprint": "an-older-config"}))
    code, _, err = cli("run", recipe, "--only", "a")
    assert code == 0 and "resuming" not in err, err
    assert json.loads((stage / "metrics.json").read_text())["train"]["steps"] == 3
    assert not (stage / "checkpoints").exists()


def test_resume_excuses_only_the_expert_keys_it_loaded_and_only_once():
    import logging

    from posttrain.training import _LoadedKeyWarnings

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("transformers.trainer", logging.WARNING, __file__, 0, message, None, None)

    excuse = _LoadedKeyWarnings()
    excuse.keys |= {"experts.gate_up_proj", "experts.0.up_proj.weight"}
    assert (
        excuse.filter(record("There were missing keys in the checkpoint model loaded: ['other.weight']."))
        is True
    )
    assert (
        excuse.filter(
            record("There were missing keys in the checkpoint model loaded: ['experts.gate_up_proj'].")
        )
        is False
    )
    assert (
        excuse.filter(
            record("There were missing keys in the checkpoint model loaded: ['experts.gate_up_proj'].")
        )
        is True
    )
    assert excuse.filter(record("Something else about 'experts.0.up_proj.weight'")) is True
