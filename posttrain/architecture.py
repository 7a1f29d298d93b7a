"""What a recipe's models look like, from their configs alone: no weights are read.

`stage_config(recipe, ref)` resolves a model slot to a transformers config (a preset's JSON,
a local `config.json`, a cached hub config, or, for a stage name, the model that stage
trains), and `shape(config)` builds the model on PyTorch's `meta` device (instant even for
DeepSeek-V3's 671 B parameters) to count what the memory planner needs: total, active and
router parameters, the largest layer and MoE block (what ZeRO-3 gathers at once), and the
dimensions behind the activation estimate.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from posttrain import artifacts
from posttrain.recipe import PathModel, PresetModel, Recipe


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


def stage_config(recipe: Recipe, ref: Any, _seen: tuple[str, ...] = ()) -> Any | None:
    """The transformers config behind a model slot, or None when it cannot be read offline."""
    from transformers import AutoConfig

    if ref is None:
        ref = recipe.base_model
    if isinstance(ref, PresetModel):
        return preset_config(ref.preset)
    if isinstance(ref, str) and ref in recipe.stage_names() and ref not in _seen:
        return stage_config(recipe, starts_from(recipe.stage(ref)), (*_seen, ref))
    source = ref if isinstance(ref, PathModel) else PathModel(path=str(ref))
    try:
        return AutoConfig.from_pretrained(
            source.path, revision=source.revision, trust_remote_code=source.trust_remote_code
        )
    except (OSError, ValueError):  # not local and not in the hub cache (offline), or not a model
        return None


def starts_from(stage: Any) -> Any:
    """The model slot a stage's model comes from: its `model`, a distill `teacher`, a labelling
    `policy`; None is the base model."""
    return next((getattr(stage, k) for k in ("model", "teacher", "policy") if hasattr(stage, k)), None)


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
        ref = starts_from(recipe.stage(ref))
    ref = recipe.base_model if ref is None else ref
    return ref if isinstance(ref, PresetModel | PathModel) else PathModel(path=str(ref))


def preset_config(name: str) -> Any:
    """The config `materialize_preset` would build (same vocabulary), without building the model."""
    from transformers import AutoConfig, AutoTokenizer

    from posttrain.models import TOKENIZER_DIR
    from posttrain.models import preset_config as preset_spec

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
    from posttrain.models import count_parameters
    from posttrain.moe import block_routers, expert_count, moe_blocks

    model = meta_model(config)
    counts = count_parameters(model)
    blocks = moe_blocks(model)
    n_experts, top_k = expert_count(model)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
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


def check_moe(stage: Any, recipe: Recipe, path: tuple) -> None:
    """What a stage's `moe:` block asks must exist in its model, checked from the config alone
    (skipped when the block is left default or the config is not available offline)."""
    spec = getattr(stage, "moe", None)
    if spec is None or not spec.model_fields_set:
        return
    config = stage_config(recipe, getattr(stage, "model", None))
    if config is None:
        return
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    experts = any(getattr(text, k, None) for k in ("n_routed_experts", "num_local_experts", "num_experts"))
    if not experts:
        raise recipe.error((*path, "moe"), "the model has no routed experts", "remove `moe:`")
    if spec.aux_loss_coef is not None and not hasattr(text, "router_aux_loss_coef"):
        raise recipe.error(
            (*path, "moe", "aux_loss_coef"),
            f"{text.model_type} has no router auxiliary loss in transformers",
            "DeepSeek-V3-style models balance with `moe.bias_update_rate` instead",
        )
    if spec.bias_update_rate:
        from posttrain.moe import has_bias_balancing, moe_blocks

        if not all(has_bias_balancing(b) for b in moe_blocks(meta_model(config)).values()):
            raise recipe.error(
                (*path, "moe", "bias_update_rate"),
                f"{text.model_type} routers have no e_score_correction_bias to update",
                "bias balancing is for DeepSeek-V3-style routers; use `moe.aux_loss_coef`",
            )
