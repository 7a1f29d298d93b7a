"""What every stage is (`StageBase`: name, kind, gate, its trl config, the model it starts from,
the models it saves), the guard against NaN losses and dead reward signal, and the stage kinds
built from the shared blocks alone: `sft`, `evaluate`, `grpo` and `rloo`. Distillation and RLAIF stages
live in distill.py and rlaif.py; STAGE_REGISTRY (schema.py) lists them all, each with its module
in posttrain/stages/ (which holds the kind's recipe-time checks that need more than the schema)."""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from posttrain.recipe.base import ModelRef, Strict
from posttrain.recipe.data import DataSpec
from posttrain.recipe.evaluation import EvalOptions, GateSpec
from posttrain.recipe.training import LoraSpec, MoESpec, RewardSpec

STAGE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


class GuardSpec(Strict):
    """What to do when training goes wrong; checked at every logging step."""

    nan: Literal["stop", "warn"] = "stop"  # the loss or gradient norm became NaN or inf
    constant_reward_steps: int | None = Field(None, gt=0)  # RL: logged steps in a row where every
    constant_reward: Literal["stop", "warn"] = "warn"  # group scored alike (no learning signal)


class RLGuardSpec(GuardSpec):
    """An RL stage's guard: also watches a learned reward (a reward model, a judge: any reward with
    a `model:`) mixed with verifiable ones for reward hacking (posttrain/reward_hacking.py)."""

    # Logged steps over which the learned reward rising while the verifiable rewards fall counts as
    # hacking (None: not watched). Only where the stage mixes the two.
    reward_hacking_steps: int | None = Field(8, ge=3)
    reward_hacking: Literal["stop", "warn"] = "warn"


class StageBase(Strict):
    name: str
    kind: str
    gate: GateSpec | None = None  # e.g. {min_accuracy: 0.6}; not part of the stage's fingerprint
    # The trl config dataclass whose fields the `train:` block may set (None: no trainer).
    trainer_config: ClassVar[str | None] = None
    # Whether `<stage>/model/` is a generative model the recipe's `eval:` can run (a reward model is not).
    generative: ClassVar[bool] = True
    # The field that holds the model this stage starts from (None: none; unset: the base model).
    start_field: ClassVar[str | None] = "model"

    @model_validator(mode="after")
    def _name(self) -> StageBase:
        if not STAGE_NAME.match(self.name):
            raise ValueError(
                f"stage name '{self.name}' must start with a letter and use only letters, digits, _ and -"
            )
        return self

    def trainer_blocks(self) -> dict[str, str]:
        """Each block of trl config keys in this stage and the config class it feeds."""
        return {"train": self.trainer_config} if self.trainer_config else {}

    def starting_model(self) -> Any:
        """The model slot this stage's model comes from (its `model`, a distill `teacher`, a
        labelling `policy`); None is the base model."""
        return getattr(self, self.start_field) if self.start_field else None

    def saved_models(self) -> list[str]:
        """Where under its folder the stage saves models: "" is its own model folder (every trainer
        stage); a distill stage saves one per student, under the student's name."""
        return [""] if self.trainer_config else []


class SFTStage(StageBase):
    """Supervised fine-tuning with trl's SFTTrainer, full or LoRA.

    Data rows hold `messages` (a conversation), `prompt` + `completion`, or `text`. The loss
    covers every assistant turn and nothing else, whatever the chat template (trl's mask where
    it has `{% generation %}` markers, spans posttrain derives otherwise), unless
    `train.assistant_only_loss: false`."""

    kind: Literal["sft"]
    model: ModelRef | None = None  # a stage name, {path: ...} or {preset: ...}; absent = base_model
    data: DataSpec
    # Train with this chat template instead of the tokenizer's, and save it with the model: a
    # .jinja file, or a template trl ships (llama3, qwen2_5, gemma, deepseekv3, ..., `*_training`).
    chat_template: str | None = None
    lora: LoraSpec | None = None
    moe: MoESpec = MoESpec()  # router train/freeze, aux loss, bias balancing (MoE models)
    guard: GuardSpec = GuardSpec()  # NaN/inf loss: stop (default) or warn
    train: dict[str, Any] = {}  # keys of trl's SFTConfig
    trainer_config: ClassVar[str | None] = "SFTConfig"


class EvaluateStage(EvalOptions, StageBase):
    """Evaluate a model (a stage's, the base model, or any path) on a held-out set, and optionally
    on lm-eval benchmark suites. Writes metrics.json (`eval`) and eval_samples.jsonl, no model."""

    kind: Literal["evaluate"]
    model: ModelRef | None = None  # absent = base_model
    data: DataSpec | None = None  # absent = the recipe's eval.data (unset options also come from eval:)


# --------------------------------------------------------------------------- grpo, rloo


class RLStage(StageBase):
    """What the online RL kinds (grpo, rloo) share: a policy, prompts, and a list of rewards whose
    weights become the trl config's reward_weights. Checked before any weights load: the
    generation batch divides into groups of `num_generations`, the rewards' columns exist in
    the data, `max_completion_length` fits the model (posttrain/stages/grpo.py)."""

    model: ModelRef | None = (
        None  # the policy: a stage name, {path: ...} or {preset: ...}; absent = base_model
    )
    data: DataSpec
    rewards: list[RewardSpec] = Field(min_length=1)
    system_prompt: str | None = None  # sent before every prompt (a plain-text prompt becomes a user turn)
    lora: LoraSpec | None = None
    moe: MoESpec = MoESpec()  # routers frozen and no aux loss unless set here (MoE models)
    # NaN/inf loss; 10 logged steps without signal; reward hacking over 8 logged steps (warn)
    guard: RLGuardSpec = RLGuardSpec(constant_reward_steps=10)
    train: dict[str, Any] = {}  # keys of the kind's trl config

    @model_validator(mode="after")
    def _rewards(self) -> RLStage:
        if "reward_weights" in self.train:
            raise ValueError("set `weight:` on each reward instead of train.reward_weights")
        labels = [r.display_name for r in self.rewards]
        twice = sorted({label for label in labels if labels.count(label) > 1})
        if twice:
            raise ValueError(f"two rewards are called '{twice[0]}'; give one a `label:`")
        return self


class GRPOStage(RLStage):
    """GRPO with verifiable rewards (DeepSeek-R1) through trl's GRPOTrainer, full or LoRA.

    Data rows hold `prompt` plus the columns the rewards read (`answer` for `accuracy`)."""

    kind: Literal["grpo"]
    trainer_config: ClassVar[str | None] = "GRPOConfig"


class RLOOStage(RLStage):
    """REINFORCE leave-one-out (Ahmadian et al. 2024) through trl's RLOOTrainer: each completion's
    baseline is the mean reward of the other completions of its prompt. The same rewards, data,
    samples.jsonl, metrics and guards as grpo."""

    kind: Literal["rloo"]
    trainer_config: ClassVar[str | None] = "RLOOConfig"
