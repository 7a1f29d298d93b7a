"""The family matrix: every stage on tiny random models of the real families, with their real chat templates.

llama, qwen2, qwen3, qwen3_moe, mixtral, deepseek_v2, deepseek_v3 and gemma2 (tests/families.py)
each go through one run: multi-turn `messages` SFT in full and with LoRA (on the routed experts
too, for the MoE families), 2 GRPO steps, 2 reward-model steps and a dense student distilled from
the SFT model. Nothing is downloaded. `pytest tests/test_families.py -s` prints the family x
stage table (pass/fail and seconds, from each stage's manifest).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from families import FAMILIES, MOE_FAMILIES, build_family
from safetensors.torch import load_file

from posttrain import artifacts, loading
from posttrain.runner import run

STAGES = ("sft", "lora", "grpo", "rm", "distill")
TRAIN = "per_device_train_batch_size: 4, logging_steps: 1, save_strategy: 'no', gradient_checkpointing: false"
CHATS = [
    [
        {"role": "user", "content": f"What is {a}+{b}?"},
        {"role": "assistant", "content": f"{a + b}"},
        {"role": "user", "content": "And doubled?"},
        {"role": "assistant", "content": f"{2 * (a + b)}"},
    ]
    for a, b in [(1, 2), (3, 4), (2, 5), (6, 1), (4, 4), (5, 3), (7, 2), (2, 2)]
]
PAIRS = [
    {"prompt": chat[:1], "chosen": chat[1:2], "rejected": [{"role": "assistant", "content": "no idea"}]}
    for chat in CHATS
]
SECONDS: dict[str, dict[str, float | str]] = {}  # family -> stage -> seconds, or "FAIL"

RECIPE = """
name: {family}
seed: 0
output_dir: {out}
base_model: {{path: {model}}}
stages:
  - {{name: sft, kind: sft, data: {{path: {chats}}}, train: {{max_steps: 2, {train}}}}}
  - name: lora
    kind: sft
    data: {{path: {chats}}}
    lora: {{r: 4, alpha: 8, targets: {targets}}}
    train: {{max_steps: 2, learning_rate: 1.0e-2, {train}}}
  - name: grpo
    kind: grpo
    model: sft
    data: {{synthetic: arithmetic, n: 8, seed: 1}}
    rewards: [{{name: accuracy}}, {{name: format, weight: 0.2}}]
    train: {{max_steps: 2, num_generations: 2, max_completion_length: 8, {train}}}
  - {{name: rm, kind: reward_model, model: sft, data: {{path: {pairs}}}, train: {{max_steps: 2, {train}}}}}
  - name: distill
    kind: distill
    teacher: sft
    data: {{synthetic: arithmetic, n: 4, seed: 2}}
    generation: {{max_new_tokens: 8, batch_size: 4}}
    verifiers: [{{name: format, min_score: 0.0}}]
    students: [{{name: student, dense_from: sft, num_hidden_layers: 1, hidden_size: 32}}]
    train: {{max_steps: 2, {train}}}
"""


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_family(family: str, tmp: Path) -> tuple[Path, dict]:
    model = build_family(family, tmp / "base")
    targets = "[attention, routed_experts]" if family in MOE_FAMILIES else "[attention]"
    recipe = tmp / "recipe.yaml"
    recipe.write_text(
        RECIPE.format(
            family=family,
            out=tmp / "runs",
            model=model,
            chats=write_jsonl(tmp / "chats.jsonl", [{"messages": chat} for chat in CHATS]),
            pairs=write_jsonl(tmp / "pairs.jsonl", PAIRS),
            targets=targets,
            train=TRAIN,
        )
    )
    try:
        return model, run(loading.load(recipe))
    finally:
        SECONDS[family] = {stage: stage_seconds(tmp / "runs" / stage) for stage in STAGES}


def stage_seconds(folder: Path) -> float | str:
    manifest = artifacts.read_json(folder / artifacts.MANIFEST)
    if not (folder / artifacts.COMPLETE).exists() or manifest is None:
        return "FAIL"
    return round(float(manifest.get("wall_time_s", manifest.get("seconds", 0.0))), 1)


@pytest.fixture(scope="module", autouse=True)
def table():
    """Print the family x stage table once the module's runs are done (shown with -s)."""
    yield
    print("\nfamily        " + "".join(f"{s:>9}" for s in STAGES))
    for family, cells in SECONDS.items():
        print(f"{family:14s}" + "".join(f"{cells[s]!s:>9}" for s in STAGES))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_stage_runs_on_the_family(family, tmp_path):
    base, metrics = run_family(family, tmp_path)
    runs = tmp_path / "runs"
    for stage in STAGES:
        assert (runs / stage / artifacts.COMPLETE).exists(), stage
    assert metrics["sft"]["train"]["steps"] == 2 and metrics["grpo"]["train"]["steps"] == 2
    assert metrics["rm"]["train"]["steps"] == 2
    assert (runs / "distill" / "student" / "model" / "model.safetensors").exists()
    student = json.loads((runs / "distill" / "student" / "model" / "config.json").read_text())
    assert not any("expert" in key for key in student), "the student is dense"
    before, after = (
        load_file(str(base / "model.safetensors")),
        load_file(str(runs / "lora" / "model" / "model.safetensors")),
    )
    changed = {k for k in before if not (before[k] == after[k]).all()}
    assert any("self_attn" in k for k in changed), "LoRA merged into attention"
    if family in MOE_FAMILIES:
        assert any("experts" in k for k in changed), "LoRA merged into the routed experts"
        assert any(k.startswith("moe/") and k.endswith("/load_cv") for k in metrics["sft"]), "router metrics"
        assert not any(k.endswith(".gate.weight") and k in changed for k in before), "routers stay frozen"


@pytest.mark.parametrize(
    ("preset", "model_type", "moe_layers"), [("tiny-llama", "llama", 0), ("tiny-qwen3-moe", "qwen3_moe", 3)]
)
def test_the_new_presets_train(preset, model_type, moe_layers, tmp_path, write_recipe, cli):
    recipe = write_recipe(
        f"""
        name: {preset}
        base_model: {{preset: {preset}}}
        stages:
          - {{name: sft, kind: sft, data: {{synthetic: arithmetic, n: 16}}, train: {{max_steps: 2, {TRAIN}}}}}
        """
    )
    code, _, err = cli("run", recipe)
    assert code == 0, err
    stage = tmp_path / "runs" / "sft"
    config = json.loads((stage / "model" / "config.json").read_text())
    metrics = json.loads((stage / "metrics.json").read_text())
    assert config["model_type"] == model_type and metrics["train"]["steps"] == 2
    assert len({k.split("/")[1] for k in metrics if k.startswith("moe/layer_")}) == moe_layers
