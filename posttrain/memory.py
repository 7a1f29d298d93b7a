"""Per-GPU memory estimate of each stage, under each DeepSpeed setting posttrain ships.

    posttrain plan recipe.yaml --gpus-per-node 8 --nodes 2 --gpu-memory 80GB [--json]

The arithmetic follows the ZeRO paper (Rajbhandari et al. 2020): with bf16 mixed precision a
trained parameter costs 2 bytes of weights, 2 of gradients and 12 of Adam state (fp32 master,
momentum, variance); ZeRO-1 shards the optimizer state over the N GPUs, ZeRO-2 also the
gradients, ZeRO-3 also the weights, and CPU offload moves optimizer state (and, for
`zero3_offload`, weights) to host memory. LoRA trains only the adapters (16 bytes each) on
frozen weights. Each frozen model a stage holds is its own row (`Frozen`): GRPO's reference
model when beta > 0 without LoRA, and the distillation teacher in the logits modes, are
prepared by trl's DeepSpeed engine, so ZeRO-3 shards them like the policy; a reward model or
an AI judge used as a reward is loaded by posttrain on each GPU whole. vLLM colocated with
training (trl's `use_vllm: true, vllm_mode: colocate`) reserves `vllm_gpu_memory_utilization`
of each GPU, its own row too; in server mode it runs on other GPUs and costs nothing here.

A stage that trains several models one after another (distillation: the teacher samples,
then each student trains) gives one `Phase` each; its peak is the largest phase, not the sum
(`plan_phases`). A sampling phase (`Workload.inference`) holds the model's weights whole on
each GPU, outside DeepSpeed, and its KV cache, or the vLLM engine's share (at least the
weights over its tensor-parallel GPUs). Each stage kind gives its Workload or phases
(`workload` in its module in posttrain/stages/, through `trainer_workload`);
`preflight.memory_plan` plans a whole recipe.

Activations are a rough term: per token and layer, ~10 hidden-size values (attention,
norms, residual) plus ~3 per MLP unit a token passes through (top-k experts + shared experts
for MoE), in bf16; with gradient checkpointing only each layer's input is kept plus one
layer's worth; the logits add 8 bytes per vocabulary entry per token (fp32 and its gradient).
GRPO's generation (without vLLM) holds a KV cache instead, when that is larger.
ZeRO-3 adds the parameters it gathers at once (a decoder layer, with its whole MoE block as
one DeepSpeed leaf module, plus a prefetch bucket); ZeRO-2 and ZeRO-3 allocate a contiguous
gradient buffer of DeepSpeed's default reduce_bucket_size (5e8 elements, ~1 GiB in bf16)
whatever the model's size, and DDP's reducer a flat copy of the gradients; and every GPU pays ~2 GiB for the CUDA context, communication
buffers and fragmentation. Expect the total to be within tens of
percent; bench/memory_bench.py compares it with measured peaks.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from posttrain.architecture import ModelShape, model_config, shape
from posttrain.errors import PosttrainError
from posttrain.lora_targets import count, count_modules, named_targets
from posttrain.models import PRESETS

GIB = 1024**3
RUNTIME_OVERHEAD = 2 * GIB  # CUDA context, NCCL buffers, allocator fragmentation
# DeepSpeed's default reduce_bucket_size (elements): ZeRO-2/3 allocate one contiguous gradient
# buffer of this size up front, whatever the model's size (accelerate's configs leave the default).
REDUCE_BUCKET = 500_000_000
PREFETCH_BUCKET = 50_000_000  # stage3_prefetch_bucket_size default (elements)
PROMPT_TOKENS = 512  # a prompt's length where the trainer's settings do not bound it


@dataclasses.dataclass(frozen=True)
class Sharding:
    """One DeepSpeed setting; `name` is its file under recipes/accelerate/."""

    name: str
    zero_stage: int
    offload_optimizer: bool = False
    offload_params: bool = False


SHARDINGS = (
    Sharding("ddp", 0),
    Sharding("zero2", 2),
    Sharding("zero3", 3),
    Sharding("zero3_offload", 3, offload_optimizer=True, offload_params=True),
)


@dataclasses.dataclass(frozen=True)
class Cluster:
    gpus_per_node: int
    nodes: int
    gpu_memory: int  # bytes

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.nodes


@dataclasses.dataclass(frozen=True)
class Frozen:
    """A model a stage holds without training it: one row of the plan."""

    label: str  # "reference model", "reward model 'rm'", "teacher"...
    params: int
    sharded: bool = True  # prepared by trl's DeepSpeed engine (ZeRO-3 shards it); False: whole on each GPU
    note: str = ""  # why it costs nothing here (a served judge)


@dataclasses.dataclass(frozen=True)
class Workload:
    """What one stage (or phase) puts on each GPU: the model it trains and how, and what else it holds."""

    model: ModelShape
    trainable: int  # parameters with gradients and optimizer state
    lora: bool
    frozen: tuple[Frozen, ...] = ()  # reference, reward model, judge, teacher
    batch: int = 8  # sequences per GPU per micro-step
    seq: int = 1024  # tokens per sequence
    gradient_checkpointing: bool = True
    bf16: bool = True
    generating: int = 0  # sequences generated at once per GPU (GRPO without vLLM): their KV cache
    vllm: float = 0.0  # share of each GPU's memory a colocated vLLM engine reserves
    vllm_note: str = ""  # where vLLM runs when it costs nothing here (server mode)
    inference: bool = False  # a sampling phase: `model` generates, nothing trains
    tensor_parallel: int = 1  # GPUs one vLLM engine spreads the weights over


@dataclasses.dataclass(frozen=True)
class Phase:
    """One of the steps a stage runs one after another (the teacher's sampling, each student)."""

    name: str
    work: Workload | str  # a reason string when its model's config is not available offline


VLLM_ROW = "vllm share"  # the estimate's key of the GPU memory a vLLM engine reserves


def parse_size(text: str) -> int:
    """'80GB', '80GiB', '80G' or '81920MB' -> bytes. GPU makers' "80 GB" are GiB, so GB means GiB."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?B?)\s*", text, re.IGNORECASE)
    if not match:
        raise PosttrainError(f"cannot read memory size '{text}'", fix="write e.g. 80GB or 141GiB")
    number, unit = float(match.group(1)), match.group(2).upper()
    return int(number * 1024 ** "BKMGT".index(unit or "B"))


def estimate(work: Workload, sharding: Sharding, gpus: int, gpu_memory: int = 0) -> dict[str, int]:
    """Bytes per GPU, by component (one per frozen model), and the `total`; `cpu_offload` is host
    memory per GPU. `gpu_memory` sizes vLLM's colocated share."""
    if work.inference:
        return sampling(work, gpu_memory)
    shards = max(gpus, 1)
    weight_bytes = 2 if work.bf16 else 4
    base = work.model.total * weight_bytes
    if work.lora:  # adapters in fp32 with their own Adam state: 4 + 4 + 8 bytes each
        trained_weights, grads, optimizer = work.trainable * 4, work.trainable * 4, work.trainable * 8
    elif work.bf16:
        trained_weights, grads, optimizer = 0, work.trainable * 2, work.trainable * 12
    else:
        trained_weights, grads, optimizer = 0, work.trainable * 4, work.trainable * 8
    zero = sharding.zero_stage
    weights = base + trained_weights
    if zero >= 3:
        weights = weights / shards
    if zero >= 2:
        grads = grads / shards
    if zero >= 1:
        optimizer = optimizer / shards
    cpu = 0.0
    if sharding.offload_optimizer:
        cpu, optimizer = cpu + optimizer, 0
    if sharding.offload_params:
        cpu, weights = cpu + weights, 0
    frozen = {}
    for model in work.frozen:  # trl's DeepSpeed engine shards (and offloads) the ones it prepares
        size = model.params * weight_bytes / (shards if zero >= 3 and model.sharded else 1)
        if sharding.offload_params and model.sharded:
            cpu, size = cpu + size, 0
        frozen[model.label] = size
    parts = {
        "weights": weights,
        "gradients": grads,
        "optimizer": optimizer,
        **frozen,
        VLLM_ROW: work.vllm * gpu_memory,
        "activations": activations(work),
        "zero3_gathered": gathered(work.model, weight_bytes) if zero >= 3 else 0,
        # DDP's reducer keeps its own flat copy of the gradients; ZeRO-2/3 one bucket of fixed size
        "comm_buffers": (grads if gpus > 1 else 0)
        if zero == 0
        else (REDUCE_BUCKET * weight_bytes if zero >= 2 else 0),
        "runtime": RUNTIME_OVERHEAD,
    }
    out = {key: int(value) for key, value in parts.items()}
    out["total"] = sum(out.values())
    out["cpu_offload"] = int(cpu)
    return out


def sampling(work: Workload, gpu_memory: int) -> dict[str, int]:
    """A sampling phase, the same under every sharding (generation runs outside DeepSpeed): the
    weights whole and the KV cache, or the vLLM engine's share, which must hold the weights over
    its tensor-parallel GPUs."""
    weights = work.model.total * (2 if work.bf16 else 4)
    if work.vllm:
        parts = {VLLM_ROW: max(work.vllm * gpu_memory, weights / max(work.tensor_parallel, 1))}
    else:
        parts = {"weights": weights, "kv_cache": kv_cache(work)}
    out = {key: int(value) for key, value in {**parts, "runtime": RUNTIME_OVERHEAD}.items()}
    return {**out, "total": sum(out.values()), "cpu_offload": 0}


def kv_cache(work: Workload) -> int:
    """Keys and values (~2 hidden sizes per token and layer, bf16) of the sequences generated at once."""
    return work.generating * work.seq * work.model.layers * 2 * work.model.hidden * 2


def activations(work: Workload) -> int:
    """Rough activation memory of one micro-batch (see the module docstring), or of the KV cache
    while generating (keys and values, ~2 hidden sizes per token and layer), whichever is larger."""
    m = work.model
    tokens = work.batch * work.seq
    per_layer = 2 * (10 * m.hidden + 3 * m.mlp_width)  # bytes per token, bf16
    if work.gradient_checkpointing:
        kept = tokens * (2 * m.hidden * m.layers + per_layer)
    else:
        kept = tokens * per_layer * m.layers
    return int(max(kept + tokens * m.vocab * 8, kv_cache(work)))


def gathered(model: ModelShape, weight_bytes: int) -> int:
    """What ZeRO-3 holds unsharded at a time: one decoder layer (its MoE block gathered whole as a
    leaf module) and DeepSpeed's prefetch bucket."""
    return int((max(model.largest_layer, model.largest_moe_block) + PREFETCH_BUCKET) * weight_bytes)


def plan_stage(work: Workload, cluster: Cluster) -> dict[str, Any]:
    """Every sharding's estimate, which fit, and what would make it fit when none does."""
    estimates = {}
    for sharding in SHARDINGS:
        numbers = estimate(work, sharding, cluster.gpus, cluster.gpu_memory)
        estimates[sharding.name] = {**numbers, "fits": numbers["total"] <= cluster.gpu_memory}
    fits = [name for name, e in estimates.items() if e["fits"]]
    return {"estimates": estimates, "fits_with": fits, "suggestions": suggestions(work, cluster, fits)}


def plan_phases(phases: list[Phase], cluster: Cluster) -> dict[str, Any]:
    """A stage whose phases run one after another: each phase's plan, and under each sharding the
    largest phase's estimate (its `peak`); the stage fits where every phase fits."""
    planned = [{"name": p.name, **_phase_plan(p.work, cluster)} for p in phases]
    known = [p for p in planned if "estimates" in p]
    if not known:
        return {"phases": planned, "skipped": planned[0]["skipped"]}
    estimates = {}
    for sharding in SHARDINGS:
        peak = max(known, key=lambda p: p["estimates"][sharding.name]["total"])
        estimates[sharding.name] = {**peak["estimates"][sharding.name], "peak": peak["name"]}
        estimates[sharding.name]["fits"] = all(sharding.name in p["fits_with"] for p in known)
    fits = [name for name, e in estimates.items() if e["fits"]]
    hints = [f"{p['name']}: {hint}" for p in known for hint in p["suggestions"]] if not fits else []
    return {"phases": planned, "estimates": estimates, "fits_with": fits, "suggestions": hints}


def _phase_plan(work: Workload | str, cluster: Cluster) -> dict[str, Any]:
    if isinstance(work, str):
        return {"skipped": work}
    return {"params": params(work), **plan_stage(work, cluster)}


def params(work: Workload) -> dict[str, Any]:
    """The plan's account of a workload's models: the trained one's counts, the frozen ones, vLLM."""
    return {
        "total": work.model.total,
        "active": work.model.active,
        "trainable": work.trainable,
        "lora": work.lora,
        "frozen": [dataclasses.asdict(f) for f in work.frozen],
        "vllm": {
            "gpu_memory_utilization": work.vllm,
            "note": work.vllm_note,
            "tensor_parallel": work.tensor_parallel,
        },
        "inference": work.inference,
    }


def suggestions(work: Workload, cluster: Cluster, fits: list[str]) -> list[str]:
    """What would make a stage fit: a higher ZeRO stage or offload, LoRA, more GPUs, a smaller batch,
    less memory for vLLM."""
    if fits:
        return [] if fits[0] == "ddp" else [f"use recipes/accelerate/{fits[0]}.yaml"]
    if work.inference:
        return [_sampling_hint(work)]
    vllm = _vllm_hints(work, cluster)
    out = list(vllm)
    if not work.lora and work.model.model is not None:
        lora = dataclasses.replace(work, lora=True, trainable=_lora_size(work.model))
        for sharding in SHARDINGS:
            total = estimate(lora, sharding, cluster.gpus, cluster.gpu_memory)["total"]
            if total <= cluster.gpu_memory:
                out.append(
                    f"LoRA r=16 on attention + shared experts fits with {sharding.name} ({_gib(total)})"
                )
                break
    for sharding in SHARDINGS[2:]:
        nodes = _nodes_needed(work, sharding, cluster)
        if nodes:
            total = estimate(work, sharding, nodes * cluster.gpus_per_node, cluster.gpu_memory)["total"]
            out.append(
                f"{sharding.name} fits on {nodes} nodes × {cluster.gpus_per_node} GPUs ({_gib(total)})"
            )
            break
    else:
        if not vllm:  # else vLLM's share, which more GPUs do not shrink, is what is too big
            out.append(
                "no number of GPUs is enough: activations alone are too big — lower "
                "per_device_train_batch_size or the sequence length, or turn on gradient_checkpointing"
            )
    return out


def _vllm_hints(work: Workload, cluster: Cluster) -> list[str]:
    """When training alone would fit: how much of each GPU a colocated vLLM may take, or server mode."""
    if not work.vllm:
        return []
    without = dataclasses.replace(work, vllm=0.0)
    for sharding in SHARDINGS:
        rest = estimate(without, sharding, cluster.gpus)["total"]
        room = (cluster.gpu_memory - rest) / cluster.gpu_memory
        if room > 0.05:  # less would not hold the policy's weights and a useful KV cache
            return [
                f"vllm_gpu_memory_utilization at most {room:.2f} (not {work.vllm}) leaves training room "
                f"with {sharding.name}; or vllm_mode: server (vLLM on GPUs of its own)"
            ]
        if room > 0:
            return [f"vllm_mode: server (vLLM on GPUs of its own): training alone fits with {sharding.name}"]
    return []


def _sampling_hint(work: Workload) -> str:
    if work.vllm:
        return "raise generation.vllm.tensor_parallel_size (the weights over more GPUs), or serve the model"
    return "generation.backend: vllm with tensor_parallel_size, or a server (the weights whole on each GPU)"


def _nodes_needed(work: Workload, sharding: Sharding, cluster: Cluster, limit: int = 4096) -> int | None:
    nodes = cluster.nodes
    while nodes <= limit:
        if (
            estimate(work, sharding, nodes * cluster.gpus_per_node, cluster.gpu_memory)["total"]
            <= cluster.gpu_memory
        ):
            return nodes
        nodes *= 2
    return None


def _lora_size(model: ModelShape, r: int = 16) -> int:
    targets = ["attention", "shared_experts"] if model.is_moe else ["attention", "dense_mlp"]
    return count(model.model, targets, r)["total"]


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def accelerate_config(name: str) -> Path:
    """The shipped accelerate config file of a sharding (recipes/accelerate/<name>.yaml)."""
    return PRESETS.parent / "accelerate" / f"{name}.yaml"


def recommend(stages: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The lightest shipped setting under which every estimated stage fits (one launch runs them all)."""
    planned = [s for s in stages if "estimates" in s]
    for sharding in SHARDINGS:
        if planned and all(sharding.name in s["fits_with"] for s in planned):
            return {
                "sharding": sharding.name,
                "zero_stage": sharding.zero_stage,
                "accelerate_config": str(accelerate_config(sharding.name)),
            }
    return None


# --------------------------------------------------------------------------- from a recipe


def trainer_workload(
    recipe: Any,
    shapes: dict[int, ModelShape],
    model: Any,
    train: dict[str, Any],
    lora: Any = None,
    moe: Any = None,
    reference: bool | None = None,
    frozen: tuple[Frozen, ...] = (),
    config: Any = None,
) -> Workload | str:
    """The Workload of a trainer stage, from its model slot's config and its trl settings (`train:`
    over trl's defaults, `recipe.trainer_settings`); a reason string when the config is not
    available offline. `shapes` caches one ModelShape per architecture across the stages.
    `reference`: whether the trainer holds a frozen copy of the policy; None: when `beta` > 0 and
    without LoRA (trl's RL trainers; under LoRA the reference is the model with its adapter off).
    `frozen`: the other models it holds (reward models, a teacher); `config`: the model's config
    when `model` is not a slot (a student derived from its teacher)."""
    shape_of = config_shape(config, shapes) if config is not None else model_shape(recipe, model, shapes)
    if shape_of is None:
        return "model config not available offline"
    if reference is None:
        reference = (train.get("beta") or 0) > 0 and lora is None
    if reference:  # trl keeps a reference copy of the policy
        frozen = (Frozen("reference model", shape_of.total), *frozen)
    seq = train.get("max_length") or (train.get("max_prompt_length") or PROMPT_TOKENS) + (
        train.get("max_completion_length") or 0
    )
    batch = int(train.get("per_device_train_batch_size") or 8)
    steps_per_generation = train.get("steps_per_generation") or train.get("gradient_accumulation_steps") or 1
    share, where = vllm_share(train)
    generates = "num_generations" in train and not train.get("use_vllm")  # else vLLM holds the cache
    return Workload(
        model=shape_of,
        trainable=_trainable(shape_of, lora, moe),
        lora=lora is not None,
        frozen=tuple(frozen),
        batch=batch,
        seq=int(seq or 1024),
        gradient_checkpointing=bool(train.get("gradient_checkpointing", True)),
        bf16=train.get("bf16") is not False and not train.get("fp16"),
        generating=batch * steps_per_generation if generates else 0,
        vllm=share,
        vllm_note=where,
    )


VLLM_SERVER = "server mode: vLLM runs on GPUs of its own, nothing on the training GPUs"


def vllm_share(train: dict[str, Any]) -> tuple[float, str]:
    """trl's vLLM generation: the share of each training GPU it reserves (`vllm_gpu_memory_utilization`,
    trl's default when the recipe leaves it out: `train` holds trl's defaults), and where it runs."""
    if not train.get("use_vllm"):
        return 0.0, ""
    if train.get("vllm_mode", "colocate") == "server":
        return 0.0, VLLM_SERVER
    return float(train["vllm_gpu_memory_utilization"]), "colocate: in the training processes"


def model_shape(recipe: Any, ref: Any, shapes: dict[int, ModelShape]) -> ModelShape | None:
    """A model slot's shape (None: its config is not available offline)."""
    config = model_config(recipe, ref)
    return None if config is None else config_shape(config, shapes)


def config_shape(config: Any, shapes: dict[int, ModelShape]) -> ModelShape:
    """The shape of a config, built once per architecture (`shapes` is the cache)."""
    key = hash(config.to_json_string(use_diff=False))
    if key not in shapes:
        shapes[key] = shape(config)
    return shapes[key]


def scorer_params(model: ModelShape) -> int:
    """A sequence-classification reward model on this causal LM: the same body without its untied
    output layer (the one-logit score head is negligible)."""
    meta = model.model
    if meta is None or meta.get_output_embeddings() is None:
        return model.total
    head = meta.get_output_embeddings().weight
    tied = head is meta.get_input_embeddings().weight
    return model.total - (0 if tied else head.numel())


def _trainable(model: ModelShape, lora: Any, moe: Any) -> int:
    if lora is not None:
        targets = named_targets(lora, model.model)
        if targets is not None:
            return count(model.model, targets, lora.r)["total"]
        return count_modules(model.model, lora.target_modules, lora.target_parameters, lora.r)
    frozen_routers = moe is not None and moe.router == "freeze"
    return model.total - (model.routers if frozen_routers else 0)
