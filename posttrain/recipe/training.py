"""What training stages add on top of a model and data: LoRA adapters (`LoraSpec`, checked
against peft's LoraConfig), how a Mixture-of-Experts model trains (`MoESpec`: routers, aux
loss, bias balancing), and rewards (`RewardSpec`, shared by GRPO, distillation verifiers and
the reward judge), whose options are checked against the reward's factory when the recipe loads
(posttrain.loading, above the schema: the reward registry is code, not schema)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from posttrain.recipe.base import ModelRef, Strict

LoraTarget = Literal["attention", "dense_mlp", "shared_experts", "routed_experts"]


class LoraSpec(Strict):
    """peft LoRA options. `alpha` and `dropout` are short for `lora_alpha` and `lora_dropout`; any other
    key of peft's LoraConfig is passed through (checked against it). For MoE models, fused expert
    weights (`mlp.experts.gate_up_proj`) are reached through `target_parameters`.

    `targets` names what to adapt instead of listing modules: `attention`, `dense_mlp` (the
    dense FFN layers), `shared_experts`, `routed_experts` (fused expert weights, per-expert
    LoRA), or `all`; posttrain finds the matching modules in the model (see docs/moe.md for
    trainable-parameter counts)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    r: int = Field(16, gt=0)
    alpha: float = 32
    dropout: float = Field(0.0, ge=0, lt=1)  # must stay 0 where LoRA wraps fused expert parameters
    targets: list[LoraTarget] | Literal["all"] | None = None
    target_modules: list[str] | str | None = "all-linear"
    target_parameters: list[str] | None = None
    merge: bool = True  # merge into model/ at the end; false saves the adapter alone

    @model_validator(mode="after")
    def _dropout(self) -> LoraSpec:
        if self.target_parameters and self.dropout:
            raise ValueError(
                "dropout must be 0 with target_parameters (peft's ParamWrapper does not support it)"
            )
        if self.targets is not None:
            explicit = {"target_modules", "target_parameters"} & self.model_fields_set
            if explicit:
                raise ValueError(f"use either targets or {' / '.join(sorted(explicit))}, not both")
            if self.dropout and (self.targets == "all" or "routed_experts" in self.targets):
                raise ValueError(
                    "dropout must be 0 when targets include routed_experts (fused expert weights)"
                )
        return self

    def peft_kwargs(self) -> dict[str, Any]:
        """LoraConfig keyword arguments; with `targets`, the model fills in the modules (lora_targets)."""
        extra = dict(self.model_extra or {})
        return {
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": None if self.targets is not None else self.target_modules,
            "target_parameters": None if self.targets is not None else self.target_parameters,
            **extra,
        }


class MoESpec(Strict):
    """How a stage trains a Mixture-of-Experts model (an error on a dense model, unless left default).

    Router metrics (`moe/...`: tokens per expert, load CV, entropy, dead experts) are logged
    whenever the model has experts."""

    # train | freeze the router weights. Unset: the stage kind decides (SFT trains them in full
    # fine-tunes; under LoRA they stay frozen; GRPO freezes them, as router updates and aux
    # losses destabilise RL). `train` with LoRA trains them in full via peft's modules_to_save.
    router: Literal["train", "freeze"] | None = None
    # Load-balancing auxiliary loss weight, for models that have one (Mixtral, Qwen-MoE, GPT-OSS);
    # sets trl's router_aux_loss_coef. 0 turns it off. DeepSeek-V3 has none: use bias_update_rate.
    aux_loss_coef: float | None = Field(None, ge=0)
    # DeepSeek-V3's auxiliary-loss-free balancing: after every step, each expert's
    # e_score_correction_bias moves by this much against its load (DeepSeek-V3 used 0.001).
    bias_update_rate: float = Field(0.0, ge=0)
    metrics: bool = True  # log router metrics (forward hooks, cheap)

    @model_validator(mode="after")
    def _consistent(self) -> MoESpec:
        if self.router == "freeze" and self.aux_loss_coef:
            raise ValueError("aux_loss_coef trains the routers, but router is freeze; set one of them")
        return self


class RewardSpec(Strict):
    """One reward: `{name: accuracy, weight: 1.0, <its options>}`. `name` is a registered reward
    (`posttrain rewards list`) or `package.module:function`; every other key is an option of that
    reward, checked against its factory's signature when the recipe loads (posttrain.loading)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str
    weight: float = 1.0
    model: ModelRef | None = None  # for rewards that score with a model: a stage name or a path
    label: str | None = None  # its name in metrics and samples.jsonl (default: the reward's name)

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @property
    def display_name(self) -> str:
        """The name the reward goes by in metrics and samples: `label`, else its name (an import
        path's function name)."""
        return self.label or self.name.rpartition(":")[2]
