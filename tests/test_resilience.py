"""SIGKILL the whole pipeline at seeded random moments: every re-run resumes, no stage is ever
COMPLETE with files missing, judge caches and trace files are never corrupted, and the final
run directory passes `posttrain verify`. While one run is live a second run of the same
directory is refused and touches nothing; each run after a kill takes the dead run's lock over."""

from __future__ import annotations

import collections
import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from posttrain import artifacts, loading
from posttrain.verify import NOT_DONE, verify_run, verify_stage

# Every stage kind of the demo, each a few steps with checkpoints every 2 steps, so that kills
# land between and inside checkpoint saves, judge-cache appends and trace-file appends.
TRAIN = "gradient_checkpointing: false, save_steps: 2, logging_steps: 2"
RECIPE = f"""\
name: resilience
seed: 0
base_model: {{preset: tiny-deepseek-v3}}
stages:
  - name: sft
    kind: sft
    data: {{synthetic: arithmetic, n: 96}}
    train: {{max_steps: 8, per_device_train_batch_size: 8, learning_rate: 3.0e-3, {TRAIN}}}
  - name: label
    kind: rlaif_label
    policy: sft
    data: {{synthetic: arithmetic, n: 24, seed: 2}}
    samples_per_prompt: 3
    sampling: {{temperature: 1.5, max_new_tokens: 16, batch_size: 8}}
    judge: {{backend: likelihood, model: sft, temperature: 0.05, batch_size: 8}}
  - name: rm
    kind: reward_model
    model: sft
    data: label
    eval_fraction: 0.2
    train: {{max_steps: 4, per_device_train_batch_size: 4, {TRAIN}}}
  - name: grpo
    kind: grpo
    model: sft
    data: {{synthetic: arithmetic, n: 64, seed: 1}}
    rewards: [{{name: accuracy}}, {{name: format, weight: 0.25}}]
    train: {{max_steps: 4, per_device_train_batch_size: 8, num_generations: 4, max_completion_length: 12,
             gradient_checkpointing: false, save_steps: 2, logging_steps: 1}}
  - name: distill
    kind: distill
    teacher: grpo
    data: {{synthetic: arithmetic, n: 8, seed: 3}}
    samples_per_prompt: 2
    generation: {{max_new_tokens: 12, temperature: 1.0, batch_size: 4}}
    students: [{{name: small, dense_from: grpo, num_hidden_layers: 1, hidden_size: 32}}]
    train: {{max_steps: 6, per_device_train_batch_size: 4, {TRAIN}}}
"""
STAGES = ["sft", "label", "rm", "grpo", "distill"]


def first(pattern: str) -> Callable[[Path], bool]:
    return lambda runs: any(runs.glob(pattern))


# One kill per run, each after an event of the run before its end, then a seeded random delay
# (seconds): a checkpoint, the judge cache's first append, label finishing (the kill lands in its
# last writes or in rm), GRPO's first samples, the teacher's first traces.
KILLS = [
    (first("sft/checkpoints/checkpoint-*/trainer_state.json"), 0.8),
    (first("cache/judges/*.jsonl"), 0.3),
    (first("label/COMPLETE"), 1.5),
    (first("grpo/samples.jsonl"), 0.8),
    (first("distill/samples.jsonl"), 0.5),
]


def run_until(
    recipe: Path, runs: Path, event: Callable[[Path], bool], delay: float, log: Path, contend: bool = False
) -> int:
    """Start `posttrain run`, wait for `event`, sleep `delay`, SIGKILL it (it must still be running);
    with `contend`, a second run tries the same directory first. Returns the killed run's pid."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "posttrain", "run", str(recipe)], stdout=out, stderr=out
        )
    try:
        deadline = time.time() + 240
        while not event(runs) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, f"the run ended before it could be killed:\n{log.read_text()[-3000:]}"
        if contend:
            a_second_run_is_refused(recipe, runs, proc)
        time.sleep(delay)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return proc.pid


def a_second_run_is_refused(recipe: Path, runs: Path, first: subprocess.Popen) -> None:
    """While the first run is live (paused, so its own timeline is kept), a second run of the same
    directory with another config is refused with the holder's pid and changes no file."""
    files = lambda: {(p, p.stat().st_size, p.stat().st_mtime_ns) for p in runs.rglob("*") if p.is_file()}  # noqa: E731
    first.send_signal(signal.SIGSTOP)
    try:
        before = files()
        second = subprocess.run(
            [sys.executable, "-m", "posttrain", "run", str(recipe), "--set", "stages.grpo.train.learning_rate=1e-4"],
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"is in use by another run (pid {first.pid} on " in second.stderr, second.stderr[-3000:]
        assert files() == before
    finally:
        first.send_signal(signal.SIGCONT)


def problems_beyond_unfinished(recipe) -> list[str]:
    """What verify_run finds besides stages not being complete yet (allowed mid-run)."""
    return [p for p in verify_run(recipe) if not any(p.endswith(why) for why in NOT_DONE.values())]


def test_pipeline_killed_at_random_moments_resumes_to_a_valid_run(write_recipe, cli, tmp_path, declared):
    path = write_recipe(RECIPE)
    recipe = loading.load(path)
    runs, log = recipe.run_dir, tmp_path / "runs.log"
    rng = random.Random(8)
    interrupted, killed = [], []
    for event, most in KILLS:
        killed.append(run_until(path, runs, event, rng.uniform(0, most), log, contend=event is KILLS[3][0]))
        running = [
            s for s in STAGES if (runs / s / "RUNNING").exists() and not (runs / s / "COMPLETE").exists()
        ]
        interrupted += running
        assert problems_beyond_unfinished(recipe) == [], f"after a kill in {running}"
        for stage in STAGES:  # no stage is COMPLETE with a problem (the same check, stage by stage)
            if (runs / stage / "COMPLETE").exists():
                assert verify_stage(runs / stage, recipe.stage(stage)) == [], stage
    assert len(set(interrupted)) >= 4, f"kills landed in {interrupted} only"

    code, _, err = cli("run", path)
    assert code == 0, err
    taken_over = log.read_text() + err  # every run after a kill took the dead run's lock over
    assert all(f"taking over the lock of a run that ended without releasing it (pid {pid} " in taken_over
               for pid in killed), taken_over[-3000:]  # fmt: skip
    assert verify_run(recipe) == []
    code, out, _ = cli("plan", path, "--json")
    assert [s["status"] for s in json.loads(out)["stages"]] == ["cached"] * len(STAGES)
    code, _, _ = cli("verify", path)
    assert code == 0
    assert declared(runs) == []  # every kind wrote exactly its declared metrics (tests/test_metrics.py)

    # What the kills interrupted was resumed, not redone or duplicated.
    label = json.loads((runs / "label" / "metrics.json").read_text())
    assert label["judge"]["cache_hits"] > 0  # judged before the kill, read back from the cache after
    traces = artifacts.read_jsonl(runs / "distill" / "samples.jsonl")
    assert sorted(r["index"] for r in traces) == list(range(8))  # each prompt sampled exactly once
    steps = collections.Counter(r["step"] for r in artifacts.read_jsonl(runs / "grpo" / "samples.jsonl"))
    assert sorted(steps) == [1, 2, 3, 4] and set(steps.values()) == {8}  # 8 completions a step, none twice
    assert json.loads((runs / "sft" / "metrics.json").read_text())["train"]["steps"] == 8


def test_verify_finds_missing_and_corrupted_files_of_a_complete_stage(tmp_path, tiny_moe):
    import shutil

    stage = tmp_path / "a"
    artifacts.start_stage(stage, "fp")
    shutil.copytree(tiny_moe, stage / "model")
    artifacts.write_jsonl(stage / "samples.jsonl", [{"step": 1}, {"step": 2}])
    artifacts.finish_stage(stage, {"fingerprint": "fp"}, {"train": {}})
    assert verify_stage(stage) == []

    (stage / "model" / "model.safetensors").unlink()
    lines = (stage / "samples.jsonl").read_text().splitlines(keepends=True)
    (stage / "samples.jsonl").write_text('{"step": 1, "comp\n' + lines[1])  # a line cut short mid-file
    problems = verify_stage(stage)
    assert "model/model.safetensors: listed in the manifest, but missing" in problems
    assert "model/: no weights (*.safetensors)" in problems
    assert any(p.startswith("samples.jsonl: line 1 is not JSON") for p in problems), problems


def test_verify_allows_a_torn_last_line_only_where_readers_skip_it(tmp_path):
    stage = tmp_path / "a"
    samples = stage / "samples.jsonl"
    artifacts.start_stage(stage, "fp")
    artifacts.append_jsonl(samples, [{"index": 0}])
    with open(samples, "a") as f:
        f.write('{"index": 1, "samp')  # what a SIGKILL mid-append leaves
    assert verify_stage(stage) == []  # unfinished: the resumed stage skips, then cuts, that line
    assert [r["index"] for r in artifacts.read_jsonl(samples)] == [0]

    artifacts.finish_stage(stage, {"fingerprint": "fp"}, {})
    assert verify_stage(stage) == ["samples.jsonl: line 2 is torn (no newline at the end of the file)"]


def test_verify_catches_a_truncated_model_and_a_changed_file(tmp_path, tiny_moe):
    import shutil

    stage = tmp_path / "a"
    artifacts.start_stage(stage, "fp")
    shutil.copytree(tiny_moe, stage / "model")
    artifacts.finish_stage(stage, {"fingerprint": "fp"}, {})
    weights = stage / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    (stage / "model" / "config.json").write_text("{")
    problems = verify_stage(stage)
    assert "model/config.json: 1 bytes, the manifest says" in " ".join(problems)
    assert "model/: config.json does not parse" in problems
    assert any(p.startswith("model/: model.safetensors: unreadable") for p in problems), problems


def test_resume_restores_moe_experts_and_skips_a_final_step_checkpoint(tmp_path, tiny_moe):
    """transformers' Trainer resumes with a plain load_state_dict, which skips an MoE's per-expert
    checkpoint keys; resume_checkpoint loads them first. A checkpoint of the last step is passed
    over (resuming from it would train one step past max_steps)."""
    from types import SimpleNamespace

    import torch

    from posttrain.context import StageContext
    from posttrain.models import load_causal_lm
    from posttrain.recipe import PathModel, PresetModel
    from posttrain.training import resume_checkpoint

    trained = load_causal_lm(PathModel(path=str(tiny_moe)))
    with torch.no_grad():
        for param in trained.parameters():
            param.add_(1.0)
    checkpoints = tmp_path / "a" / "checkpoints"
    for step in (2, 4):
        trained.save_pretrained(checkpoints / f"checkpoint-{step}")
        state = {"global_step": step, "max_steps": 4}
        (checkpoints / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps(state))
    ctx = StageContext(
        "a", tmp_path / "a", tmp_path, 0, PresetModel(preset="tiny-deepseek-v3"), {}, resume=True
    )
    fresh = load_causal_lm(PathModel(path=str(tiny_moe)))
    trainer = SimpleNamespace(model=fresh, is_deepspeed_enabled=False, is_fsdp_enabled=False)

    assert resume_checkpoint(trainer, ctx) == str(checkpoints / "checkpoint-2")
    assert any(".experts." in name for name in fresh.state_dict())
    for (name, got), want in zip(fresh.state_dict().items(), trained.state_dict().values(), strict=True):
        assert torch.equal(got, want), name
