"""The SFT stage on the tiny MoE: full and LoRA fine-tunes train, save and chain."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
from safetensors.torch import load_file

from posttrain import loading, training
from posttrain.runner import run
from posttrain.stages import sft

TRAIN = (
    "{max_steps: 30, per_device_train_batch_size: 16, learning_rate: 3.0e-3, logging_steps: 5,"
    " gradient_checkpointing: false, save_strategy: 'no'}"
)


def weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def full_and_lora(tmp_path_factory):
    """One run with a full fine-tune, then a LoRA (merged) and an adapter-only stage on top."""
    tmp = tmp_path_factory.mktemp("sft")
    path = tmp / "recipe.yaml"
    path.write_text(f"""\
name: sft-test
output_dir: {tmp / "runs"}
base_model: {{preset: tiny-deepseek-v3}}
stages:
  - name: full
    kind: sft
    data: {{synthetic: arithmetic, n: 480}}
    train: {TRAIN}
  - name: lora
    kind: sft
    model: full
    data: {{synthetic: arithmetic, n: 160, seed: 1}}
    lora:
      r: 8
      alpha: 16
      target_modules: [q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj]
      target_parameters: [mlp.experts.gate_up_proj, mlp.experts.down_proj]
    train: {{max_steps: 6, per_device_train_batch_size: 16, learning_rate: 1.0e-2, logging_steps: 2,
             gradient_checkpointing: false, save_strategy: 'no'}}
  - name: adapter
    kind: sft
    model: lora
    data: {{synthetic: arithmetic, n: 32}}
    lora: {{r: 4, target_modules: [o_proj], merge: false}}
    train: {{max_steps: 2, per_device_train_batch_size: 16, gradient_checkpointing: false, save_strategy: 'no'}}
""")
    recipe = loading.load(path)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sft, "release", released)
        return recipe, run(recipe)


FREED: list[list[bool]] = []  # per release() call of the SFT stage: whether each object it was handed died


def released(held: list | None = None) -> None:
    """training.release, recording whether what it was handed is gone once it returns."""
    refs = [weakref.ref(obj) for obj in held or []]
    training.release(held)
    FREED.append([ref() is None for ref in refs])


def test_each_stage_frees_its_trainer_and_model(full_and_lora):
    """The stage hands release() the last references: trainer and model are gone when it returns,
    not only when the stage function does (the next stage, or a student, starts clean)."""
    assert len(FREED) == 3 and all(len(freed) == 2 for freed in FREED), FREED
    assert all(all(freed) for freed in FREED), FREED


def test_full_fine_tune_loss_falls(full_and_lora):
    recipe, results = full_and_lora
    train = results["full"]["train"]
    assert train["steps"] == 30
    assert train["loss_last"] < 0.6 * train["loss_first"], train
    saved = json.loads((recipe.run_dir / "full" / "metrics.json").read_text())
    assert saved["train"] == train and saved["parameters"]["total"] > saved["parameters"]["active"]


def test_full_fine_tune_changes_every_trained_weight(full_and_lora):
    recipe, _ = full_and_lora
    base = weights(next((recipe.run_dir / "presets").iterdir()))
    tuned = weights(recipe.run_dir / "full" / "model")
    assert base.keys() == tuned.keys()
    unchanged = [k for k in base if (base[k] == tuned[k]).all() and not k.endswith("e_score_correction_bias")]
    assert not unchanged  # the routing bias is a buffer, balanced by the `moe:` block, not trained


def test_lora_merges_into_attention_and_fused_experts(full_and_lora):
    recipe, results = full_and_lora
    before = weights(recipe.run_dir / "full" / "model")
    after = weights(recipe.run_dir / "lora" / "model")
    assert before.keys() == after.keys()  # merged: a plain model, no lora_ keys
    changed = {k for k in before if not (before[k] == after[k]).all()}
    assert "model.layers.1.self_attn.o_proj.weight" in changed
    # Saved in the hub layout (one tensor per expert); the fused LoRA delta reaches every expert.
    assert {f"model.layers.1.mlp.experts.{e}.up_proj.weight" for e in range(8)} <= changed
    assert "model.layers.0.mlp.down_proj.weight" not in changed  # the dense MLP was not targeted
    assert results["lora"]["parameters"]["trainable"] < results["full"]["parameters"]["trainable"] / 5


def test_merge_false_saves_a_loadable_adapter(full_and_lora):
    recipe, _ = full_and_lora
    folder = recipe.run_dir / "adapter" / "model"
    assert (folder / "adapter_config.json").exists() and not (folder / "model.safetensors").exists()
    from posttrain.models import load_causal_lm
    from posttrain.recipe import PathModel

    model = load_causal_lm(PathModel(path=str(folder)))
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_each_stage_is_complete_with_manifest(full_and_lora):
    recipe, _ = full_and_lora
    for name in ("full", "lora", "adapter"):
        folder = recipe.run_dir / name
        manifest = json.loads((folder / "manifest.json").read_text())
        assert (folder / "COMPLETE").exists() and not (folder / "RUNNING").exists()
        assert not (folder / "checkpoints").exists() and (folder / "logs").is_dir()
        assert manifest["stage"] == name and manifest["world_size"] == 1 and manifest["zero_stage"] == 0
        assert {"torch", "transformers", "trl", "peft"} <= manifest["versions"].keys()
        assert manifest["cpu_threads"] == [1]  # tests/conftest.py sets POSTTRAIN_CPU_THREADS=1
    assert json.loads((recipe.run_dir / "lora" / "manifest.json").read_text())["inputs"]["full"][
        "completion_id"
    ]
    assert (recipe.run_dir / "recipe.resolved.yaml").exists()
