"""Preference optimisation of the policy itself, on pairs (an `rlaif_label` stage's, or any
prompt/chosen/rejected data): `dpo` (trl's DPOTrainer), `kto` (KTOTrainer: the same pairs
unpaired, or rows with a boolean `label`) and `orpo` (trl.experimental.orpo: no reference model).

They share what they read and how the judge's soft labels `p_chosen` are used
(`PreferenceStage`); each kind adds only its `kind` and its trl config."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from posttrain.recipe.base import ModelRef
from posttrain.recipe.data import DataSpec
from posttrain.recipe.stages import GuardSpec, StageBase
from posttrain.recipe.training import LoraSpec, MoESpec

# DPOConfig loss types that read `label_smoothing` (the others ignore it): what `soft_labels: smooth` needs.
SMOOTHED_LOSSES = ("robust", "exo_pair", "aot", "aot_unpaired")


class PreferenceStage(StageBase):
    """What every preference-optimisation kind reads: a policy, pairs, a held-out split of prompts,
    and what the pairs' soft labels do.

    `soft_labels` (only where the rows carry `p_chosen`, as an `rlaif_label` stage's do):
    `filter` trains on the pairs whose p_chosen is at least `min_p_chosen` (the judge was sure);
    `smooth` keeps them all and sets trl's `label_smoothing` to the mean chance that a pair's label
    is flipped, 1 - p_chosen (robust DPO reads it as exactly that); `ignore` trains on every pair
    as if p_chosen were 1."""

    model: ModelRef | None = (
        None  # the policy (and the reference): a stage name, {path: ...}; absent = base_model
    )
    data: DataSpec  # a label stage, or rows with prompt/chosen/rejected (p_chosen optional)
    soft_labels: Literal["filter", "smooth", "ignore"] = "filter"
    min_p_chosen: float = Field(0.75, ge=0.5, le=1)  # `filter`: the least confident pair kept
    eval_fraction: float = Field(0.1, ge=0, lt=1)  # share of prompts held out for pairwise accuracy
    lora: LoraSpec | None = None  # the reference is then the model with its adapter off (no copy)
    moe: MoESpec = MoESpec()  # routers frozen and no aux loss unless set here (as in RL)
    guard: GuardSpec = GuardSpec()  # NaN/inf loss: stop (default) or warn


class DPOStage(PreferenceStage):
    """Direct preference optimisation (Rafailov et al. 2023) with trl's DPOTrainer: every DPOConfig
    `loss_type` (sigmoid, ipo, hinge, robust, ...; a list combines them with `loss_weights`).
    metrics.json: the implicit reward's pairwise accuracy and margin on held-out prompts."""

    kind: Literal["dpo"]
    train: dict[str, Any] = {}  # keys of trl's DPOConfig
    trainer_config: ClassVar[str | None] = "DPOConfig"

    @model_validator(mode="after")
    def _smoothing(self) -> DPOStage:
        losses = self.train.get("loss_type", "sigmoid")
        losses = [losses] if isinstance(losses, str) else losses
        if not (isinstance(losses, list) and all(isinstance(loss, str) for loss in losses)):
            raise ValueError(f"train.loss_type must be a loss name or a list of them, got {losses!r}")
        if self.soft_labels == "smooth":
            if "label_smoothing" in self.train:
                raise ValueError("soft_labels: smooth sets train.label_smoothing; set one of them")
            if not set(losses) & set(SMOOTHED_LOSSES):
                raise ValueError(
                    f"soft_labels: smooth sets label_smoothing, which loss_type {losses} ignores; "
                    f"use a loss_type that reads it ({', '.join(SMOOTHED_LOSSES)}), or soft_labels: filter"
                )
        return self


class KTOStage(PreferenceStage):
    """Kahneman-Tversky optimisation (Ethayarajh et al. 2024) with trl's KTOTrainer: each pair's chosen
    answer is a desirable example and its rejected one an undesirable example; or unpaired rows of
    prompt/completion with a boolean `label`."""

    kind: Literal["kto"]
    soft_labels: Literal["filter", "ignore"] = "filter"  # KTO has no label smoothing
    train: dict[str, Any] = {}  # keys of trl's KTOConfig
    trainer_config: ClassVar[str | None] = "KTOConfig"


class ORPOStage(PreferenceStage):
    """Odds-ratio preference optimisation (Hong et al. 2024) with trl's experimental ORPOTrainer:
    SFT on the chosen answers plus a log-odds-ratio penalty on the rejected ones, with no reference
    model (half DPO's memory). Experimental in trl 1.16 (`trl.experimental.orpo`)."""

    kind: Literal["orpo"]
    soft_labels: Literal["filter", "ignore"] = "filter"  # ORPO has no label smoothing
    train: dict[str, Any] = {}  # keys of trl's experimental ORPOConfig
    trainer_config: ClassVar[str | None] = "experimental.orpo.ORPOConfig"
