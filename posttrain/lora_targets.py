"""Named LoRA targets for MoE (and dense) models, and their trainable-parameter counts.

`lora: {targets: [attention, shared_experts]}` is turned into peft's `target_modules` (a regex
over the model's module names) and `target_parameters` (fused 3-D expert weights, which peft
adapts per expert) by looking at the model itself:

    attention       Linear layers under `self_attn` / `attention` / `attn`
    dense_mlp       the FFN of dense layers (DeepSeek-V3's first `first_k_dense_replace` layers)
    shared_experts  the always-on shared experts (DeepSeek, Qwen2-MoE)
    routed_experts  every routed expert: fused `experts.gate_up_proj` / `experts.down_proj`
                    parameters, or the Linear layers of an `experts` ModuleList

peft 0.21 rewrites, for DeepSeek/Qwen MoE models, every target ending in `gate_proj`, `up_proj`
or `down_proj` into the fused routed experts (its transformers-v4 adapter compatibility, peft
issue #3711), so a LoRA meant for shared experts or dense MLPs lands on the routed experts.
`literal_targets()` turns that rewrite off while named targets are applied and while saved
adapters (whose config is already in v5 terms) are reloaded.

Routers and embeddings are never LoRA targets (`moe.router: train` trains routers in full).
`count` gives the exact number of LoRA parameters without building adapters, so it works on
a model built on the `meta` device (see posttrain.architecture).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator
from typing import Any

from posttrain.errors import PosttrainError

TARGETS = ("attention", "dense_mlp", "shared_experts", "routed_experts")
ATTENTION = {"self_attn", "attention", "attn", "self_attention"}
MLP = {"mlp", "feed_forward", "ffn", "block_sparse_moe"}
ROUTERS = {"gate", "router", "shared_expert_gate"}


def group_of(name: str) -> str | None:
    """The target group of a module (or 3-D parameter) by its dotted name, or None."""
    parts = name.split(".")
    if parts[-1] in ROUTERS:
        return None
    if "experts" in parts:
        return "routed_experts"
    if any(p.startswith("shared_expert") for p in parts):
        return "shared_experts"
    if ATTENTION & set(parts):
        return "attention"
    if MLP & set(parts):
        return "dense_mlp"
    return None


def expand(targets: Iterable[str] | str) -> list[str]:
    return list(TARGETS) if targets == "all" else list(targets)


def find(model: Any, targets: Iterable[str] | str) -> tuple[list[str], list[str]]:
    """(Linear module names, fused expert parameter names) of `model` in the chosen groups."""
    import torch

    wanted = set(expand(targets))
    modules, params = [], []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and group_of(name) in wanted:
            modules.append(name)
        for pname, param in module.named_parameters(recurse=False):
            full = f"{name}.{pname}" if name else pname
            if len(_shape(param)) == 3 and group_of(full) in wanted:
                params.append(full)
    return modules, params


def peft_targets(model: Any, targets: Iterable[str] | str) -> dict[str, Any]:
    """`target_modules` as one regex (layer numbers folded into `\\d+`) and `target_parameters`
    as name suffixes, for peft's LoraConfig."""
    modules, params = find(model, targets)
    patterns = sorted({re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(m)) for m in modules})
    suffixes = sorted({re.sub(r"^.*?\.(?=[^.]+\.experts\.)", "", p) for p in params})
    if not patterns and not suffixes:
        raise PosttrainError(
            f"LoRA targets {expand(targets)} match nothing in this model",
            key="lora.targets",
            fix="pick groups the model has (a dense model has no experts), or list target_modules",
        )
    return {
        "target_modules": "^(?:" + "|".join(patterns) + ")$" if patterns else None,
        "target_parameters": suffixes or None,
    }


def count(model: Any, targets: Iterable[str] | str, r: int) -> dict[str, int]:
    """LoRA parameters per group and in total: r·(in+out) per Linear, r·experts·(in+out) per fused
    expert weight (peft gives each expert its own rank-r pair)."""
    import torch

    counts = dict.fromkeys(expand(targets), 0)
    named = dict(model.named_modules())
    for name in find(model, targets)[0]:
        linear: torch.nn.Linear = named[name]
        counts[group_of(name)] += r * (linear.in_features + linear.out_features)
    for name in find(model, targets)[1]:
        module_name, _, pname = name.rpartition(".")
        experts, rows, cols = _shape(getattr(named[module_name], pname))
        counts[group_of(name)] += r * experts * (rows + cols)
    counts["total"] = sum(counts.values())
    return counts


def _shape(param: Any) -> tuple[int, ...]:
    return tuple(getattr(param, "ds_shape", None) or param.shape)


@contextlib.contextmanager
def literal_targets(enabled: bool = True) -> Iterator[None]:
    """Within the block, peft applies LoRA targets as written (see the module docstring)."""
    if not enabled:
        yield
        return
    from peft.utils import transformers_weight_conversion as conversion

    original = conversion.convert_peft_config_for_transformers
    conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None
    try:
        yield
    finally:
        conversion.convert_peft_config_for_transformers = original


def count_modules(
    model: Any, target_modules: list[str] | str | None, target_parameters: list[str] | None, r: int
) -> int:
    """LoRA parameters for explicit peft targets, matched as peft matches them (`all-linear`: every
    Linear but the output head; a string: a regex over full names; a list: names or name
    suffixes). peft's transformers-v4 rewrite of expert names is not modelled."""
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head and _matches(name, target_modules):
            total += r * (module.in_features + module.out_features)
    for name, param in model.named_parameters():
        if target_parameters and any(name == t or name.endswith("." + t) for t in target_parameters):
            shape = _shape(param)
            experts = shape[0] if len(shape) == 3 else 1
            total += r * experts * (shape[-1] + shape[-2])
    return total


def _matches(name: str, targets: list[str] | str | None) -> bool:
    if targets is None:
        return False
    if isinstance(targets, str):
        return targets.lower() == "all-linear" or re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)
