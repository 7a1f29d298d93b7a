"""The recipe: one YAML file that describes a whole post-training run.

`load_recipe(path, overrides)` reads the YAML (keeping line numbers), applies `--set`
overrides, validates it with pydantic and checks every `train:` key against the matching
trl config dataclass, so a typo fails in a second with `file:line: key: message`, not
after an hour of training. Unknown keys are errors everywhere, with a did-you-mean.

A bare string in a model or data slot (`model: sft`, `data: label`) is another stage's
name, or else a path / hub id; `references()` lists them so the runner can order stages.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union  # noqa: UP035

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from posttrain.errors import PosttrainError, did_you_mean, one_of

# --------------------------------------------------------------------------- base types


class Strict(BaseModel):
    """Every recipe block: unknown keys are errors that suggest the closest known key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and cls.model_config.get("extra") == "forbid":
            known = set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias}
            for key in data:
                if key not in known:
                    hint = did_you_mean(key, known) or one_of(known)
                    raise PydanticCustomError(
                        "unknown_key", "unknown key '{key}'; {hint}", {"key": str(key), "hint": hint}
                    )
        return data


class ModelReference(str):
    """A model slot's bare string: a stage name (that stage's `model/`), else a path or hub id."""


class DataReference(str):
    """A data slot's bare string: a stage name (that stage's `data/`), else a file, folder or hub id."""


def _tag(value: Any) -> str:
    if isinstance(value, str):
        return "ref"
    if isinstance(value, dict):
        for key in ("preset", "synthetic", "mix", "path"):
            if key in value:
                return key
    if isinstance(value, BaseModel):
        tags = {PresetModel: "preset", PathModel: "path", SyntheticData: "synthetic", MixtureData: "mix"}
        return tags.get(type(value), "path")
    return "path"


class PresetModel(Strict):
    """A tiny random-initialised model built from `recipes/models/<preset>.json` (offline, seconds)."""

    preset: str


class PathModel(Strict):
    """A model on disk or on the Hugging Face Hub."""

    path: str
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None
    trust_remote_code: bool = False  # off unless the recipe turns it on: remote code runs on your machine


ModelRef = Annotated[
    Annotated[Annotated[str, AfterValidator(ModelReference)], Tag("ref")]
    | Annotated[PresetModel, Tag("preset")]
    | Annotated[PathModel, Tag("path")],
    Discriminator(_tag),
]


# --------------------------------------------------------------------------- data options
# What every data block may add on top of its source: a system turn, duplicate removal,
# decontamination against the evaluation sets, and a curriculum order (data_tools/).


class DedupSpec(Strict):
    """Drop exact duplicates (normalised text) and, with `near`, near-duplicates found by MinHash
    LSH over word n-grams (datasketch). The first row of each duplicate group is kept."""

    near: bool = True
    threshold: float = Field(
        0.8, gt=0, le=1
    )  # estimated Jaccard similarity at which rows count as duplicates
    ngram: int = Field(3, ge=1)  # words per shingle
    num_perm: int = Field(128, ge=16)  # MinHash permutations: more is more precise and slower
    on: list[str] | None = None  # columns that make a row's text; default all text columns


class DecontaminateSpec(Strict):
    """Drop training rows that share an n-gram with an evaluation prompt (open-r1 uses 8-grams).

    `against` defaults to every evaluation set of the recipe (`eval.data` and `evaluate` stages'
    data); the resolved recipe lists them. Evaluation prompts shorter than `ngram` words match as
    a whole word sequence."""

    ngram: int = Field(8, ge=1)
    against: list[DataSpec] = []


class CurriculumSpec(Strict):
    """Order rows by a difficulty column or by length (easy first by default). With `buckets`,
    rows are cut into that many difficulty bands, shuffled within each band (recipe seed).
    Trainers shuffle unless told not to: the stage's `train:` must set
    `train_sampling_strategy: sequential` (SFT, reward model) or `shuffle_dataset: false` (GRPO)."""

    by: str = "difficulty"  # a numeric column, or `length` (characters of the row's text)
    order: Literal["ascending", "descending"] = "ascending"
    buckets: int | None = Field(None, gt=0)


def _on_off(value: Any) -> Any:
    """`dedup: true` / `decontaminate: true` turn a block on with its defaults; `false` turns it off."""
    if value is True:
        return {}
    if value is False:
        return None
    if value == "exact":
        return {"near": False}
    return value


class RowOptions(Strict):
    """Options every data block accepts, applied after loading, in this order."""

    system_prompt: str | None = None  # a system turn before each prompt / conversation
    dedup: Annotated[DedupSpec | None, BeforeValidator(_on_off)] = None  # true, exact, or {...}
    decontaminate: Annotated[DecontaminateSpec | None, BeforeValidator(_on_off)] = None  # true or {...}
    curriculum: CurriculumSpec | None = None


class SyntheticData(RowOptions):
    """Generated rows (offline). `arithmetic`: multi-digit addition/subtraction with a worked chain
    of thought; the `test` split never overlaps `train`, whatever `n` and `seed`."""

    synthetic: Literal["arithmetic"]
    n: int = Field(1000, gt=0)
    split: Literal["train", "test"] = "train"
    seed: int | None = None  # defaults to the recipe seed
    digits: int = Field(2, ge=1, le=12)  # operands have 1..digits digits
    min_digits: int = Field(1, ge=1, le=12)
    ops: list[Literal["+", "-"]] = ["+", "-"]
    cot: Literal["columns", "none"] = "columns"  # the worked carry/borrow steps, or an empty <think>

    @model_validator(mode="after")
    def _digits(self) -> SyntheticData:
        if self.min_digits > self.digits:
            raise ValueError(f"min_digits ({self.min_digits}) must not exceed digits ({self.digits})")
        return self


class FileData(RowOptions):
    """Rows from a local file (jsonl, json, parquet, csv), a folder of them, or a hub dataset id."""

    path: str
    name: str | None = None  # the hub dataset's config name
    split: str | None = None  # default train; slices work: "train[:500]", "test[:10%]"
    columns: dict[str, str] = {}  # canonical name -> the column in the source, e.g. {prompt: question}
    template: str | None = None  # builds `prompt` from the source's columns: "{question}\n\n{choices}"
    as_chat: bool = (
        True  # text prompts/completions become user/assistant turns (false: raw text, base models)
    )
    n: int | None = Field(None, gt=0)  # keep the first n rows (after dedup and decontamination)

    @model_validator(mode="after")
    def _template(self) -> FileData:
        if self.template is not None:
            fields = template_fields(self.template)
            if not fields:
                raise ValueError("template names no column; write columns in braces: '{question}'")
            if "prompt" in self.columns:
                raise ValueError("set the prompt with `template` or with `columns: {prompt: ...}`, not both")
        return self


def template_fields(template: str) -> list[str]:
    """The column names a `template:` refers to; a malformed template is a ValueError."""
    import string

    try:
        names = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as e:
        raise ValueError(f"template is not a valid format string: {e}") from None
    if any(not name or not name.isidentifier() for name in names):
        raise ValueError("template fields must be column names, e.g. '{question}' (write {{ }} for a brace)")
    return list(dict.fromkeys(names))


class MixSource(Strict):
    """One source of a mixture: a share of the mixture's rows (`weight`) or a fixed `count`."""

    data: DataSpec
    weight: float | None = Field(None, gt=0)  # relative to the other weighted sources
    count: int | None = Field(None, gt=0)  # exactly this many rows (repeated when the source has fewer)

    @model_validator(mode="after")
    def _one(self) -> MixSource:
        if self.weight is not None and self.count is not None:
            raise ValueError("give a source a weight or a count, not both")
        return self


class MixtureData(RowOptions):
    """Several sources mixed by weights or counts, shuffled with the recipe seed. Without `n`,
    weighted sources give as many rows as they can without repeating any row."""

    mix: list[MixSource] = Field(min_length=1)
    n: int | None = Field(None, gt=0)  # total rows
    seed: int | None = None  # defaults to the recipe seed

    @model_validator(mode="after")
    def _counts(self) -> MixtureData:
        counted = sum(s.count or 0 for s in self.mix)
        weighted = any(s.count is None for s in self.mix)
        if self.n is not None and not weighted and counted != self.n:
            raise ValueError(f"counts add up to {counted} but n is {self.n}; drop n or fix the counts")
        if self.n is not None and weighted and counted >= self.n:
            raise ValueError(
                f"counts add up to {counted}, leaving no rows of n={self.n} for weighted sources"
            )
        return self


DataSpec = Annotated[
    Annotated[Annotated[str, AfterValidator(DataReference)], Tag("ref")]
    | Annotated[SyntheticData, Tag("synthetic")]
    | Annotated["MixtureData", Tag("mix")]
    | Annotated[FileData, Tag("path")],
    Discriminator(_tag),
]


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
    reward, checked against its factory's signature when the recipe loads (posttrain.rewards)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str
    weight: float = 1.0
    model: ModelRef | None = None  # for rewards that score with a model: a stage name or a path
    label: str | None = None  # its name in metrics and samples.jsonl (default: the reward's name)

    @model_validator(mode="after")
    def _options_bind(self) -> RewardSpec:
        from posttrain.rewards import check_spec

        check_spec(self.name, self.options, self.model is not None)
        return self

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


for _model in (DecontaminateSpec, SyntheticData, FileData, MixSource, MixtureData):
    _model.model_rebuild()


# --------------------------------------------------------------------------- evaluation


class HarnessSpec(Strict):
    """Benchmark suites (MMLU, GSM8K, HumanEval, ...) through EleutherAI's lm-evaluation-harness
    on the stage's saved model: `pip install 'posttrain[eval]'`; the tasks download their data
    from the hub, so this runs on a connected (GPU) machine. Results go under `eval.harness`."""

    backend: Literal["lm-eval"] = "lm-eval"
    tasks: list[str] = Field(min_length=1)  # lm-eval task or group names (globs allowed)
    num_fewshot: int | None = Field(None, ge=0)
    limit: float | None = Field(None, gt=0)  # examples per task (a fraction when < 1)
    batch_size: int | Literal["auto"] = "auto"
    apply_chat_template: bool = True
    include_path: str | None = None  # a folder of your own task YAMLs
    model_args: dict[str, Any] = {}  # extra arguments of lm-eval's `hf` model (dtype, max_length, ...)


class EvalOptions(Strict):
    """How a held-out set is evaluated: a greedy answer per prompt, plus `k` sampled ones for
    pass@1 (the mean over samples, as DeepSeek-R1 reports it), pass@k and maj@k."""

    max_new_tokens: int = Field(64, gt=0)
    batch_size: int = Field(64, gt=0)
    k: int = Field(1, ge=1)  # samples per prompt besides the greedy one; 1 = greedy only
    temperature: float = Field(0.6, gt=0)  # for the k samples
    top_p: float = Field(0.95, gt=0, le=1)
    harness: HarnessSpec | None = None


class EvalSpec(EvalOptions):
    """Held-out evaluation run after every training stage (greedy by default)."""

    data: DataSpec


class GateSpec(Strict):
    """Stop the pipeline when the stage's evaluation misses a threshold, instead of feeding a bad
    model on. The stage stays COMPLETE: change the gate (or the stage) and run again."""

    min_accuracy: float | None = Field(None, ge=0, le=1)  # greedy accuracy
    min_pass_at_1: float | None = Field(None, ge=0, le=1)  # mean over the k samples (needs k > 1)
    min_format_rate: float | None = Field(None, ge=0, le=1)

    @model_validator(mode="after")
    def _some(self) -> GateSpec:
        if not self.thresholds():
            raise ValueError("a gate needs a threshold: min_accuracy, min_pass_at_1 or min_format_rate")
        return self

    def thresholds(self) -> dict[str, float]:
        """{eval metric: minimum} for the thresholds that are set."""
        return {
            metric: value
            for metric, value in (
                ("accuracy", self.min_accuracy),
                ("pass_at_1", self.min_pass_at_1),
                ("format_rate", self.min_format_rate),
            )
            if value is not None
        }


def tagged_union(field: str, members: dict[str, type], what: str) -> Any:
    """A union of schema classes chosen by the value of `field` (a stage's `kind`, a judge's
    `backend`); a missing or unknown value is one error with a did-you-mean."""

    def tag(value: Any) -> str:
        chosen = value.get(field) if isinstance(value, dict) else getattr(value, field, None)
        return chosen if chosen in members else "__unknown__"

    def unknown(value: Any) -> Any:
        chosen = value.get(field) if isinstance(value, dict) else None
        if chosen is None:
            raise PydanticCustomError(
                "missing_tag", "{what} has no '{field}'; {choices}",
                {"what": what, "field": field, "choices": one_of(members)},
            )  # fmt: skip
        hint = did_you_mean(chosen, members) or one_of(members)
        raise PydanticCustomError(
            "unknown_tag", "unknown {what} {field} '{value}'; {hint}",
            {"what": what, "field": field, "value": str(chosen), "hint": hint},
        )  # fmt: skip

    tagged = tuple(Annotated[cls, Tag(name)] for name, cls in members.items())
    fallback = Annotated[Annotated[Any, AfterValidator(unknown)], Tag("__unknown__")]
    return Annotated[Union[(*tagged, fallback)], Discriminator(tag)]  # noqa: UP007 (built from a tuple)


# --------------------------------------------------------------------------- stages

STAGE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


class GuardSpec(Strict):
    """What to do when training goes wrong; checked at every logging step."""

    nan: Literal["stop", "warn"] = "stop"  # the loss or gradient norm became NaN or inf
    constant_reward_steps: int | None = Field(None, gt=0)  # RL: logged steps in a row where every
    constant_reward: Literal["stop", "warn"] = "warn"  # group scored alike (no learning signal)


class StageBase(Strict):
    name: str
    kind: str
    gate: GateSpec | None = None  # e.g. {min_accuracy: 0.6}; not part of the stage's fingerprint
    # The trl config dataclass whose fields the `train:` block may set (None: no trainer).
    trainer_config: ClassVar[str | None] = None
    # Whether `<stage>/model/` is a generative model the recipe's `eval:` can run (a reward model is not).
    generative: ClassVar[bool] = True

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

    def check(self, recipe: Recipe, path: tuple) -> None:
        """Checks that need the whole recipe (other stages, the base model), run before any
        weights load; raise `recipe.error(path + (key,), ...)`. Nothing by default."""


class SFTStage(StageBase):
    """Supervised fine-tuning with trl's SFTTrainer, full or LoRA.

    Data rows hold `messages` (a conversation), `prompt` + `completion`, or `text`. The loss
    covers the assistant turns only, unless `train.assistant_only_loss: false`."""

    kind: Literal["sft"]
    model: ModelRef | None = None  # a stage name, {path: ...} or {preset: ...}; absent = base_model
    data: DataSpec
    lora: LoraSpec | None = None
    moe: MoESpec = MoESpec()  # router train/freeze, aux loss, bias balancing (MoE models)
    guard: GuardSpec = GuardSpec()  # NaN/inf loss: stop (default) or warn
    train: dict[str, Any] = {}  # keys of trl's SFTConfig
    trainer_config: ClassVar[str | None] = "SFTConfig"

    def check(self, recipe: Recipe, path: tuple) -> None:
        from posttrain.architecture import check_moe

        check_moe(self, recipe, path)


class EvaluateStage(EvalOptions, StageBase):
    """Evaluate a model (a stage's, the base model, or any path) on a held-out set, and optionally
    on lm-eval benchmark suites. Writes metrics.json (`eval`) and eval_samples.jsonl, no model."""

    kind: Literal["evaluate"]
    model: ModelRef | None = None  # absent = base_model
    data: DataSpec | None = None  # absent = the recipe's eval.data (unset options also come from eval:)


# --------------------------------------------------------------------------- grpo


class GRPOStage(StageBase):
    """GRPO with verifiable rewards (DeepSeek-R1) through trl's GRPOTrainer, full or LoRA.

    Data rows hold `prompt` plus the columns the rewards read (`answer` for `accuracy`). The
    rewards' weights become GRPOConfig.reward_weights. Checked before any weights load: the
    generation batch divides into groups of `num_generations`, the rewards' columns exist in
    the data, `max_completion_length` fits the model (posttrain/stages/grpo.py)."""

    kind: Literal["grpo"]
    model: ModelRef | None = (
        None  # the policy: a stage name, {path: ...} or {preset: ...}; absent = base_model
    )
    data: DataSpec
    rewards: list[RewardSpec] = Field(min_length=1)
    system_prompt: str | None = None  # sent before every prompt (a plain-text prompt becomes a user turn)
    lora: LoraSpec | None = None
    moe: MoESpec = MoESpec()  # routers frozen and no aux loss unless set here (MoE models)
    guard: GuardSpec = GuardSpec(constant_reward_steps=10)  # NaN/inf loss; 10 logged steps without signal
    train: dict[str, Any] = {}  # keys of trl's GRPOConfig
    trainer_config: ClassVar[str | None] = "GRPOConfig"

    @model_validator(mode="after")
    def _rewards(self) -> GRPOStage:
        if "reward_weights" in self.train:
            raise ValueError("set `weight:` on each reward instead of train.reward_weights")
        from posttrain.rewards import reward_label

        labels = [reward_label(r) for r in self.rewards]
        twice = sorted({label for label in labels if labels.count(label) > 1})
        if twice:
            raise ValueError(f"two rewards are called '{twice[0]}'; give one a `label:`")
        return self

    def check(self, recipe: Recipe, path: tuple) -> None:
        from posttrain.stages.grpo import check_stage

        check_stage(self, recipe, path)


# --------------------------------------------------------------------------- distill


STUDENT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")  # a folder name: `<stage>/<student>/model/`
DENSE_SIZE_KEYS = (
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
)


class StudentSpec(Strict):
    """One student of a `distill` stage: exactly one of `path`, `preset` or `dense_from`.

    `dense_from: <model>` derives a dense config from that model (its tokenizer, vocabulary and
    special tokens; dense attention and MLP, no experts) and random-initialises it; the size keys
    override the derived width and depth (see posttrain/students.py)."""

    name: str
    # A stage or any causal LM (hub id, folder), trained from its own weights and tokenizer.
    path: Annotated[str, AfterValidator(ModelReference)] | None = None
    preset: str | None = None  # a tiny preset from recipes/models/
    dense_from: ModelRef | None = None
    architecture: Literal["llama", "qwen2"] = "llama"  # the dense family of a `dense_from` student
    num_hidden_layers: int | None = Field(None, gt=0)
    hidden_size: int | None = Field(None, gt=0)
    intermediate_size: int | None = Field(None, gt=0)  # default: the teacher's, scaled with hidden_size
    num_attention_heads: int | None = Field(None, gt=0)
    num_key_value_heads: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_source(self) -> StudentSpec:
        if not STUDENT_NAME.match(self.name):
            raise ValueError(
                f"student name '{self.name}' must start with a letter and use letters, digits, _, - and ."
            )
        given = [k for k in ("path", "preset", "dense_from") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"student '{self.name}' needs exactly one of path, preset or dense_from (has {given or 'none'})"
            )
        if self.dense_from is None and self.size_overrides():
            raise ValueError(f"student '{self.name}': size keys only apply with dense_from")
        from posttrain.students import check_dense_sizes

        try:
            check_dense_sizes(self.size_overrides())
        except PosttrainError as e:
            raise ValueError(f"student '{self.name}': {e}") from None
        return self

    def size_overrides(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in DENSE_SIZE_KEYS if getattr(self, k) is not None}


class VerifierSpec(RewardSpec):
    """A verifier for rejection sampling: a reward (`{name: accuracy, <its options>}`, as under GRPO's
    `rewards:`) and the score a trace needs from it. A trace passes when every verifier scores it
    at or above its `min_score`; a verifier that returns None for a trace (cannot judge it) fails it."""

    min_score: float = 1.0  # binary rewards (accuracy, format) pass at 1.0

    @model_validator(mode="after")
    def _no_weight(self) -> VerifierSpec:
        if "weight" in self.model_fields_set:
            raise ValueError("a verifier has no weight: a trace must pass every verifier (set min_score)")
        return self


class GenerationSpec(Strict):
    """How the teacher samples traces (R1 sampled its distillation data at temperature 0.6, top-p 0.95)."""

    max_new_tokens: int = Field(256, gt=0)
    temperature: float = Field(0.6, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    batch_size: int = Field(32, gt=0)  # prompts per batch; each batch is appended to the trace file
    backend: Literal["auto", "transformers", "vllm"] = "auto"  # auto: vLLM when installed and on GPU
    # Extra keyword arguments of vllm.LLM: tensor_parallel_size, gpu_memory_utilization, max_model_len...
    vllm: dict[str, Any] = {}


class MixSpec(Strict):
    """Other SFT data mixed into the traces (R1 mixed ~600k reasoning with ~200k non-reasoning rows)."""

    data: DataSpec  # rows with `messages`, or `prompt` + `completion`
    ratio: float = Field(gt=0, lt=1)  # the share of the training set taken from this data


class DistillStage(StageBase):
    """Distil a teacher into one or more dense students in one step.

    `traces`: the teacher samples answers, verifiers keep the passing ones (rejection sampling),
    each student is SFT-trained on them. `logits`: on-policy generalised-JSD distillation with
    trl's DistillationTrainer (teacher and students must share a tokenizer). `traces+logits`:
    SFT on the traces, then the on-policy phase."""

    kind: Literal["distill"]
    teacher: ModelRef
    students: list[StudentSpec] = Field(min_length=1)
    mode: Literal["traces", "logits", "traces+logits"] = "traces"
    data: DataSpec  # prompts (`prompt`), plus the columns the verifiers read (e.g. `answer`)
    samples_per_prompt: int = Field(4, gt=0)
    keep_per_prompt: int = Field(1, gt=0)  # distinct passing traces kept per prompt
    verifiers: list[VerifierSpec] = []  # empty: keep every sample (plain sequence-level distillation)
    generation: GenerationSpec = GenerationSpec()
    mix: MixSpec | None = None
    guard: GuardSpec = GuardSpec()  # students' training: NaN/inf loss stops (default) or warns
    train: dict[str, Any] = {}  # keys of trl's SFTConfig (DistillationConfig in mode logits)
    # Keys of trl's DistillationConfig for the on-policy phase that follows SFT in traces+logits.
    logits_train: dict[str, Any] = {}

    @model_validator(mode="after")
    def _students(self) -> DistillStage:
        names = [s.name for s in self.students]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"two students are named '{name}'; student names must be unique")
            if name in ("data", "teacher", "checkpoints", "logs"):  # folders of the stage itself
                raise ValueError(f"student name '{name}' is reserved (a folder of the stage)")
        if self.keep_per_prompt > self.samples_per_prompt:
            raise ValueError(
                f"keep_per_prompt ({self.keep_per_prompt}) exceeds samples_per_prompt ({self.samples_per_prompt})"
            )
        if self.logits_train and self.mode != "traces+logits":
            raise ValueError("logits_train applies to mode traces+logits only; use train: in mode logits")
        if self.gate is not None:
            raise ValueError(
                "gate: a distill stage has no model of its own to gate; its students are in metrics"
            )
        if self.mode == "logits" and (self.verifiers or self.mix):
            raise ValueError("mode logits samples no traces: verifiers and mix apply to traces modes only")
        return self

    def check(self, recipe: Recipe, path: tuple) -> None:
        from posttrain.stages.distill import check_stage

        check_stage(self, recipe, path)

    def trainer_blocks(self) -> dict[str, str]:
        if self.mode == "logits":
            return {"train": "DistillationConfig"}
        blocks = {"train": "SFTConfig"}
        if self.mode == "traces+logits":
            blocks["logits_train"] = "DistillationConfig"
        return blocks


# --------------------------------------------------------------------------- RLAIF: judges, labels, reward model


def _principles(value: list[str] | str) -> list[str]:
    from posttrain.judges.prompt import load_principles

    return load_principles(value)


# A list of principles, or a file of them (one per line), or the name of a constitution that ships in
# recipes/principles/ (`default`, `math`). Stored as the list itself, so editing the file re-runs the stage.
Principles = Annotated[list[str] | str, AfterValidator(_principles)]


def _labels(value: tuple[str, str]) -> tuple[str, str]:
    if not all(label.strip() for label in value) or value[0].strip() == value[1].strip():
        raise ValueError(f"labels must be two different non-blank strings, got {list(value)}")
    return value


Labels = Annotated[tuple[str, str], AfterValidator(_labels)]  # what the judge answers for "first" / "second"


class HFJudgeSpec(Strict):
    """A local transformers causal LM compares two answers; the verdict is its next-token probability
    of each label after `Verdict:`, so the label is a probability, never parsed text."""

    backend: Literal["hf"]
    model: ModelRef  # a stronger model: a stage name, {path: ...} or a hub id
    principles: Principles = "default"
    labels: Labels = ("A", "B")  # each must be one token right after "Verdict:"
    rationale: bool = False  # write a short rationale first (chain of thought), then read the verdict
    rationale_max_new_tokens: int = Field(256, gt=0)
    chat_template: bool = True  # wrap the judge prompt in the judge's chat template when it has one
    batch_size: int = Field(8, gt=0)
    runtime_keys: ClassVar[frozenset[str]] = frozenset({"batch_size"})


class LikelihoodJudgeSpec(Strict):
    """Preference by a stronger model's mean token log-likelihood of each answer given the prompt:
    p(A better) = sigmoid((ll_A - ll_B) / temperature). Needs no instruction following (offline, tiny)."""

    backend: Literal["likelihood"]
    model: ModelRef
    temperature: float = Field(0.1, gt=0)  # nats of mean log-likelihood per unit of preference logit
    batch_size: int = Field(32, gt=0)
    runtime_keys: ClassVar[frozenset[str]] = frozenset({"batch_size"})


ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class OpenAIJudgeSpec(Strict):
    """Any OpenAI-compatible chat endpoint (vLLM, SGLang, a hosted API). Reads the label's logprobs
    when the server returns them, else the strict `Verdict: A` line of the reply."""

    backend: Literal["openai"]
    base_url: str  # e.g. http://localhost:8000/v1
    model: str  # the served model's name
    api_key_env: str | None = "OPENAI_API_KEY"  # the environment variable holding the key (None: no key)
    principles: Principles = "default"
    labels: Labels = ("A", "B")
    rationale: bool = False
    max_tokens: int = Field(512, gt=0)  # room for the rationale; a bare verdict needs a few tokens
    temperature: float = Field(0.0, ge=0)
    logprobs: bool = True
    top_logprobs: int = Field(20, ge=1, le=20)
    extra_body: dict[str, Any] = {}  # sent as is, e.g. {chat_template_kwargs: {enable_thinking: false}}
    max_concurrency: int = Field(8, gt=0)
    timeout_s: float = Field(60.0, gt=0)  # per connection / read
    max_retries: int = Field(5, ge=0)  # on timeouts, connection errors, 408/409/429/5xx
    backoff_s: float = Field(1.0, ge=0)  # first retry delay; doubles each time (Retry-After wins)
    runtime_keys: ClassVar[frozenset[str]] = frozenset(
        {"api_key_env", "max_concurrency", "timeout_s", "max_retries", "backoff_s"}
    )

    @model_validator(mode="after")
    def _endpoint(self) -> OpenAIJudgeSpec:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url '{self.base_url}' must start with http:// or https://")
        if self.api_key_env is not None and not ENV_NAME.match(self.api_key_env):
            raise ValueError(
                "api_key_env names an environment variable (e.g. OPENAI_API_KEY); never put the key itself in a recipe"
            )
        return self


class RewardJudgeSpec(Strict):
    """Any registered reward as the judge (verifiable domains): p(a better) = sigmoid((r_a - r_b) /
    temperature). The reward reads its dataset columns (e.g. `answer`) from the prompt's row."""

    backend: Literal["reward"]
    reward: RewardSpec  # {name: accuracy}, with the reward's own options
    temperature: float = Field(0.1, gt=0)
    batch_size: int = Field(64, gt=0)
    runtime_keys: ClassVar[frozenset[str]] = frozenset({"batch_size"})


JUDGE_BACKENDS: dict[str, type[Strict]] = {
    "hf": HFJudgeSpec,
    "likelihood": LikelihoodJudgeSpec,
    "openai": OpenAIJudgeSpec,
    "reward": RewardJudgeSpec,
}


JudgeSpec = tagged_union("backend", JUDGE_BACKENDS, "judge")


class SamplingSpec(Strict):
    """How the policy writes its candidate answers."""

    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(128, gt=0)
    batch_size: int = Field(32, gt=0)


class RlaifLabelStage(StageBase):
    """AI-judged preference labels (RLAIF, Lee et al. 2023): a policy writes candidate answers,
    a judge compares each pair in both orders, and the averaged soft label is kept when the two
    orders agree and the preference is clear. Writes `<stage>/data/preferences.jsonl`."""

    kind: Literal["rlaif_label"]
    policy: ModelRef | None = (
        None  # writes the candidates; absent: the data's `responses` (or chosen/rejected)
    )
    data: DataSpec  # rows with `prompt` (and `answer`, `human_choice` to measure the judge)
    samples_per_prompt: int = Field(4, ge=2)
    sampling: SamplingSpec = SamplingSpec()
    pairs: Literal["all", "best_vs_worst"] = "all"  # every pair, or one per prompt after judging them all
    max_pairs_per_prompt: int | None = Field(None, gt=0)  # a seeded sample of the pairs when there are more
    judge: JudgeSpec
    min_margin: float = Field(0.05, ge=0, lt=0.5)  # drop a pair whose p(A better) is this close to 0.5
    max_disagreement: float = Field(0.5, ge=0, le=1)  # drop a pair whose two orders differ by more


class RewardModelStage(StageBase):
    """A Bradley-Terry reward model with trl's RewardTrainer: a scalar sequence-classification head
    on `model`, trained on prompt/chosen/rejected pairs, with soft labels as margins. A held-out split
    of prompts measures pairwise accuracy, mean margin and calibration."""

    kind: Literal["reward_model"]
    model: ModelRef | None = None  # a stage name, {path: ...} or {preset: ...}; absent = base_model
    data: DataSpec  # a label stage, or a file with prompt/chosen/rejected (p_chosen optional)
    margin_scale: float = Field(1.0, ge=0)  # margin = scale * logit(p_chosen); 0 turns margins off
    eval_fraction: float = Field(0.1, ge=0, lt=1)  # share of prompts held out for the metrics
    lora: LoraSpec | None = None
    guard: GuardSpec = GuardSpec()  # NaN/inf loss: stop (default) or warn
    train: dict[str, Any] = {}  # keys of trl's RewardConfig
    trainer_config: ClassVar[str | None] = "RewardConfig"
    generative: ClassVar[bool] = False


STAGE_KINDS: dict[str, type[StageBase]] = {
    "sft": SFTStage,
    "grpo": GRPOStage,
    "evaluate": EvaluateStage,
    "rlaif_label": RlaifLabelStage,
    "reward_model": RewardModelStage,
    "distill": DistillStage,
}


Stage = tagged_union("kind", STAGE_KINDS, "stage")


# --------------------------------------------------------------------------- recipe


class Recipe(Strict):
    """A whole run: a base model, stages that feed each other, and the held-out evaluation."""

    name: str
    output_dir: str | None = None  # default runs/<name>
    seed: int = 0
    base_model: Annotated[
        Annotated[PresetModel, Tag("preset")] | Annotated[PathModel, Tag("path")], Discriminator(_tag)
    ]
    stages: list[Stage] = Field(min_length=1)
    eval: EvalSpec | None = None

    _source: SourceMap = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _eval_defaults(cls, data: Any) -> Any:
        return fill_eval_defaults(data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _unique_names(self) -> Recipe:
        seen: set[str] = set()
        for stage in self.stages:
            if stage.name in seen:
                raise ValueError(f"two stages are named '{stage.name}'; stage names must be unique")
            seen.add(stage.name)
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name}")

    @property
    def source(self) -> SourceMap:
        return self._source or SourceMap("<recipe>", {})

    def stage(self, name: str) -> StageBase:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise PosttrainError(f"no stage named '{name}'", fix=did_you_mean(name, self.stage_names()) or None)

    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]

    def error(self, path: tuple, message: str, fix: str | None = None) -> PosttrainError:
        """A PosttrainError that points at `path` (as in the YAML) with its file and line."""
        return self.source.error(path, message, fix)


# --------------------------------------------------------------------------- loading


@dataclasses.dataclass(frozen=True)
class SourceMap:
    """Where each key of the recipe came from: its file and line, or `--set` for overrides."""

    file: str
    lines: dict[tuple, tuple[str, int | None]]
    data: Any = None

    def locate(self, path: tuple) -> tuple[str, int | None]:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return (self.file, None)

    def display(self, path: tuple) -> str:
        """`stages.sft.train.lr` rather than `stages.0.train.lr`: the spelling `--set` takes."""
        parts: list[str] = []
        node = self.data
        for part in path:
            if isinstance(node, list) and isinstance(part, int) and part < len(node):
                item = node[part]
                parts.append(
                    item["name"]
                    if isinstance(item, dict) and isinstance(item.get("name"), str)
                    else str(part)
                )
                node = item
            else:
                parts.append(str(part))
                node = node.get(part) if isinstance(node, dict) else None
        return ".".join(parts)

    def error(self, path: tuple, message: str, fix: str | None = None) -> PosttrainError:
        file, line = self.locate(path)
        return PosttrainError(message, file=file, line=line, key=self.display(path) or None, fix=fix)


class RecipeLoader(yaml.SafeLoader):
    """SafeLoader that reads `1e-3` as a float (YAML 1.2), not the string YAML 1.1 makes of it."""


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_value(text: str) -> Any:
    """A `--set` value: YAML (numbers, lists, mappings), or the text itself."""
    try:
        return yaml.load(text, Loader=RecipeLoader) if text.strip() else text
    except yaml.YAMLError:
        return text


def _yaml_lines(node: yaml.Node, file: str, path: tuple, out: dict) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                raise PosttrainError(f"duplicate key '{key}'", file=file, line=key_node.start_mark.line + 1)
            seen.add(key)
            out[(*path, key)] = (file, key_node.start_mark.line + 1)
            _yaml_lines(value_node, file, (*path, key), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[(*path, i)] = (file, item.start_mark.line + 1)
            _yaml_lines(item, file, (*path, i), out)


def read_yaml(path: str | Path) -> tuple[Any, dict]:
    """Parse a YAML file into plain data plus a map from key path to (file, line)."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PosttrainError("no such file", file=file, fix="check the path") from None
    except (IsADirectoryError, UnicodeDecodeError) as e:
        raise PosttrainError(f"cannot read: {e.__class__.__name__}", file=file) from None
    loader = None
    try:
        loader = RecipeLoader(text)  # the reader rejects control characters already here
        node = loader.get_single_node()
        lines: dict = {}
        if node is not None:
            _yaml_lines(node, file, (), lines)
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        raise PosttrainError(f"invalid YAML: {e.problem or e.context}", file=file, line=line) from None
    except yaml.YAMLError as e:
        raise PosttrainError(f"invalid YAML: {' '.join(str(e).split())}", file=file) from None
    finally:
        if loader is not None:
            loader.dispose()
    return data, lines


def apply_override(data: dict, assignment: str, lines: dict) -> None:
    """Apply one `--set a.b.c=value`; list items (stages) are addressed by name or index."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise PosttrainError(
            f"--set '{assignment}': expected KEY=VALUE, e.g. stages.sft.train.learning_rate=1e-4"
        )
    value = parse_value(raw)
    node: Any = data
    path: tuple = ()
    parts = key.split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            names = [item.get("name") for item in node if isinstance(item, dict)]
            index = names.index(part) if part in names else (int(part) if part.isdigit() else None)
            if index is None or index >= len(node):
                hint = (
                    did_you_mean(part, [n for n in names if n])
                    or f"use a stage name: {', '.join(map(str, names))}"
                )
                raise PosttrainError(f"--set {key}: no item '{part}' under '{'.'.join(parts[:i])}'", fix=hint)
            part = index
        elif not isinstance(node, dict):
            raise PosttrainError(f"--set {key}: '{'.'.join(parts[:i])}' is not a mapping")
        path = (*path, part)
        if last:
            node[part] = value
            lines[path] = ("--set", None)
        else:
            if isinstance(node, dict) and not isinstance(node.get(part), dict | list):
                node[part] = {}
            node = node[part]


def _validation_error(exc: ValidationError, source: SourceMap) -> PosttrainError:
    """The first pydantic error as one line with the YAML key path and its line."""
    err = exc.errors(include_url=False)[0]
    loc = _yaml_path(err["loc"], source.data)
    message = err["msg"]
    if err["type"] == "unknown_key":
        loc = (*loc, err["ctx"]["key"])
        message = f"unknown key; {err['ctx']['hint']}"
    elif err["type"] in ("unknown_tag", "missing_tag"):
        loc = (*loc, err["ctx"]["field"])
    elif err["type"] == "missing":
        loc = (*_yaml_path(err["loc"][:-1], source.data), err["loc"][-1])
        message = "required key is missing"
    elif message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    more = len(exc.errors()) - 1
    if more:
        message += f" (+{more} more problem{'s' if more > 1 else ''})"
    return source.error(loc, message)


def _yaml_path(loc: tuple, data: Any) -> tuple:
    """Drop pydantic's union tags and validator names from an error location."""
    path: list = []
    node = data
    for part in loc:
        if (
            isinstance(node, dict)
            and part in node
            or isinstance(node, list)
            and isinstance(part, int)
            and part < len(node)
        ):
            node = node[part]
        else:
            continue
        path.append(part)
    return tuple(path)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe; every problem is a PosttrainError with file and line."""
    data, lines = read_yaml(path)
    if not isinstance(data, dict):
        raise PosttrainError("a recipe is a mapping with name, base_model and stages", file=str(path), line=1)
    for assignment in overrides:
        apply_override(data, assignment, lines)
    source = SourceMap(str(path), lines, data)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc, source) from None
    recipe._source = source
    check_references(recipe)
    check_trainer_keys(recipe)
    check_data(recipe)
    check_evaluation(recipe)
    for i, stage in enumerate(recipe.stages):
        stage.check(recipe, ("stages", i))
    return recipe


# --------------------------------------------------------------------------- cross-checks


def references(value: Any, path: tuple = ()) -> Iterator[tuple[tuple, str]]:
    """Every bare-string reference inside a validated block, with its key path."""
    if isinstance(value, ModelReference | DataReference):
        yield path, value
    elif isinstance(value, BaseModel):
        for field in type(value).model_fields:
            yield from references(getattr(value, field), (*path, field))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from references(item, (*path, i))
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from references(item, (*path, key))


def looks_like_path(value: str) -> bool:
    """A string that can only be a file or a hub id, never a stage name."""
    return "/" in value or "\\" in value or Path(value).suffix != "" or Path(value).exists()


def stage_dependencies(recipe: Recipe, stage: StageBase) -> list[str]:
    """The names of the stages this stage reads from, in the order they are referenced."""
    names = set(recipe.stage_names())
    deps: list[str] = []
    for _, value in references(stage):
        if value in names and value not in deps:
            deps.append(value)
    return deps


def check_references(recipe: Recipe) -> None:
    """Every bare string must name a stage, or be a path / hub id; a typo gets a did-you-mean."""
    names = recipe.stage_names()
    for i, stage in enumerate(recipe.stages):
        for path, value in references(stage, ("stages", i)):
            if value in names or looks_like_path(value):
                continue
            hint = did_you_mean(value, names)
            fix = hint or f"stages are {', '.join(names)}; a hub id or path needs a '/' or {{path: {value}}}"
            raise recipe.error(path, f"'{value}' is not a stage of this recipe", fix)
    if recipe.eval is not None:
        for path, value in references(recipe.eval, ("eval",)):
            if value in names:
                raise recipe.error(
                    path, "evaluation data cannot come from a stage", "use a file or {synthetic: ...}"
                )


def trainer_config_class(name: str) -> type:
    import trl

    return getattr(trl, name)


def trainer_defaults(name: str) -> dict[str, Any]:
    """trl's defaults for the fields of config `name` that have one."""
    fields = dataclasses.fields(trainer_config_class(name))
    return {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}


def check_trainer_keys(recipe: Recipe) -> None:
    """Trainer blocks' keys (`train:`) must be fields of their trl config, with values of the field's
    type; `lora:` extras must be fields of peft's LoraConfig."""
    for i, stage in enumerate(recipe.stages):
        for block, config in stage.trainer_blocks().items():
            fields = {f.name: f for f in dataclasses.fields(trainer_config_class(config))}
            for key, value in (getattr(stage, block, None) or {}).items():
                path = ("stages", i, block, key)
                if key not in fields:
                    hint = did_you_mean(key, fields) or f"see trl's {config}"
                    raise recipe.error(path, f"not a field of trl.{config}", hint)
                expected = _scalar_types(fields[key].type)
                if expected and not any(_is_instance(value, t) for t in expected):
                    names = " or ".join("null" if t is type(None) else t.__name__ for t in expected)
                    raise recipe.error(path, f"expects {names}, got {value!r}")
        moe = getattr(stage, "moe", None)
        train = getattr(stage, "train", None)
        if moe is not None and moe.aux_loss_coef is not None and train and "router_aux_loss_coef" in train:
            raise recipe.error(
                ("stages", i, "moe", "aux_loss_coef"),
                "set both here and as train.router_aux_loss_coef",
                "keep moe.aux_loss_coef",
            )
        lora = getattr(stage, "lora", None)
        if lora is not None and lora.model_extra:
            from peft import LoraConfig

            fields = {f.name for f in dataclasses.fields(LoraConfig)}
            for key in lora.model_extra:
                if key not in fields:
                    hint = did_you_mean(key, fields | set(LoraSpec.model_fields)) or "see peft's LoraConfig"
                    raise recipe.error(("stages", i, "lora", key), "not a LoRA option", hint)


def _scalar_types(annotation: Any) -> tuple[type, ...]:
    """The scalar types a plainly typed dataclass field takes (`float`, `int | None`, ...);
    empty for anything richer, which trl checks itself."""
    import types
    import typing

    args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if all(a in (float, int, bool, type(None)) for a in args):
        return tuple(args)
    return ()


def _is_instance(value: Any, expected: type) -> bool:
    if expected is type(None):
        return value is None
    if expected is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


# --------------------------------------------------------------------------- data and evaluation


def fill_eval_defaults(data: dict) -> dict:
    """Spell out what the evaluation sets imply, so the resolved recipe (and each stage's
    fingerprint) shows it: an `evaluate` stage takes the recipe's `eval:` settings (data, k,
    ...) for what it does not set, and a training stage's `decontaminate:` without `against`
    gets every evaluation set of the recipe."""
    stages = data.get("stages")
    if not isinstance(stages, list):
        return data
    data = copy.deepcopy(data)
    stages = data["stages"]
    recipe_eval = data.get("eval")
    eval_data = recipe_eval.get("data") if isinstance(recipe_eval, dict) else None
    sets = [eval_data] if eval_data is not None else []
    for stage in stages:
        if not isinstance(stage, dict) or stage.get("kind") != "evaluate":
            continue
        for key, value in recipe_eval.items() if isinstance(recipe_eval, dict) else ():
            if key in EvalSpec.model_fields and stage.get(key) is None:
                stage[key] = copy.deepcopy(value)
        if stage.get("data") is not None and stage["data"] not in sets:
            sets.append(stage["data"])
    if sets:
        for stage in stages:
            if isinstance(stage, dict) and stage.get("kind") != "evaluate":
                _fill_against(stage, sets)
    return data


def _fill_against(node: Any, sets: list) -> None:
    if isinstance(node, list):
        for item in node:
            _fill_against(item, sets)
    elif isinstance(node, dict):
        for key, value in node.items():
            if key == "decontaminate" and (
                value is True or isinstance(value, dict) and "against" not in value
            ):
                node[key] = {**(value if isinstance(value, dict) else {}), "against": copy.deepcopy(sets)}
            elif key != "train":
                _fill_against(value, sets)


def blocks(value: Any, kind: type | tuple[type, ...], path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """Every validated block of type `kind` inside `value`, with its key path."""
    if isinstance(value, kind):
        yield path, value
    if isinstance(value, BaseModel):
        for field in type(value).model_fields:
            yield from blocks(getattr(value, field), kind, (*path, field))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from blocks(item, kind, (*path, i))


def check_data(recipe: Recipe) -> None:
    """Local files have the columns the recipe maps; decontamination has something to check
    against; a curriculum is not undone by the trainer's shuffling."""
    from posttrain.data_tools.peek import check_file_columns

    specs = list(blocks(recipe.eval, RowOptions, ("eval",)))
    for i, stage in enumerate(recipe.stages):
        specs += blocks(stage, RowOptions, ("stages", i))
    for path, spec in specs:
        if isinstance(spec, FileData):
            problem = check_file_columns(spec)
            if problem:
                key, message, fix = problem
                raise recipe.error((*path, key), message, fix)
        if spec.decontaminate is not None and not spec.decontaminate.against:
            raise recipe.error(
                (*path, "decontaminate"),
                "nothing to decontaminate against",
                "add a recipe-level `eval:` block, or `against: [...]`",
            )
    for i, stage in enumerate(recipe.stages):
        _check_curriculum(recipe, i, stage)


def _check_curriculum(recipe: Recipe, index: int, stage: StageBase) -> None:
    curricula = [path for path, spec in blocks(stage, RowOptions, ("stages", index)) if spec.curriculum]
    if not curricula or not stage.trainer_config:
        return
    train = getattr(stage, "train", {}) or {}
    fields = {f.name: f for f in dataclasses.fields(trainer_config_class(stage.trainer_config))}
    # GRPO-style trainers sample with their own shuffling sampler; the others use transformers'.
    own_sampler = "shuffle_dataset" in fields and fields["shuffle_dataset"].default is True
    key, wanted = ("shuffle_dataset", False) if own_sampler else ("train_sampling_strategy", "sequential")
    if train.get(key) != wanted or (not own_sampler and train.get("shuffle_dataset")):
        raise recipe.error(
            (*curricula[0], "curriculum"),
            "the trainer shuffles rows, which undoes a curriculum",
            f"set `train: {{{key}: {str(wanted).lower()}}}` on this stage",
        )


def check_evaluation(recipe: Recipe) -> None:
    """Gates have an evaluation to read, evaluate stages have data, harness tasks exist."""
    for i, stage in enumerate(recipe.stages):
        options = stage if isinstance(stage, EvaluateStage) else recipe.eval
        if isinstance(stage, EvaluateStage) and stage.data is None:
            raise recipe.error(
                ("stages", i), "an evaluate stage needs `data:` (or a recipe-level `eval:` block)"
            )
        if stage.gate is not None and options is None:
            raise recipe.error(
                ("stages", i, "gate"), "a gate needs an evaluation", "add a recipe-level `eval:` block"
            )
        if stage.gate is not None and stage.gate.min_pass_at_1 is not None and options.k < 2:
            raise recipe.error(
                ("stages", i, "gate", "min_pass_at_1"), "pass@1 needs k > 1 samples", "set eval k: 4 or more"
            )
    for path, harness in blocks(recipe, HarnessSpec):
        from posttrain.harness import check_harness

        problem = check_harness(harness)
        if problem:
            raise recipe.error(path, *problem)
