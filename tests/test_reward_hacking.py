"""The reward-hacking guard: a learned reward rising while the verifiable rewards fall warns or
stops an RL stage, naming both curves; the stage completes with the reason in metrics and report."""

from __future__ import annotations

import json
import random

import pytest
from transformers import TrainerControl, TrainerState

from posttrain.reward_hacking import HackingGuard, trend

LEARNED_REWARDS = '''
from posttrain.rewards import register


@register("test_rising_rm")
def rising_rm(model=None):
    """A stand-in reward model whose scores climb with every batch, whatever the answers."""
    calls = [0]

    def rising_rm(completions, **kwargs):
        calls[0] += 1
        return [0.1 * calls[0] + 0.01 * (i % 2) for i in range(len(completions))]

    return rising_rm


def falling(completions, **kwargs):
    """A stand-in verifiable reward that falls with every batch."""
    falling.calls = getattr(falling, "calls", 0) + 1
    return [1.0 - 0.05 * falling.calls + 0.01 * (i % 2) for i in range(len(completions))]
'''


def feed(guard: HackingGuard, learned: list[float], verifiable: list[float]) -> list[bool]:
    stops = []
    for step, (a, b) in enumerate(zip(learned, verifiable, strict=True), start=1):
        state, control = TrainerState(), TrainerControl()
        state.global_step = step
        guard.on_log(None, state, control, logs={"rewards/rm/mean": a, "rewards/accuracy/mean": b})
        stops.append(control.should_training_stop)
    return stops


def test_trips_when_the_learned_reward_rises_while_the_verifiable_falls(capsys):
    guard = HackingGuard("grpo", {"rm": 0.1}, {"accuracy": 1.0}, steps=5, action="stop")
    stops = feed(
        guard, [0.1 * i for i in range(10)], [0.5, 0.52, 0.5, 0.49, 0.48, 0.47, 0.46, 0.45, 0.44, 0.43]
    )
    assert stops.index(True) == 4 and guard.tripped["step"] == 5  # the first full window of 5
    reason = guard.tripped["reason"]
    assert (
        "learned reward (rm) rose 0.000 → 0.040" in reason and "verifiable rewards (accuracy) fell" in reason
    )
    assert "possible reward hacking at step 5" in capsys.readouterr().err
    assert [p[0] for p in guard.summary()["curves"]["learned"]] == list(range(1, 11))


def test_noise_and_rewards_that_rise_together_do_not_trip():
    rng = random.Random(0)
    noise = HackingGuard("grpo", {"rm": 1.0}, {"accuracy": 1.0}, steps=8, action="stop")
    assert not any(feed(noise, [rng.gauss(0, 1) for _ in range(200)], [rng.gauss(0, 1) for _ in range(200)]))
    together = HackingGuard("grpo", {"rm": 1.0}, {"accuracy": 1.0}, steps=4, action="stop")
    assert not any(feed(together, [0.1 * i for i in range(20)], [0.02 * i for i in range(20)]))
    assert noise.summary()["action"] is None
    assert (
        trend([1, 2, 3]) == pytest.approx(1.0)
        and trend([3, 2, 1]) == pytest.approx(-1.0)
        and trend([1, 1]) == 0
    )


def test_warn_keeps_training():
    guard = HackingGuard("grpo", {"rm": 1.0}, {"accuracy": 1.0}, steps=3, action="warn")
    assert not any(feed(guard, [1, 2, 3, 4], [4, 3, 2, 1])) and guard.tripped["action"] == "warn"


def test_guard_stops_a_real_stage_and_the_report_says_why(write_recipe, cli, tmp_path, monkeypatch, declared):
    (tmp_path / "hack_rewards.py").write_text(LEARNED_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = write_recipe("""
        name: hack
        base_model: {preset: tiny-deepseek-v3}
        stages:
          - name: grpo
            kind: grpo
            data: {synthetic: arithmetic, n: 32, seed: 1}
            rewards: [{name: "hack_rewards:falling"}, {name: "hack_rewards:rising_rm", model: {preset: tiny-deepseek-v3}, weight: 0.1}]
            guard: {reward_hacking_steps: 3, reward_hacking: stop}
            train: {num_generations: 4, per_device_train_batch_size: 8, max_completion_length: 8, max_steps: 10,
                    logging_steps: 1, save_steps: 100, gradient_checkpointing: false}
        """)
    code, _, err = cli("run", recipe)
    assert code == 0, err
    assert "possible reward hacking at step 3" in err
    metrics = json.loads((tmp_path / "runs/grpo/metrics.json").read_text())
    assert (
        metrics["train"]["steps"] == 3
        and metrics["guard"]["step"] == 3
        and metrics["guard"]["action"] == "stop"
    )
    assert metrics["guard"]["learned"] == ["rising_rm"] and metrics["guard"]["verifiable"] == ["falling"]
    assert len(metrics["guard"]["curves"]["learned"]) == 3
    report = (tmp_path / "runs/report.md").read_text()
    assert "possible reward hacking at step 3" in report and "training stopped" in report
    assert declared(tmp_path / "runs") == []
