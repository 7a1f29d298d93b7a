"""Quantised bases: block-FP8 checkpoints (DeepSeek-V3/R1's release format) and QLoRA
(bitsandbytes 4-bit, whose CPU backend trains here). A trainable copy is dequantised, a frozen one
may stay FP8 where the GPU runs it, and a saved model never claims a quantisation it lacks."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from unittest import mock

import pytest

from posttrain import artifacts, loading, models
from posttrain.recipe import PathModel
from posttrain.runner import run

BLOCK = 128  # DeepSeek-V3's weight_block_size: one scale per 128 x 128 block


def to_block_fp8(weight):
    """(float8_e4m3fn weight, float32 weight_scale_inv per block), as DeepSeek-V3 ships them:
    weight ≈ fp8 * scale_inv, block by block."""
    import torch

    rows, cols = weight.shape
    rb, cb = math.ceil(rows / BLOCK), math.ceil(cols / BLOCK)
    padded = torch.zeros(rb * BLOCK, cb * BLOCK)
    padded[:rows, :cols] = weight.float()
    blocks = padded.view(rb, BLOCK, cb, BLOCK)
    scale_inv = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / torch.finfo(torch.float8_e4m3fn).max
    quantized = (blocks / scale_inv[:, None, :, None]).view(rb * BLOCK, cb * BLOCK)[:rows, :cols]
    return quantized.to(torch.float8_e4m3fn), scale_inv


def write_block_fp8(source: Path, dest: Path) -> Path:
    """`source` re-saved in the block-FP8 layout: every 2-D weight of the decoder layers but norms
    and routers in float8_e4m3fn with its `weight_scale_inv`, `quant_method: fp8` in config.json."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, dest)
    tensors = {}
    for name, tensor in load_file(str(dest / "model.safetensors")).items():
        quantize = ".layers." in name and name.endswith(".weight") and tensor.ndim == 2
        if quantize and "norm" not in name and not name.endswith("mlp.gate.weight"):
            tensors[name], tensors[name.removesuffix("weight") + "weight_scale_inv"] = to_block_fp8(tensor)
        else:
            tensors[name] = tensor
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dest / "config.json").read_text())
    config["dtype"] = "bfloat16"  # as DeepSeek-V3 declares it
    config["quantization_config"] = {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK],
    }  # fmt: skip
    (dest / "config.json").write_text(json.dumps(config))
    return dest


@pytest.fixture(scope="module")
def fp8_moe(tiny_moe, tmp_path_factory) -> Path:
    return write_block_fp8(tiny_moe, tmp_path_factory.mktemp("fp8") / "tiny-moe-fp8")


def test_the_checkpoint_is_block_fp8(fp8_moe) -> None:
    assert "F8_E4M3" in models.safetensors_dtypes(fp8_moe)
    assert models.quant_method(models.source_config(PathModel(path=str(fp8_moe)))) == "fp8"


def test_on_an_fp8_gpu_the_trainable_copy_is_dequantised_and_the_frozen_one_stays_fp8(
    fp8_moe, tiny_moe
) -> None:
    """What transformers does on a GPU that runs FP8 (simulated: the weights stay on the CPU):
    a frozen copy (GRPO reference, judge, teacher) keeps FP8Linear layers; the copy a trainer
    updates is dequantised to bf16 Linear layers, with no quantization_config left."""
    import torch
    from transformers.integrations.finegrained_fp8 import FP8Linear

    source = PathModel(path=str(fp8_moe))
    with (
        mock.patch("torch.cuda.is_available", return_value=True),
        mock.patch("torch.cuda.get_device_capability", return_value=(9, 0)),
    ):
        frozen = models.load_causal_lm(source)
        trainable = models.load_causal_lm(source, trainable=True)
    assert isinstance(frozen.model.layers[0].self_attn.q_a_proj, FP8Linear)
    q_a = trainable.model.layers[0].self_attn.q_a_proj
    assert type(q_a) is torch.nn.Linear and q_a.weight.dtype == torch.bfloat16
    assert not hasattr(trainable.config, "quantization_config")
    original = models.load_causal_lm(PathModel(path=str(tiny_moe))).model.layers[0].self_attn.q_a_proj.weight
    assert torch.allclose(q_a.weight.float(), original, atol=0.01)  # FP8 rounding, then bf16


@pytest.mark.slow  # ~15 s on 2 busy cores: the tiny MoE's LoRA SFT, merge and reloads
def test_lora_sft_from_an_fp8_base_saves_a_dequantised_model(fp8_moe, tmp_path) -> None:
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(f"""\
name: fp8
output_dir: {tmp_path / "runs"}
base_model: {{path: {fp8_moe}, dtype: float32}}  # float32: bf16 matmuls are slow on a CPU
stages:
  - name: sft
    kind: sft
    data: {{synthetic: arithmetic, n: 16}}
    lora: {{r: 4, targets: [attention]}}
    train: {{max_steps: 2, per_device_train_batch_size: 8, learning_rate: 1.0e-2, logging_steps: 1, gradient_checkpointing: false, save_strategy: 'no'}}
""")
    recipe = loading.load(recipe_path)
    run(recipe)
    saved = recipe.run_dir / "sft" / artifacts.MODEL
    assert "quantization_config" not in artifacts.read_json(saved / artifacts.MODEL_CONFIG)
    assert not models.safetensors_dtypes(saved) & {"F8_E4M3", "F8_E5M2"}
    import torch

    base = models.load_causal_lm(PathModel(path=str(fp8_moe), dtype="float32"), trainable=True)
    merged = models.load_causal_lm(PathModel(path=str(saved)))
    before, after = (m.model.layers[0].self_attn.q_a_proj.weight for m in (base, merged))
    assert not torch.equal(before, after) and torch.allclose(before, after, atol=0.05)  # LoRA merged in


def test_a_saved_model_never_claims_a_quantisation_its_weights_lack(tiny_dense, fp8_moe, tmp_path) -> None:
    claims = shutil.copytree(tiny_dense, tmp_path / "claims")
    config = artifacts.read_json(claims / artifacts.MODEL_CONFIG)
    for method in ("fp8", "bitsandbytes"):
        artifacts.write_json(
            claims / artifacts.MODEL_CONFIG, {**config, "quantization_config": {"quant_method": method}}
        )
        assert models.drop_unbacked_quantization(claims)
        assert "quantization_config" not in artifacts.read_json(claims / artifacts.MODEL_CONFIG)
    assert not models.drop_unbacked_quantization(fp8_moe)  # real FP8 weights: the claim stays


@pytest.mark.slow  # ~20 s on 2 busy cores: bitsandbytes' CPU 4-bit matmuls are plain torch
def test_qlora_sft_trains_4bit_on_cpu_and_saves_full_precision(tiny_dense, tmp_path) -> None:
    """bitsandbytes' CPU backend: the base in NF4, LoRA adapters trained on top (peft's k-bit
    preparation), the merged model saved unquantised; the manifest records the quantisation."""
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(f"""\
name: qlora
output_dir: {tmp_path / "runs"}
base_model: {{path: {tiny_dense}, quantization: {{bits: 4, compute_dtype: float32}}}}
stages:
  - name: sft
    kind: sft
    data: {{synthetic: arithmetic, n: 48}}
    lora: {{r: 8}}
    train: {{max_steps: 6, per_device_train_batch_size: 8, learning_rate: 1.0e-2, logging_steps: 1, gradient_checkpointing: false, save_strategy: 'no'}}
""")
    recipe = loading.load(recipe_path)
    run(recipe)
    stage = recipe.run_dir / "sft"
    metrics = artifacts.read_json(stage / artifacts.METRICS)
    assert metrics["train"]["loss_last"] < metrics["train"]["loss_first"]
    assert 0 < metrics["parameters"]["trainable"] < metrics["parameters"]["total"]
    assert artifacts.read_json(stage / artifacts.MANIFEST)["model_loading"]["quantization"]["bits"] == 4
    saved = stage / artifacts.MODEL
    assert "quantization_config" not in artifacts.read_json(saved / artifacts.MODEL_CONFIG)
    assert models.safetensors_dtypes(saved) <= {"F32", "BF16"}
    import torch

    base = models.load_causal_lm(PathModel(path=str(tiny_dense)))
    merged = models.load_causal_lm(PathModel(path=str(saved)))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(dict(base.named_parameters())[name], dict(merged.named_parameters())[name])


@pytest.mark.parametrize(("bits", "layer"), [(4, "Linear4bit"), (8, "Linear8bitLt")])
def test_quantized_load_is_a_k_bit_model(tiny_dense, bits: int, layer: str) -> None:
    import bitsandbytes as bnb

    source = PathModel(path=str(tiny_dense), quantization={"bits": bits})
    model = models.load_causal_lm(source, trainable=True)
    assert isinstance(model.model.layers[0].self_attn.q_proj, getattr(bnb.nn, layer))
    assert model.config.posttrain_loaded_with["quantization"]["bits"] == bits
