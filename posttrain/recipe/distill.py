"""The `distill` stage: a teacher writes traces that verifiers filter (rejection sampling)
and one or more dense students learn from them (SFT) and/or from the teacher's logits
(on-policy generalised JSD). Students are a path, a tiny preset, or a dense config derived from
a model (`dense_from`, sized by DENSE_SIZE_KEYS and checked by `check_dense_sizes`; see
posttrain/students.py)."""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, Field, model_validator

from posttrain.errors import PosttrainError
from posttrain.recipe.base import ModelRef, ModelReference, PathModel, Strict
from posttrain.recipe.data import DataSpec
from posttrain.recipe.generation import Backend
from posttrain.recipe.stages import GuardSpec, StageBase
from posttrain.recipe.training import RewardSpec

STUDENT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")  # a folder name: `<stage>/<student>/model/`
DENSE_SIZE_KEYS = (
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
)


def check_dense_sizes(sizes: dict[str, int | None]) -> None:
    """The shape rules of a dense attention block; checked at recipe load and at build time."""
    hidden, heads, kv_heads = (
        sizes.get("hidden_size"),
        sizes.get("num_attention_heads"),
        sizes.get("num_key_value_heads"),
    )
    if hidden and heads and (hidden % heads or (hidden // heads) % 2):
        raise PosttrainError(
            f"hidden_size {hidden} must split into {heads} heads of an even size (rotary embeddings)",
            fix="choose hidden_size a multiple of 2 × num_attention_heads",
        )
    if heads and kv_heads and heads % kv_heads:
        raise PosttrainError(
            f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}",
            fix="num_key_value_heads must divide num_attention_heads",
        )


class StudentSpec(Strict):
    """One student of a `distill` stage: exactly one of `path`, `preset` or `dense_from`.

    `dense_from: <model>` derives a dense config from that model (its tokenizer, vocabulary and
    special tokens; dense attention and MLP, no experts) and random-initialises it; the size keys
    override the derived width and depth (see posttrain/students.py)."""

    name: str
    # A stage or any causal LM (hub id, folder), trained from its own weights and tokenizer;
    # `{path: ..., dtype: ..., quantization: ...}` loads it with options (see PathModel).
    path: Annotated[str, AfterValidator(ModelReference)] | PathModel | None = None
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


class GenerationSpec(Backend):
    """How the teacher samples traces (R1 sampled its distillation data at temperature 0.6, top-p 0.95)."""

    max_new_tokens: int = Field(256, gt=0)
    temperature: float = Field(0.6, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    batch_size: int = Field(32, gt=0)  # prompts per batch; each batch is appended to the trace file


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
    # Evaluate the teacher on the recipe's `eval:` (the students' yardstick). Default: yes, unless
    # the teacher is served (`generation.server`), when evaluating it would load it here after all.
    teacher_eval: bool | None = None
    mix: MixSpec | None = None
    guard: GuardSpec = GuardSpec()  # students' training: NaN/inf loss stops (default) or warns
    train: dict[str, Any] = {}  # keys of trl's SFTConfig (DistillationConfig in mode logits)
    # Keys of trl's DistillationConfig for the on-policy phase that follows SFT in traces+logits.
    logits_train: dict[str, Any] = {}
    start_field: ClassVar[str | None] = "teacher"

    @model_validator(mode="after")
    def _students(self) -> DistillStage:
        names = [s.name for s in self.students]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"two students are named '{name}'; student names must be unique")
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
        if self.mode != "traces" and self.generation.served:
            raise ValueError(
                f"mode {self.mode} grades the students with the teacher's logits, which a server does not "
                "give: a served teacher (generation.server) works with mode traces"
            )
        return self

    @property
    def evaluates_teacher(self) -> bool:
        return self.teacher_eval if self.teacher_eval is not None else not self.generation.served

    def saved_models(self) -> list[str]:
        return [s.name for s in self.students]

    def trainer_blocks(self) -> dict[str, str]:
        if self.mode == "logits":
            return {"train": "DistillationConfig"}
        blocks = {"train": "SFTConfig"}
        if self.mode == "traces+logits":
            blocks["logits_train"] = "DistillationConfig"
        return blocks
