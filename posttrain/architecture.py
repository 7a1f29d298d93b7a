"""What a recipe's models look like, from their configs alone: no weights are read.

`model_config(recipe, ref)` resolves a model slot to a transformers config (a preset's JSON,
a local `config.json`, a cached hub config, or, for a stage name, the model that stage
trains), and `shape(config)` builds the model on PyTorch's `meta` device (instant even for
DeepSeek-V3's 671 B parameters) to count what the memory planner needs: total, active and
router parameters, the largest layer and MoE block (what ZeRO-3 gathers at once), and the
dimensions behind the activation estimate.

It also finds a model's Mixture-of-Experts pieces by shape (`moe_blocks`: a module with an
`experts` child and a `gate` or `router` child; DeepSeek-V2/V3, Mixtral, Qwen-MoE, GPT-OSS...),
and checks a stage's `moe:` block against them (`moe_problem`): from the config and a meta
model when the recipe loads, on the loaded model when the stage starts (posttrain.moe).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from posttrain import artifacts
from posttrain.errors import PosttrainError
from posttrain.models import TOKENIZER_DIR, count_parameters, preset_spec
from posttrain.recipe import MoESpec, PathModel, PresetModel, Recipe

# The config keys that hold the number of routed experts per layer, by model family.
EXPERT_COUNT_KEYS = ("n_routed_experts", "num_local_experts", "num_experts")
LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


def text_config(config: Any) -> Any:
    """The language model's part of a config (a multimodal model's text config; a text model's own)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def routed_experts(config: Any) -> int:
    """Routed experts per layer from a config (0 for a dense model)."""
    text = text_config(config)
    return int(next((getattr(text, key) for key in EXPERT_COUNT_KEYS if getattr(text, key, None)), 0))


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """Parameter counts and dimensions of one architecture (see `shape`)."""

    name: str
    total: int
    active: int  # per token: everything but the routed experts, plus top-k of them
    routers: int
    largest_layer: int  # parameters of the biggest decoder layer (ZeRO-3 gathers one at a time)
    largest_moe_block: int  # the biggest MoE block, gathered whole when it is a ZeRO-3 leaf module
    layers: int
    hidden: int
    vocab: int
    mlp_width: int  # intermediate units one token passes through per layer (top-k experts + shared)
    n_experts: int
    top_k: int
    model: Any = dataclasses.field(default=None, compare=False, repr=False)  # on meta: for LoRA counts

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0


def model_config(recipe: Recipe, ref: Any, _seen: tuple[str, ...] = ()) -> Any | None:
    """The transformers config behind a model slot, or None when it cannot be read offline."""
    from transformers import AutoConfig

    if ref is None:
        ref = recipe.base_model
    if isinstance(ref, PresetModel):
        return preset_model_config(ref.preset)
    if isinstance(ref, str) and ref in recipe.stage_names() and ref not in _seen:
        return model_config(recipe, recipe.stage(ref).starting_model(), (*_seen, ref))
    source = ref if isinstance(ref, PathModel) else PathModel(path=str(ref))
    try:
        return AutoConfig.from_pretrained(
            source.path, revision=source.revision, trust_remote_code=source.trust_remote_code
        )
    except (OSError, ValueError):  # not local and not in the hub cache (offline), or not a model
        return None


def model_source(recipe: Recipe, ref: Any) -> PresetModel | PathModel:
    """Where a model slot's files are, without reading them: a finished stage's own `model/`,
    else (following stage references to the model they start from) the preset or path at the
    root; None is the base model."""
    seen: set[str] = set()
    while isinstance(ref, str) and ref in recipe.stage_names() and ref not in seen:
        seen.add(ref)
        done = recipe.run_dir / ref / artifacts.MODEL
        if (done / artifacts.MODEL_CONFIG).exists():
            return PathModel(path=str(done))
        ref = recipe.stage(ref).starting_model()
    ref = recipe.base_model if ref is None else ref
    return ref if isinstance(ref, PresetModel | PathModel) else PathModel(path=str(ref))


def model_max_positions(recipe: Recipe, ref: Any) -> int | None:
    """The policy's max_position_embeddings from its config alone (preset file, local config.json,
    or by following a stage's own `model:`); None when it cannot be known without the hub."""
    source = model_source(recipe, ref)
    if isinstance(source, PresetModel):
        return preset_spec(source.preset).get("max_position_embeddings")
    path = Path(source.path).expanduser() / artifacts.MODEL_CONFIG
    return config_positions(path) if path.exists() else None


def config_positions(path: Path) -> int | None:
    config = artifacts.read_json(path) or {}
    return config.get("max_position_embeddings") or config.get("text_config", {}).get(
        "max_position_embeddings"
    )


def preset_model_config(name: str) -> Any:
    """The transformers config `materialize_preset` would build (same vocabulary), without the model."""
    from transformers import AutoConfig, AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(TOKENIZER_DIR)))
    return AutoConfig.for_model(**preset_spec(name), vocab_size=vocab)


def meta_model(config: Any) -> Any:
    """The model built on the `meta` device: shapes without memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(
            config, trust_remote_code=bool(getattr(config, "auto_map", None))
        )


def shape(config: Any) -> ModelShape:
    """Count a model's parameters by building it on the meta device."""
    model = meta_model(config)
    counts = count_parameters(model)
    blocks = moe_blocks(model)
    n_experts, top_k = expert_count(model)
    text = text_config(config)
    layers = [m for name, m in model.named_modules() if _is_layer(name)]
    moe_width = getattr(text, "moe_intermediate_size", None) or getattr(text, "intermediate_size", 0)
    shared = getattr(text, "n_shared_experts", 0) or 0
    dense_width = getattr(text, "intermediate_size", 0) or 0
    return ModelShape(
        name=str(getattr(config, "_name_or_path", "") or getattr(config, "model_type", "model")),
        total=counts["total"],
        active=counts.get("active", counts["total"]),
        routers=sum(p.numel() for b in blocks.values() for r in block_routers(b) for p in r.parameters()),
        largest_layer=max((_params(m) for m in layers), default=0),
        largest_moe_block=max((_params(b) for b in blocks.values()), default=0),
        layers=int(getattr(text, "num_hidden_layers", len(layers))),
        hidden=int(text.hidden_size),
        vocab=int(text.vocab_size),
        mlp_width=int((top_k + shared) * moe_width if blocks else dense_width),
        n_experts=n_experts if blocks else 0,
        top_k=top_k if blocks else 0,
        model=model,
    )


def _is_layer(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 2 and parts[-2] in ("layers", "h", "blocks") and parts[-1].isdigit()


def _params(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- mixture of experts


def moe_blocks(model: Any) -> dict[str, Any]:
    """{label: block} for every MoE block, labelled `layer_<i>` by its decoder layer."""
    blocks: dict[str, Any] = {}
    for name, module in model.named_modules():
        children = dict(module.named_children())
        if "experts" in children and ("gate" in children or "router" in children):
            match = LAYER_INDEX.search(name + ".")
            blocks[f"layer_{match.group(1)}" if match else name] = module
    return blocks


def block_routers(block: Any) -> list[Any]:
    """The router of a block, and its copies when peft wraps it (`modules_to_save`)."""
    gate = block.gate if hasattr(block, "gate") else block.router
    cls = type(getattr(gate, "original_module", gate))
    return [m for m in gate.modules() if type(m) is cls]


def expert_count(model: Any) -> tuple[int, int]:
    """(routed experts per layer, experts per token) from the model's config."""
    return routed_experts(model.config), int(
        getattr(text_config(model.config), "num_experts_per_tok", 0) or 0
    )


def has_bias_balancing(block: Any) -> bool:
    """DeepSeek-V3-style routers carry `e_score_correction_bias` for auxiliary-loss-free balancing."""
    return all(hasattr(r, "e_score_correction_bias") for r in block_routers(block))


def moe_problem(spec: MoESpec, config: Any, blocks: dict[str, Any]) -> tuple[str | None, str, str] | None:
    """(key under `moe:` or None, message, fix) when a stage's `moe:` block asks for what the model
    lacks: experts, a router auxiliary loss, routers with a correction bias; None when it fits."""
    text = text_config(config)
    if not blocks:
        return None, "the model has no routed experts", "remove `moe:`"
    if spec.aux_loss_coef is not None and not hasattr(text, "router_aux_loss_coef"):
        return (
            "aux_loss_coef",
            f"{text.model_type} has no router auxiliary loss in transformers",
            "DeepSeek-V3-style models balance with `moe.bias_update_rate` instead",
        )
    if spec.bias_update_rate and not all(has_bias_balancing(b) for b in blocks.values()):
        return (
            "bias_update_rate",
            f"{text.model_type} routers have no e_score_correction_bias to update",
            "bias balancing is for DeepSeek-V3-style routers; use `moe.aux_loss_coef`",
        )
    return None


def check_moe(spec: MoESpec, model: Any, recipe: Recipe, path: tuple) -> None:
    """Recipe time: what a stage's `moe:` block asks exists in `model` (its slot), from the config
    and a meta model alone; skipped when the block is left default or the config is not available
    offline. The stage checks the loaded model again (`moe.prepare`)."""
    if not spec.model_fields_set:
        return
    config = model_config(recipe, model)
    if config is None:
        return
    problem = moe_problem(spec, config, moe_blocks(meta_model(config)))
    if problem:
        key, message, fix = problem
        raise recipe.error((*path, "moe", *([key] if key else [])), message, fix)


def require_moe_fits(spec: MoESpec, model: Any, blocks: dict[str, Any]) -> None:
    """Stage time: the same check on the loaded model, as one PosttrainError."""
    problem = moe_problem(spec, model.config, blocks)
    if problem:
        key, message, fix = problem
        raise PosttrainError(message, key=f"moe.{key}" if key else "moe", fix=fix)
