"""The GPU check: posttrain against plain trl on one GPU, every figure from one process run.

    python bench/gpu_check.py --json out.json            # one H100 / H200: under 8 minutes
    python bench/gpu_check.py --smoke --json out.json    # the same code at tiny shapes on CPU

Nothing is downloaded. The models are random-initialised at real shapes and saved once: a
Qwen2.5-1.5B-shaped dense model (1.54 B parameters) and a DeepSeek-V3-shaped MoE (MLA, 1 shared +
64 routed experts, 6 per token; 2.16 B total, 0.65 B active), with a word-level tokenizer of the
real vocabulary size built offline. Each measurement is one function below; each returns a dict,
and one that cannot run here (no CUDA, no flash-attn, no bitsandbytes, no vllm, out of time)
says `skipped` and why, so the JSON always has every key:

- `sft`: bf16 SFT tokens/s and MFU, padding and packing (padding-free), plain trl's SFTTrainer
  against posttrain's sft stage; with flash-attention 2 too when it is installed;
- `grpo`: seconds per GRPO step with HF generate, trl's GRPOTrainer against the grpo stage; with
  vLLM colocated too when vllm imports;
- `qlora`: peak GPU memory of QLoRA (4-bit NF4 base + LoRA), trl + peft against posttrain's sft
  stage with LoRA on the same 4-bit checkpoint;
- `memory_planner`: posttrain.memory's per-GPU estimate (`posttrain plan --gpu-memory`) against
  torch.cuda.max_memory_allocated for an SFT, a LoRA and a GRPO stage;
- `fp8`: a block-FP8 checkpoint (float8_e4m3fn weights, `weight_scale_inv` per 128x128 block,
  `quant_method: fp8`, written here at a small size) loaded through posttrain's loader, its
  logits against the weights it was made from.

`--smoke` runs every function at tiny shapes on the CPU (tests/test_gpu_check.py), so the script
cannot rot between the days a GPU is lent.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import random
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import machine

DENSE = {  # Qwen2.5-1.5B
    "model_type": "qwen2",
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}
MOE = {  # DeepSeek-V3's architecture at 2.16 B parameters
    "model_type": "deepseek_v3",
    "vocab_size": 129280,
    "hidden_size": 1536,
    "intermediate_size": 4096,
    "moe_intermediate_size": 512,
    "num_hidden_layers": 12,
    "first_k_dense_replace": 1,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "q_lora_rank": 512,
    "kv_lora_rank": 256,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 64,
    "v_head_dim": 64,
    "n_shared_experts": 1,
    "n_routed_experts": 64,
    "num_experts_per_tok": 6,
    "n_group": 8,
    "topk_group": 4,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 1024}
TINY_MOE = {**TINY, "moe_intermediate_size": 32, "n_routed_experts": 8, "num_experts_per_tok": 2,
            "n_group": 1, "topk_group": 1, "q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8, "v_head_dim": 16, "num_attention_heads": 4, "num_key_value_heads": 4}  # fmt: skip
TINY_DENSE = {**TINY, "num_attention_heads": 4, "num_key_value_heads": 2}
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
GIB = 1024**3


@dataclass
class Setup:
    """What every measurement shares: sizes for this mode, the work folder, the time left."""

    smoke: bool
    folder: Path
    deadline: float
    cuda: bool

    def steps(self, full: int) -> int:
        return 2 if self.smoke else full

    def row_lengths(self) -> tuple[int, int]:
        """SFT rows' length range, in tokens: varied, so that packing has something to do."""
        return (16, 96) if self.smoke else (128, 1024)

    def seconds_left(self) -> float:
        return self.deadline - time.monotonic()


# --------------------------------------------------------------------------- models and data


def make_tokenizer(vocab_size: int, folder: Path) -> Any:
    """posttrain's shipped byte-level tokenizer, its vocabulary padded with unused entries to the
    model's size: text is one token per character, while embeddings, logits and sampling are at
    the real vocabulary size, with nothing downloaded."""
    from transformers import AutoTokenizer

    from posttrain.models import TOKENIZER_DIR

    folder.mkdir(parents=True, exist_ok=True)
    spec = json.loads((TOKENIZER_DIR / "tokenizer.json").read_text())
    taken = len(spec["model"]["vocab"]) + len(spec["added_tokens"])
    spec["model"]["vocab"] |= {f"<|unused_{i}|>": i for i in range(taken, vocab_size)}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        (folder / name).write_text((TOKENIZER_DIR / name).read_text())
    return AutoTokenizer.from_pretrained(folder)


def make_model(name: str, shape: dict[str, Any], setup: Setup) -> Path:
    """Random-initialise `shape` (on the GPU when there is one), save it in bf16 with its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = setup.folder / name
    if (folder / "config.json").exists():
        return folder
    tokenizer = make_tokenizer(shape["vocab_size"], folder)
    config = AutoConfig.for_model(
        **shape, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id
    )
    torch.manual_seed(0)
    with torch.device("cuda" if setup.cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    del model
    release()
    return folder


def text_rows(n: int, lengths: tuple[int, int], seed: int = 0) -> list[dict[str, str]]:
    """Rows of random letters (a token each) with lengths spread over `lengths`: what packing is for."""
    rng = random.Random(seed)
    return [
        {"text": "".join(rng.choices("abcdefghij klmnopqrstuvwxyz", k=rng.randint(*lengths)))}
        for _ in range(n)
    ]


def prompt_rows(n: int, length: int, seed: int = 1) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [{"prompt": "".join(rng.choices("0123456789+-=", k=length))} for _ in range(n)]


def varied(completions: list[str], **kwargs: Any) -> list[float]:
    """A reward that differs within every group (so GRPO has advantages): the text's length mod 7."""
    return [float(len(c) % 7) / 7 for c in completions]


def release() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def peak_memory() -> Iterator[dict[str, Any]]:
    """{'allocated': bytes} after the block: torch.cuda.max_memory_allocated over it (None on CPU)."""
    import torch

    found: dict[str, Any] = {"allocated": None, "reserved": None}
    if torch.cuda.is_available():
        release()
        torch.cuda.reset_peak_memory_stats()
    try:
        yield found
    finally:
        if torch.cuda.is_available():
            found["allocated"] = torch.cuda.max_memory_allocated()
            found["reserved"] = torch.cuda.max_memory_reserved()


def train_args(setup: Setup) -> dict[str, Any]:
    args = {"report_to": "none", "save_strategy": "no", "disable_tqdm": True, "logging_steps": 1, "seed": 0}
    return args | ({"bf16": True} if setup.cuda else {"use_cpu": True, "bf16": False})


# --------------------------------------------------------------------------- posttrain runs


def posttrain_stage(setup: Setup, name: str, model: Path, stage: dict[str, Any]) -> dict[str, Any]:
    """Run one stage through posttrain's runner (a fresh run directory); its metrics."""
    from posttrain import loading
    from posttrain.runner import run

    folder = setup.folder / "runs" / name
    folder.mkdir(parents=True, exist_ok=True)
    recipe = folder / "recipe.json"
    recipe.write_text(
        json.dumps(
            {
                "name": name,
                "output_dir": str(folder / "run"),
                "base_model": {"path": str(model), "dtype": "bfloat16"},
                "stages": [{"name": "stage", **stage}],
            }
        )
    )
    loaded = loading.load(recipe)
    metrics = run(loaded, force=("stage",))["stage"]
    release()
    return {"metrics": metrics, "recipe": loaded}


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- 1. SFT throughput


def sft(setup: Setup, dense: Path, moe: Path) -> dict[str, Any]:
    """bf16 SFT tokens/s and MFU, trl against posttrain: padding and packing on the dense model (and
    with flash-attention 2 when installed), padding on the MoE."""
    import transformers

    flash = setup.cuda and transformers.utils.is_flash_attn_2_available()
    rows = text_rows(64 if setup.smoke else 512, setup.row_lengths())
    data = write_jsonl(rows, setup.folder / "data" / "sft.jsonl")
    out: dict[str, Any] = {"attention": "sdpa" + (" and flash_attention_2" if flash else "")}
    for name, model, modes in (("dense", dense, (False, True)), ("moe", moe, (False,))):
        runs: dict[str, Any] = {}
        for packing in modes:
            label = "packing" if packing else "padding"
            runs[f"trl {label}"] = plain_sft(setup, model, rows, packing, "sdpa")
            if flash:
                runs[f"trl {label} flash_attention_2"] = plain_sft(
                    setup, model, rows, packing, "flash_attention_2"
                )
            runs[f"posttrain {label}"] = posttrain_sft(setup, model, data, packing)
            runs[f"posttrain {label}"]["vs_trl"] = ratio(
                runs[f"posttrain {label}"], runs[f"trl {label}"], "tokens_per_s"
            )
        for figures in runs.values():
            figures["mfu"] = mfu(figures, model)
        out[name] = runs
    return out


def sft_settings(setup: Setup, packing: bool) -> dict[str, Any]:
    return {
        "max_steps": setup.steps(8),
        "per_device_train_batch_size": 4 if setup.smoke else 8,
        "max_length": 128 if setup.smoke else 1024,
        "packing": packing,
        "learning_rate": 1e-5,
        "gradient_checkpointing": True,
    }


def plain_sft(
    setup: Setup, model_dir: Path, rows: list[dict], packing: bool, attention: str
) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16, attn_implementation=attention
    )
    args = SFTConfig(
        output_dir=str(setup.folder / "trl-sft"), **sft_settings(setup, packing), **train_args(setup)
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    with peak_memory() as peak:
        result = trainer.train()
    tokens = max(h.get("num_tokens", 0) for h in trainer.state.log_history)
    del trainer, model
    release()
    seconds = result.metrics["train_runtime"]
    return {
        "tokens_per_s": tokens / seconds,
        "train_s": seconds,
        "peak_allocated_gib": _gib(peak["allocated"]),
    }


def posttrain_sft(
    setup: Setup, model_dir: Path, data: Path, packing: bool, lora: dict | None = None
) -> dict[str, Any]:
    stage = {"kind": "sft", "data": {"path": str(data)}, "lora": lora, "train": sft_settings(setup, packing)}
    with peak_memory() as peak:
        run = posttrain_stage(
            setup, f"sft-{'packing' if packing else 'padding'}{'-lora' if lora else ''}", model_dir, stage
        )
    train = run["metrics"]["train"]
    return {
        "tokens_per_s": train["tokens"] / train["runtime_s"],
        "train_s": train["runtime_s"],
        "peak_allocated_gib": _gib(peak["allocated"]),
        "_peak": peak["allocated"],
        "_recipe": run["recipe"],
    }


def mfu(figures: dict[str, Any], model_dir: Path) -> float | None:
    """Model FLOPs utilisation: 6 x active parameters x tokens/s over the GPU's dense bf16 peak
    (the attention term left out, as in most reports)."""
    import torch

    if not torch.cuda.is_available() or "tokens_per_s" not in figures:
        return None
    name = torch.cuda.get_device_name()
    peak = next((tflops for key, tflops in PEAK_BF16_TFLOPS.items() if key in name), None)
    if peak is None:
        return None
    return 6 * active_parameters(model_dir) * figures["tokens_per_s"] / (peak * 1e12)


def active_parameters(model_dir: Path) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    routed = getattr(config, "n_routed_experts", None)
    return total if not routed else int(total - experts + experts * config.num_experts_per_tok / routed)


# --------------------------------------------------------------------------- 2. GRPO step time


def grpo(setup: Setup, dense: Path, moe: Path) -> dict[str, Any]:
    """Seconds per GRPO step: trl against posttrain, HF generate; vLLM colocate when it imports."""
    import importlib.util

    out: dict[str, Any] = {}
    for name, model in (("dense", dense), ("moe", moe)):
        rows = prompt_rows(256, 16 if setup.smoke else 64)
        data = write_jsonl(rows, setup.folder / "data" / "grpo.jsonl")
        runs = {
            "trl": plain_grpo(setup, model, rows, vllm=False),
            "posttrain": posttrain_grpo(setup, model, data, vllm=False),
        }
        runs["posttrain"]["vs_trl"] = ratio(runs["posttrain"], runs["trl"], "step_s", inverse=True)
        out[name] = runs
    if importlib.util.find_spec("vllm") is None or not setup.cuda:
        out["vllm"] = {"skipped": "vllm is not installed" if setup.cuda else "vLLM needs a GPU"}
    elif setup.seconds_left() < 180:
        out["vllm"] = {"skipped": f"out of time ({setup.seconds_left():.0f}s left)"}
    else:
        runs = {
            "trl": plain_grpo(setup, dense, rows, vllm=True),
            "posttrain": posttrain_grpo(setup, dense, data, vllm=True),
        }
        runs["posttrain"]["vs_trl"] = ratio(runs["posttrain"], runs["trl"], "step_s", inverse=True)
        out["vllm"] = {"dense": runs}
    return out


def grpo_settings(setup: Setup, vllm: bool) -> dict[str, Any]:
    settings = {
        "max_steps": setup.steps(3),
        "per_device_train_batch_size": 8 if setup.smoke else 16,
        "num_generations": 4 if setup.smoke else 8,
        "max_completion_length": 16 if setup.smoke else 128,
        "learning_rate": 1e-6,
        "beta": 0.0,
        "temperature": 1.0,
        "gradient_checkpointing": True,
    }
    if vllm:
        settings |= {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.3}
    return settings


def plain_grpo(setup: Setup, model_dir: Path, rows: list[dict], vllm: bool) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    args = GRPOConfig(
        output_dir=str(setup.folder / "trl-grpo"), **grpo_settings(setup, vllm), **train_args(setup)
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[varied],
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    with peak_memory() as peak:
        result = trainer.train()
    del trainer, model
    release()
    return {
        "step_s": result.metrics["train_runtime"] / args.max_steps,
        "peak_allocated_gib": _gib(peak["allocated"]),
    }


def posttrain_grpo(setup: Setup, model_dir: Path, data: Path, vllm: bool) -> dict[str, Any]:
    settings = grpo_settings(setup, vllm)
    stage = {
        "kind": "grpo",
        "data": {"path": str(data)},
        "rewards": [{"name": "gpu_check:varied"}],
        "train": settings,
    }
    with peak_memory() as peak:
        run = posttrain_stage(setup, f"grpo{'-vllm' if vllm else ''}", model_dir, stage)
    train = run["metrics"]["train"]
    return {
        "step_s": train["runtime_s"] / settings["max_steps"],
        "peak_allocated_gib": _gib(peak["allocated"]),
        "_peak": peak["allocated"],
        "_recipe": run["recipe"],
    }


# --------------------------------------------------------------------------- 3. QLoRA memory


def qlora(setup: Setup, dense: Path) -> dict[str, Any]:
    """Peak GPU memory of QLoRA on the dense model: trl + peft, and posttrain on the 4-bit checkpoint."""
    import importlib.util

    if not setup.cuda:
        return {"skipped": "bitsandbytes 4-bit needs a GPU"}
    if importlib.util.find_spec("bitsandbytes") is None:
        return {"skipped": "bitsandbytes is not installed"}
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )
    quantized = setup.folder / "dense-nf4"  # one 4-bit checkpoint, the start of both runs
    AutoModelForCausalLM.from_pretrained(
        dense, quantization_config=quantization, dtype=torch.bfloat16
    ).save_pretrained(quantized)
    tokenizer = AutoTokenizer.from_pretrained(dense)
    tokenizer.save_pretrained(quantized)
    release()
    rows = text_rows(256, setup.row_lengths())
    with peak_memory() as peak:
        model = AutoModelForCausalLM.from_pretrained(quantized, dtype=torch.bfloat16)
        args = SFTConfig(
            output_dir=str(setup.folder / "trl-qlora"), **sft_settings(setup, False), **train_args(setup)
        )
        lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=lora,
        )
        trainer.train()
    del trainer, model
    release()
    data = write_jsonl(rows, setup.folder / "data" / "qlora.jsonl")
    lora_spec = {"r": 16, "alpha": 32, "target_modules": "all-linear", "merge": False}
    ours = posttrain_sft(setup, quantized, data, packing=False, lora=lora_spec)
    return {
        "trl_peak_allocated_gib": _gib(peak["allocated"]),
        "posttrain_peak_allocated_gib": ours["peak_allocated_gib"],
        "posttrain_vs_trl": ours["_peak"] / peak["allocated"],
    }


# --------------------------------------------------------------------------- 4. the memory planner


def memory_planner(setup: Setup, dense: Path, measured: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """posttrain.memory's estimate for one GPU (DDP row, what `posttrain plan --gpu-memory` prints)
    against the measured peak of the same posttrain run; the planner's 2 GiB for the CUDA context
    and fragmentation is outside max_memory_allocated, so it is taken off before the ratio."""
    from posttrain.memory import RUNTIME_OVERHEAD, Cluster
    from posttrain.preflight import memory_plan

    if "lora" not in measured:
        data = write_jsonl(
            text_rows(64, setup.row_lengths()),
            setup.folder / "data" / "lora.jsonl",
        )
        measured["lora"] = posttrain_sft(
            setup, dense, data, packing=False, lora={"r": 16, "alpha": 32, "merge": False}
        )
    out: dict[str, Any] = {}
    for name, run in measured.items():
        plan = memory_plan(run["_recipe"], Cluster(gpus_per_node=1, nodes=1, gpu_memory=80 * GIB))
        estimate = plan["stages"][0]["estimates"]["ddp"]
        row = {
            "estimate_gib": _gib(estimate["total"]),
            "parts_gib": {k: _gib(v) for k, v in estimate.items() if type(v) is int},
        }
        if run["_peak"] is None:
            row["measured"] = "skipped: no CUDA, so no max_memory_allocated"
        else:
            row["measured_allocated_gib"] = _gib(run["_peak"])
            row["estimate_vs_measured"] = (estimate["total"] - RUNTIME_OVERHEAD) / run["_peak"]
        out[name] = row
    return out


# --------------------------------------------------------------------------- 5. block-FP8 checkpoint


def fp8(setup: Setup) -> dict[str, Any]:
    """Write a DeepSeek-V3-style block-FP8 checkpoint of a small dense model and load it with
    posttrain's loader: parameters in float8, and logits against the bf16 weights it came from."""
    import torch

    from posttrain.models import load_causal_lm
    from posttrain.recipe import PathModel

    shape = {**DENSE, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "vocab_size": 2048,
             "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip
    source = make_model("fp8-source", shape, setup)
    folder = write_block_fp8(source, setup.folder / "fp8")
    started = time.perf_counter()
    model = load_causal_lm(PathModel(path=str(folder)))
    load_s = time.perf_counter() - started
    original = load_causal_lm(PathModel(path=str(source), dtype="bfloat16"))
    dequantized = load_causal_lm(PathModel(path=str(source), dtype="bfloat16"))
    dequantized.load_state_dict(dequantize(folder / "model.safetensors"), strict=False)
    device = "cuda" if setup.cuda else "cpu"
    ids = torch.randint(3, shape["vocab_size"], (2, 32), device=device)
    with torch.no_grad():
        got, *want = (m.to(device)(input_ids=ids).logits.float() for m in (model, dequantized, original))
    return {
        "load_s": load_s,
        "parameter_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "float8_parameters": sum(p.numel() for p in model.parameters() if p.dtype == torch.float8_e4m3fn),
        # the checkpoint's own values, dequantized by hand: the loader must match these closely
        "rel_diff_vs_dequantized": float((got - want[0]).norm() / want[0].norm()),
        # the bf16 weights it was made from: FP8's rounding (e4m3 keeps 3 mantissa bits)
        "rel_diff_vs_original": float((got - want[1]).norm() / want[1].norm()),
    }


def dequantize(file: Path) -> dict[str, Any]:
    """weight = float8 tile x its weight_scale_inv, for every quantized weight in `file`."""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(file)
    out = {}
    for name, scale in tensors.items():
        if name.endswith("_scale_inv"):
            weight = tensors[name.removesuffix("_scale_inv")].float()
            block = -(-weight.shape[0] // scale.shape[0])
            full = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[
                : weight.shape[0], : weight.shape[1]
            ]
            out[name.removesuffix("_scale_inv")] = (weight * full).to(torch.bfloat16)
    return out


def write_block_fp8(source: Path, folder: Path, block: int = 128) -> Path:
    """`source` with every linear weight of its decoder layers as float8_e4m3fn plus a float32
    `weight_scale_inv` per block x block tile (weight = fp8 x scale_inv), the layout DeepSeek-V3
    ships, and `quantization_config: {quant_method: fp8, weight_block_size: [128, 128]}`."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        if not file.name.endswith(".safetensors"):
            shutil.copy(file, folder / file.name)
    weights = {}
    for file in source.glob("*.safetensors"):
        weights |= load_file(file)
    out = {}
    for name, tensor in weights.items():
        if ".layers." in name and name.endswith("proj.weight") and tensor.dim() == 2:
            out[name], out[name + "_scale_inv"] = quantize_blocks(tensor.float(), block)
        else:
            out[name] = tensor
    save_file(out, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [block, block]
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def quantize_blocks(weight: Any, block: int) -> tuple[Any, Any]:
    import torch

    rows, cols = weight.shape
    tiles_r, tiles_c = -(-rows // block), -(-cols // block)
    padded = torch.zeros(tiles_r * block, tiles_c * block)
    padded[:rows, :cols] = weight
    tiles = padded.view(tiles_r, block, tiles_c, block)
    scale = tiles.abs().amax(dim=(1, 3)).clamp_min(1e-12) / torch.finfo(torch.float8_e4m3fn).max
    quantized = (tiles / scale[:, None, :, None]).view_as(padded)[:rows, :cols].to(torch.float8_e4m3fn)
    return quantized.contiguous(), scale.float()


# --------------------------------------------------------------------------- the run


def ratio(ours: dict, theirs: dict, key: str, inverse: bool = False) -> float | None:
    if key not in ours or key not in theirs:
        return None
    return theirs[key] / ours[key] if inverse else ours[key] / theirs[key]


def _gib(n: int | None) -> float | None:
    return None if n is None else round(n / GIB, 3)


def measure(name: str, fn: Callable[[], dict[str, Any]], results: dict[str, Any]) -> None:
    """Run one measurement; an error is recorded (with its traceback's last lines), not raised, so a
    failure costs that figure and not the run."""
    started = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as e:  # the GPU day is rare: keep every other figure
        results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
    results[name]["seconds"] = round(time.perf_counter() - started, 1)
    print(f"{name}: {time.perf_counter() - started:.0f}s", file=sys.stderr)


def public(value: Any) -> Any:
    """The JSON-ready figures: keys starting with `_` (recipes, raw bytes) left out."""
    if isinstance(value, dict):
        return {k: public(v) for k, v in value.items() if not k.startswith("_")}
    return value


MEASUREMENTS = ("sft", "grpo", "qlora", "memory_planner", "fp8")


def planner_runs(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The posttrain runs whose peaks the planner is checked against (those that ran)."""
    runs = {
        "sft": results.get("sft", {}).get("dense", {}).get("posttrain padding", {}),
        "grpo": results.get("grpo", {}).get("dense", {}).get("posttrain", {}),
    }
    return {name: run for name, run in runs.items() if "_recipe" in run}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes on the CPU: checks the code, measures nothing"
    )
    parser.add_argument(
        "--budget", type=float, default=450.0, help="seconds; optional parts are skipped after"
    )
    parser.add_argument("--workdir", type=Path, help="where models and runs go (default: a temporary folder)")
    parser.add_argument("--only", nargs="+", choices=MEASUREMENTS, help="run these measurements alone")
    args = parser.parse_args()
    import torch

    from posttrain.cli import _quiet_libraries

    _quiet_libraries()
    cuda = torch.cuda.is_available() and not args.smoke
    if args.smoke and torch.cuda.is_available():
        torch.cuda.is_available = lambda: False  # the smoke run is the CPU path, even on a GPU box
    folder = args.workdir or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    setup = Setup(args.smoke, folder, time.monotonic() + args.budget, cuda)
    results: dict[str, Any] = {
        "machine": machine(),
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "mode": "smoke" if args.smoke else "full",
    }
    dense = make_model("dense", {**DENSE, **TINY_DENSE} if args.smoke else DENSE, setup)
    moe = make_model("moe", {**MOE, **TINY_MOE} if args.smoke else MOE, setup)
    only = set(args.only or MEASUREMENTS)
    steps = {
        "sft": lambda: sft(setup, dense, moe),
        "grpo": lambda: grpo(setup, dense, moe),
        "qlora": lambda: qlora(setup, dense),
        "memory_planner": lambda: memory_planner(setup, dense, planner_runs(results)),
        "fp8": lambda: fp8(setup),
    }
    for name in MEASUREMENTS:
        if name in only:
            measure(name, steps[name], results)
    text = json.dumps(public(results), indent=2)
    if args.json:
        args.json.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
