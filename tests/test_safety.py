"""Nothing lost, nothing broken trusted (issue 17): what posttrain did not write is never deleted,
a damaged finished stage is rebuilt, one run at a time holds a run directory, rewards that never
score stop RL, and bad data or recipes are one line with exit 2 in run, plan and data inspect."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from posttrain import artifacts, runner
from posttrain.errors import PosttrainError
from posttrain.recipe import FileData, load_recipe

TRAIN = "{max_steps: 2, per_device_train_batch_size: 8, gradient_checkpointing: false, save_strategy: 'no'}"
SFT = f"""\
name: safety
base_model: {{preset: tiny-deepseek-v3}}
stages:
  - name: sft
    kind: sft
    data: {{synthetic: arithmetic, n: 16}}
    train: {TRAIN}
"""
TWO_STAGES = (
    SFT
    + """\
  - name: sft2
    kind: sft
    model: sft
    data: {synthetic: arithmetic, n: 8, seed: 1}
    train: {max_steps: 1, per_device_train_batch_size: 8, gradient_checkpointing: false, save_strategy: 'no'}
"""
)


def sft_on(path: Path, extra: str = "", train: str = TRAIN) -> str:
    return SFT.replace("{synthetic: arithmetic, n: 16}", f"{{path: {path}}}").replace(TRAIN, train) + extra


def finish_fake(recipe, name: str, model: Path) -> Path:
    """A COMPLETE stage of this recipe's fingerprint holding `model` and eval samples, without training."""
    stage_dir = recipe.run_dir / name
    fp = runner.fingerprint(recipe, recipe.stage(name), {})
    artifacts.start_stage(stage_dir, fp)
    shutil.copytree(model, stage_dir / "model")
    artifacts.write_jsonl(stage_dir / "eval_samples.jsonl", [{"prompt": "1+1=", "correct": True}] * 3)
    artifacts.finish_stage(stage_dir, {"fingerprint": fp, "stage": name}, {"train": {"steps": 2}})
    return stage_dir


def status(recipe, name: str) -> str:
    return next(p.status for p in runner.make_plan(recipe) if p.stage.name == name)


# --------------------------------------------------------------------------- 1: never delete


def test_a_folder_posttrain_did_not_write_is_never_cleared(write_recipe, cli, tmp_path):
    mine = tmp_path / "runs" / "sft" / "mine.jsonl"
    mine.parent.mkdir(parents=True)
    mine.write_text('{"prompt": "1+1=", "completion": "2"}\n')
    code, _, err = cli("run", write_recipe(sft_on(mine)))
    assert code == 2 and "runs/sft exists and was not written by posttrain" in err, err
    assert "refusing to delete it" in err and mine.read_text().startswith('{"prompt"')

    stage = tmp_path / "stage"  # posttrain's own folders are still cleared for a fresh start
    artifacts.start_stage(stage, "old")
    (stage / "leftover.bin").write_text("x")
    artifacts.start_stage(stage, "new")
    assert not (stage / "leftover.bin").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    artifacts.start_stage(empty, "fp")  # an empty folder holds nothing to lose


# --------------------------------------------------------------------------- 2: damaged stages


def truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGES = {
    "weights deleted": (lambda d: (d / "model" / "model.safetensors").unlink(), "listed in the manifest, but missing"),
    "weights corrupted, same size": (lambda d: flip_last_byte(d / "model" / "model.safetensors"), "sha256 differs"),
    "metrics truncated": (lambda d: truncate(d / "metrics.json", 10), "metrics.json is missing or does not parse"),
    "eval samples truncated": (lambda d: truncate(d / "eval_samples.jsonl", 20), "eval_samples.jsonl: line 1 is torn"),
    "tokenizer deleted": (lambda d: (d / "model" / "tokenizer.json").unlink(), "tokenizer.json: listed in the manifest"),
}  # fmt: skip


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_finished_stage_is_planned_for_a_rebuild(damage, write_recipe, tiny_moe):
    recipe = load_recipe(write_recipe(TWO_STAGES))
    stage_dir = finish_fake(recipe, "sft", tiny_moe)
    assert status(recipe, "sft") == "cached"
    harm, why = DAMAGES[damage]
    harm(stage_dir)
    assert status(recipe, "sft") == "rebuild" and status(recipe, "sft2") == "waits"
    assert why in runner.damage(stage_dir, recipe.stage("sft"))


def test_a_damaged_stage_is_rebuilt_before_the_stage_that_reads_it(write_recipe, cli, tiny_moe):
    path = write_recipe(TWO_STAGES)
    recipe = load_recipe(path)
    stage_dir = finish_fake(recipe, "sft", tiny_moe)
    (stage_dir / "model" / "model.safetensors").unlink()

    code, _, err = cli("run", path, "--only", "sft2")
    assert code == 2 and "--only sft2 reads stage 'sft', whose files are damaged" in err, err
    code, _, err = cli("run", path)
    assert code == 0, err
    assert "sft: finished, but damaged (model/model.safetensors: listed in the manifest, but missing" in err
    assert (stage_dir / "model" / "model.safetensors").exists() and (
        recipe.run_dir / "sft2" / "COMPLETE"
    ).exists()


def test_large_files_are_hashed_only_when_asked(write_recipe, tiny_moe):
    recipe = load_recipe(write_recipe(SFT))
    stage_dir = finish_fake(recipe, "sft", tiny_moe)
    flip_last_byte(stage_dir / "model" / "model.safetensors")
    weights = (stage_dir / "model" / "model.safetensors").stat().st_size
    assert runner.damage(stage_dir, recipe.stage("sft"), hash_limit=weights - 1) is None
    assert "sha256 differs" in runner.damage(stage_dir, recipe.stage("sft"), hash_limit=None)


# --------------------------------------------------------------------------- 3: lock


def test_one_run_at_a_time_and_a_dead_runs_lock_is_taken_over(tmp_path):
    from posttrain.lock import RunLock, live_holder

    first = RunLock(tmp_path)
    assert first.acquire() is None and live_holder(tmp_path).pid == os.getpid()
    with pytest.raises(PosttrainError, match=rf"is in use by another run \(pid {os.getpid()} on "):
        RunLock(tmp_path).acquire()
    first.release()
    again = RunLock(tmp_path)
    assert live_holder(tmp_path) is None and again.acquire() is None  # released cleanly: no stale holder
    again.release()

    (tmp_path / "run.lock").write_text(json.dumps({"pid": 4242, "host": "node7", "started": "2025-01-02"}))
    stale = RunLock(tmp_path).acquire()  # what SIGKILL leaves: a holder on file, no flock
    assert (stale.pid, stale.host, stale.started) == (4242, "node7", "2025-01-02")


def test_a_second_run_is_refused_naming_the_holder_and_plan_and_verify_say_it_is_live(write_recipe, cli):
    from posttrain.lock import RunLock

    path = write_recipe(SFT)
    recipe = load_recipe(path)
    lock = RunLock(recipe.run_dir)
    lock.acquire()
    try:
        code, _, err = cli("run", path, "--set", "stages.sft.train.learning_rate=1e-3")
        assert code == 2 and f"is in use by another run (pid {os.getpid()} on" in err, err
        assert not (recipe.run_dir / "sft").exists()
        code, _, err = cli("plan", path, "--no-preflight")
        assert code == 0 and f"a run is live in {recipe.run_dir} (pid {os.getpid()}" in err, err
        code, out, _ = cli("verify", path)
        assert code == 2 and "a run is live" in out.splitlines()[0]
    finally:
        lock.release()


HOLD = """\
import os, sys, time
from posttrain.lock import RunLock
RunLock(sys.argv[1]).acquire()
child = os.fork()
if child == 0:
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
time.sleep(60)
"""


def test_a_forked_child_does_not_keep_a_killed_runs_lock(tmp_path):
    """A DataLoader worker outliving its killed parent must not hold the lock (register_at_fork)."""
    from posttrain.lock import RunLock, live_holder

    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    try:
        assert live_holder(tmp_path).pid == proc.pid
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert RunLock(tmp_path).acquire().pid == proc.pid  # taken over while the child still lives
    finally:
        os.kill(child, signal.SIGKILL)


# --------------------------------------------------------------------------- 4: rewards that never score

REWARDS = """\
def nothing(completions, **kwargs):
    return [None] * len(completions)

def one_score(completions, **kwargs):
    return [1.0]

def broken(completions, **kwargs):
    raise RuntimeError("the grader is down")
"""
GRPO = """\
name: safety
base_model: {preset: tiny-deepseek-v3}
stages:
  - name: grpo
    kind: grpo
    data: {synthetic: arithmetic, n: 16}
    rewards: [{name: 'safety_rewards:REWARD'}]
    train: {max_steps: 6, per_device_train_batch_size: 4, num_generations: 4, max_completion_length: 6,
            logging_steps: 1, gradient_checkpointing: false, save_strategy: 'no'}
"""

GRPO_ACCURACY = GRPO.replace("'safety_rewards:REWARD'", "accuracy")


@pytest.fixture
def user_rewards(tmp_path, monkeypatch):
    (tmp_path / "safety_rewards.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))


def test_a_reward_returning_the_wrong_number_of_scores_is_an_error_not_a_retry(user_rewards):
    from posttrain.rewards import build_reward

    reward = build_reward({"name": "safety_rewards:one_score"})
    assert reward(completions=["a", "b", "c"]) == [None, None, None]
    assert (
        reward.stats.as_dict()["errors"] == 3 and reward.last_error == "returned 1 scores for 3 completions"
    )


def test_the_guard_stops_a_reward_that_scores_nothing_naming_its_last_error(user_rewards):
    from transformers import TrainerControl, TrainerState

    from posttrain.guards import RewardGuard
    from posttrain.rewards import build_reward

    broken, fine = build_reward({"name": "safety_rewards:broken"}), build_reward({"name": "format"})
    guard = RewardGuard("grpo", [broken, fine], logs=2)
    for step in (1, 2):
        broken(completions=["x"] * 4)
        fine(completions=["x"] * 4)
        state, control = TrainerState(global_step=step), TrainerControl()
        if step == 1:
            guard.on_log(None, state, control, logs={})
    with pytest.raises(
        PosttrainError, match="reward 'broken' scored no completion in 2 logged steps"
    ) as info:
        guard.on_log(None, state, control, logs={})
    assert "last error: RuntimeError: the grader is down" in str(info.value) and control.should_training_stop


def test_grpo_stops_when_a_reward_never_scores(user_rewards, write_recipe, cli, tmp_path):
    code, _, err = cli("run", write_recipe(GRPO.replace("REWARD", "nothing")))
    assert (
        code == 2 and "stages.grpo.rewards: reward 'nothing' scored no completion in 3 logged steps" in err
    ), err
    assert not (tmp_path / "runs" / "grpo" / "COMPLETE").exists()


@pytest.mark.parametrize("reward, why", [("broken", "RuntimeError: the grader is down"),
                                         ("one_score", "ValueError: returned 1 scores for 4 completions")])  # fmt: skip
def test_run_smoke_tests_the_rewards_before_loading_weights(
    reward, why, user_rewards, write_recipe, cli, tmp_path
):
    code, _, err = cli("run", write_recipe(GRPO.replace("REWARD", reward)))
    assert code == 2 and f"stages.grpo: reward '{reward}' failed on 4 real rows: {why}" in err, err
    assert not (tmp_path / "runs").exists()  # refused before the run directory or any model


# --------------------------------------------------------------------------- 5: nothing trained


def test_zero_steps_or_empty_text_never_complete(write_recipe, cli, tmp_path):
    with pytest.raises(PosttrainError, match="num_train_epochs: -1 epochs train 0 steps"):
        load_recipe(write_recipe(SFT.replace("max_steps: 2", "num_train_epochs: -1")))
    with pytest.raises(PosttrainError, match=r"trained 0 steps \(student small\)"):
        runner.require_training(
            load_recipe(write_recipe(SFT)).stage("sft"), {"students": {"small": {"train": {"steps": 0}}}}
        )

    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"prompt": "", "completion": ""}\n' * 8)
    path = write_recipe(sft_on(empty))
    for command in ("run", "plan"):
        code, _, err = cli(command, path)
        assert code == 2 and f"{empty}: all 8 rows have empty completions: nothing to train on" in err, err
    assert not (tmp_path / "runs" / "sft" / "COMPLETE").exists()


# --------------------------------------------------------------------------- 6: bad data and recipes


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def parquet_ints(path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": list(range(4)), "completion": ["x"] * 4}), path)
    return path


GOOD = '{"prompt": "1+1=", "completion": "2"}\n'
BAD_DATA = {  # how to make the file, where the error points, what it says
    "empty": (lambda d: write_bytes(d / "e.jsonl", b"\n"), "e.jsonl", "the file is empty"),
    "not UTF-8": (lambda d: write_bytes(d / "l.jsonl", GOOD.encode() + b'{"prompt": "caf\xe9"}\n'),
                  "l.jsonl:2", "not UTF-8: byte 0xe9"),
    "malformed line": (lambda d: write_bytes(d / "m.jsonl", (GOOD * 3 + '{"prompt": "x"\n').encode()),
                       "m.jsonl:4", "not JSON: Expecting ',' delimiter"),
    "unknown roles": (lambda d: write_bytes(d / "r.jsonl", b'{"messages": [{"role": "human", "content": "hi"}]}\n'),
                      "r.jsonl", "row 1: 'messages' has turns with role 'human'"),
    "messages as text": (lambda d: write_bytes(d / "s.jsonl", b'{"messages": "[{\\"role\\": \\"user\\"}]"}\n'),
                         "s.jsonl", "column 'messages' holds string"),
    "int prompt": (lambda d: parquet_ints(d / "i.parquet"), "i.parquet", "column 'prompt' holds int64 (row 1: 0)"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_data_is_one_line_naming_the_file_and_row(case, tmp_path):
    from posttrain.data_tools import load_rows

    make, where, message = BAD_DATA[case]
    with pytest.raises(PosttrainError) as info:
        load_rows(FileData(path=str(make(tmp_path))))
    assert f"{where}: " in str(info.value) and message in str(info.value) and info.value.fix, str(info.value)


@pytest.mark.parametrize("case", ["empty", "not UTF-8", "malformed line", "unknown roles"])
def test_run_plan_and_data_inspect_agree_on_bad_files(case, write_recipe, cli, tmp_path):
    make, where, message = BAD_DATA[case]
    data = make(tmp_path)
    path = write_recipe(sft_on(data))
    for args in (("run", path), ("plan", path), ("data", "inspect", data)):
        code, out, err = cli(*args)
        line = next((x for x in (out + err).splitlines() if message in x), "")
        assert code == 2 and f"{where}: " in line and "Traceback" not in err, (args, err)


def test_a_reward_module_that_raises_on_import_is_one_line(write_recipe, cli, tmp_path, monkeypatch):
    (tmp_path / "broken_on_import.py").write_text("1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, _, err = cli("validate", write_recipe(GRPO.replace("safety_rewards:REWARD", "broken_on_import:f")))
    assert code == 2 and "reward module 'broken_on_import' raised ZeroDivisionError on import" in err, err


def test_lora_targets_and_max_length_that_leave_nothing_to_train(write_recipe, cli):
    code, _, err = cli("run", write_recipe(SFT + "    lora: {target_modules: [no_such_proj]}\n"))
    assert code == 2 and "stages.sft.lora: Target modules {'no_such_proj'} not found" in err, err
    code, _, err = cli("run", write_recipe(SFT.replace("max_steps: 2", "max_steps: 2, max_length: 4")))
    assert code == 2 and "stages.sft.train.max_length: all 16 rows lose every completion token" in err, err


def test_an_unreachable_hub_model_is_one_line_in_run_and_plan(write_recipe, cli, monkeypatch):
    path = write_recipe(SFT.replace("{preset: tiny-deepseek-v3}", "{path: nobody-here/no-such-model}"))
    for command in ("run", "plan"):  # HF_HUB_OFFLINE=1 (conftest) and an id not in the cache
        started = time.time()
        code, _, err = cli(command, path)
        assert code == 2 and "model 'nobody-here/no-such-model' is not in the local Hugging Face cache" in err
        assert "HF_HUB_OFFLINE=1" in err and "give a local path" in err and time.time() - started < 30, err

    from huggingface_hub.errors import RepositoryNotFoundError

    from posttrain import hub

    def no_network(*args, **kwargs):
        raise ConnectionError("[Errno -2] Name or service not known")

    def no_repo(*args, **kwargs):
        raise RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # its __init__ wants an HTTP response

    monkeypatch.setattr(hub, "offline", lambda: False)
    for probe, message in (
        (no_network, "cannot reach the Hugging Face Hub"),
        (no_repo, "no model 'x/y' on the"),
    ):
        monkeypatch.setattr("huggingface_hub.model_info", probe)
        with pytest.raises(PosttrainError, match=message):
            hub.check_model_id("x/y")


# --------------------------------------------------------------------------- 7, 8: eval size, escape


def test_an_evaluation_counts_each_distinct_problem_once(write_recipe, cli, tmp_path):
    recipe = """\
        name: safety
        base_model: {preset: tiny-deepseek-v3}
        stages:
          - {name: eval, kind: evaluate, data: {synthetic: arithmetic, split: test, digits: 1, n: 5000},
             max_new_tokens: 2}
        """
    path = write_recipe(recipe)
    code, _, err = cli("plan", path)
    assert "n 5000 exceeds the 24 distinct problems of the 1-digit test split" in err, err
    code, _, err = cli("run", path)
    assert code == 0 and "5000 rows hold 24 distinct problems; each is evaluated once (n=24)" in err, err
    assert json.loads((tmp_path / "runs" / "eval" / "metrics.json").read_text())["eval"]["n"] == 24


def test_a_recipe_name_cannot_leave_runs(write_recipe):
    for name in ("../../escape", "/tmp/elsewhere", ".."):
        with pytest.raises(PosttrainError, match="is not a folder name"):
            load_recipe(write_recipe(SFT.replace("name: safety", f"name: '{name}'"), "r.yaml"))


# --------------------------------------------------------------------------- 9: clearer messages


def test_clearer_messages_for_yaml_tabs_and_union_keys(tmp_path, write_recipe):
    tabs = tmp_path / "tabs.yaml"
    tabs.write_text("name: x\nstages:\n\t- name: sft\n")
    with pytest.raises(PosttrainError, match="indent with spaces"):
        load_recipe(tabs)
    with pytest.raises(
        PosttrainError, match=r"recipe.yaml:6: stages.sft.data.n: Input should be greater than 0"
    ):
        load_recipe(write_recipe(SFT.replace("n: 16", "n: -5")))


def test_rewards_score_reads_a_bom_refuses_non_text_and_counts_wrong_lengths(cli, tmp_path, user_rewards):
    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(b'\xef\xbb\xbf{"completion": "<answer>2</answer>", "answer": "2"}\n')
    code, out, err = cli("rewards", "score", rows, "--reward", "accuracy")
    assert code == 0 and "1 rows" in out, err
    for value in ("2", "null"):
        rows.write_text(f'{{"completion": "x", "answer": "2"}}\n{{"completion": {value}, "answer": "2"}}\n')
        code, _, err = cli("rewards", "score", rows, "--reward", "accuracy")
        assert code == 2 and f"rows.jsonl:2: 'completion' is {value}, not text" in err, err
    rows.write_text('{"completion": "a"}\n{"completion": "b"}\n')
    code, out, _ = cli("rewards", "score", rows, "--reward", "safety_rewards:one_score", "--json")
    assert json.loads(out)["one_score"]["errors"] == 2


# --------------------------------------------------------------------------- 10: trl's fixed choices


@pytest.mark.parametrize(
    "key, value, hint",
    [("loss_type", "dapoo", "did you mean 'dapo'?"), ("scale_rewards", "grop", "did you mean 'group'?"),
     ("importance_sampling_level", "tokn", "did you mean 'token'?"),
     ("lr_scheduler_type", "cosin", "did you mean 'cosine'?"), ("loss_type", "not_a_loss", "one of: bnpo")],
)  # fmt: skip
def test_trl_fixed_choice_strings_are_checked_with_a_did_you_mean(key, value, hint, write_recipe):
    path = write_recipe(GRPO_ACCURACY.replace("logging_steps: 1", f"logging_steps: 1, {key}: {value}"))
    with pytest.raises(PosttrainError) as info:
        load_recipe(path)
    assert f"stages.grpo.train.{key}: '{value}' is not a value trl.GRPOConfig takes" in str(info.value)
    assert hint in str(info.value)


def test_the_choices_come_from_the_installed_trl(write_recipe):
    import dataclasses
    import re

    import trl

    from posttrain.recipe.trl_choices import fixed_choices

    help_text = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(trl.GRPOConfig)}
    named = set(re.findall(r"'(\w+)'", help_text["loss_type"].split("Supported values are")[1].split(".")[0]))
    assert named and named == set(fixed_choices(trl.GRPOConfig)["loss_type"])
    assert set(fixed_choices(trl.SFTConfig)["loss_type"]) >= {"nll", "dft"}
    assert "pad_to_multiple_of" not in fixed_choices(trl.GRPOConfig)  # compared with one value only: open
    for value in (
        "scale_rewards: batch",
        "scale_rewards: false",
        "loss_type: dr_grpo",
    ):  # every accepted form
        load_recipe(write_recipe(GRPO_ACCURACY.replace("logging_steps: 1", f"logging_steps: 1, {value}")))
