"""The grpo stage: recipe-time validation (exit 2, one clear line) and a tiny run of a few steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain import artifacts

GRPO_RECIPE = """
name: tiny-grpo
seed: 0
base_model: {{preset: tiny-deepseek-v3}}
stages:
  - name: grpo
    kind: grpo
    data: {data}
    rewards: {rewards}
    train: {train}
"""
RUN_TRAIN = (
    "{num_generations: 4, per_device_train_batch_size: 8, max_completion_length: 12, max_steps: 2, "
    "logging_steps: 1, learning_rate: 1.0e-4, temperature: 1.0, save_steps: 100}"
)


def grpo_recipe(
    write_recipe, data="{synthetic: arithmetic, n: 16, seed: 1}", rewards=None, train=RUN_TRAIN, kind="grpo"
):
    rewards = rewards or "[{name: accuracy}, {name: format, weight: 0.2}, {name: tag_count, weight: 0.1}]"
    return write_recipe(
        GRPO_RECIPE.format(data=data, rewards=rewards, train=train).replace("kind: grpo", f"kind: {kind}")
    )


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"train": "{num_generations: 3, per_device_train_batch_size: 8}"},
            "not divisible by num_generations (3)",
        ),
        ({"train": "{max_completion_length: 600}"}, "max_position_embeddings (512)"),
        ({"train": "{reward_weights: [1.0]}"}, "`weight:` on each reward"),
        ({"rewards": "[{name: acuracy}]"}, "did you mean 'accuracy'"),
        ({"rewards": "[{name: format, mode: loose}]"}, "option 'mode'"),
        ({"rewards": "[{name: format}, {name: format, mode: lenient}]"}, "give one a `label:`"),
        ({"rewards": "[{name: reward_model}]"}, "needs `model:`"),
        ({"rewards": "[{name: reward_model, model: rmm}]"}, "'rmm' is not a stage"),
    ],
)
def test_bad_grpo_recipes_exit_2_with_one_line(
    write_recipe, cli, overrides: dict, message: str, kind
) -> None:
    recipe = grpo_recipe(write_recipe, kind=kind, **overrides)
    code, _, err = cli("validate", recipe)
    assert code == 2, err
    assert message in err and "recipe.yaml:" in err
    assert "Traceback" not in err


def test_missing_reward_column_is_caught_at_validation(write_recipe, cli, tmp_path: Path) -> None:
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "solution": "2"}) + "\n")
    recipe = grpo_recipe(write_recipe, data=f"{{path: {data}}}")
    code, _, err = cli("validate", recipe)
    assert code == 2 and "reward 'accuracy' needs column 'answer'" in err and "solution" in err
    mapped = grpo_recipe(write_recipe, data=f"{{path: {data}, columns: {{answer: solution}}}}")
    assert cli("validate", mapped)[0] == 0


def test_missing_column_in_unpeekable_data_fails_before_the_model_loads(
    write_recipe, cli, monkeypatch, tmp_path
) -> None:
    """A folder (like another stage's data/) is known only once loaded: checked before weights load."""
    import posttrain.stages.grpo as grpo

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(grpo, "load_causal_lm", no_model)
    folder = tmp_path / "prompts"
    folder.mkdir()
    (folder / "part-0.jsonl").write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    (tmp_path / "my_level_reward.py").write_text(
        "def level_bonus(completions, level, **kwargs):\n    return [0.0] * len(completions)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    rewards = "[{name: accuracy}, {name: my_level_reward:level_bonus}]"
    recipe = grpo_recipe(write_recipe, data=f"{{path: {folder}}}", rewards=rewards)
    assert cli("validate", recipe)[0] == 0
    code, _, err = cli("run", recipe)
    assert code == 2 and "reward 'level_bonus' needs column 'level'" in err and "prompt, answer" in err


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_tiny_grpo_run_logs_samples_and_reward_metrics(
    write_recipe, cli, tmp_path: Path, kind: str, declared
) -> None:
    """rloo runs grpo's stage code with trl's RLOOTrainer: the same samples.jsonl and metrics."""
    recipe = grpo_recipe(write_recipe, kind=kind)
    code, _, err = cli("run", recipe)
    assert code == 0, err
    # The console: one compact line per logging step with GRPO's signals, no raw metric dicts, and a
    # closing line that says what moved (the reward), not "loss 0.000 -> 0.000".
    lines = err.splitlines()
    assert any(f"stage 1/1 · grpo ({kind}): running" in line for line in lines)
    steps = [line for line in lines if line.startswith("  grpo  step ")]
    assert [line.split()[2] for line in steps] == ["1/2", "2/2"], err
    assert all("reward " in line and "± " in line and "length " in line for line in steps)
    assert "{'" not in err and "moe/" not in err and "Loading weights" not in err
    [done] = [line for line in lines if line.startswith("✓ grpo in ")]
    assert "reward " in done and "loss" not in done
    stage = tmp_path / "runs" / "grpo"
    assert (stage / "COMPLETE").exists() and (stage / "model" / "config.json").exists()
    samples = artifacts.read_jsonl(stage / "samples.jsonl")
    assert len(samples) == 16  # 2 logged steps x 8 completions
    assert {s["step"] for s in samples} == {1, 2}
    first = samples[0]
    assert set(first) == {"step", "prompt", "completion", "rewards", "advantage"}
    assert set(first["rewards"]) >= {"accuracy", "format", "tag_count"}
    assert isinstance(first["advantage"], float) and isinstance(first["completion"], str)
    metrics = json.loads((stage / "metrics.json").read_text())
    rl = metrics["rl"]
    for key in ("reward", "frac_reward_zero_std", "completions/clipped_ratio", "rewards/accuracy/mean",
                "rewards/format/std", "rewards/accuracy/timeouts"):  # fmt: skip
        assert key in rl, key
    assert metrics["rewards"]["accuracy"]["samples"] == 16 and metrics["train"]["steps"] == 2
    assert list((stage / "logs").glob("events.out.tfevents.*"))
    assert declared(tmp_path / "runs") == []


def test_rloo_resumes_after_a_kill_without_logging_a_step_twice(
    write_recipe, cli, tmp_path, kill_when
) -> None:
    train = RUN_TRAIN.replace("max_steps: 2", "max_steps: 8").replace("save_steps: 100", "save_steps: 2")
    recipe = grpo_recipe(
        write_recipe, data="{synthetic: arithmetic, n: 64, seed: 1}", train=train, kind="rloo"
    )
    stage = tmp_path / "runs" / "grpo"
    kill_when(recipe, stage / "checkpoints" / "checkpoint-2" / "trainer_state.json")
    assert not (stage / artifacts.COMPLETE).exists()
    code, _, err = cli("run", recipe)
    assert code == 0 and "resuming" in err, err
    steps = [row["step"] for row in artifacts.read_jsonl(stage / "samples.jsonl")]
    assert sorted(set(steps)) == list(range(1, 9)) and len(steps) == 8 * 8  # each step once
    assert json.loads((stage / "metrics.json").read_text())["train"]["steps"] == 8


@pytest.mark.parametrize("name", ["demo.yaml", "r1-zero.yaml", "r1-grpo-moe.yaml"])
def test_shipped_grpo_recipes_validate(cli, name: str) -> None:
    recipe = Path(__file__).resolve().parent.parent / "recipes" / name
    code, out, err = cli("validate", recipe)
    assert code == 0, err
    assert "grpo" in (err + out).split("stages (")[1]  # "N stages (sft → ... → grpo ...)"


def test_system_prompt_turns_every_prompt_into_a_conversation() -> None:
    from datasets import Dataset

    from posttrain.stages.grpo import with_system_prompt

    rows = Dataset.from_dict({"prompt": ["What is 2+2?", "And 3+3?"], "answer": ["4", "6"]})
    converted = with_system_prompt(rows, "Think in <think> tags.")
    assert converted[0]["prompt"] == [
        {"role": "system", "content": "Think in <think> tags."},
        {"role": "user", "content": "What is 2+2?"},
    ]
    assert converted["answer"] == ["4", "6"] and with_system_prompt(rows, None) is rows
