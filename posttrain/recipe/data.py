"""Data blocks: where a stage's rows come from (`{synthetic: ...}`, `{path: ...}` for a file,
folder or hub dataset, `{mix: [...]}` of several sources, or another stage's name) and the
options every block accepts on top of its source (`RowOptions`: system prompt, dedup,
decontamination, curriculum). `DataSpec` is the data slot; data_tools/ turns it into rows."""

from __future__ import annotations

import string
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BeforeValidator, Discriminator, Field, Tag, model_validator

from posttrain.recipe.base import DataReference, Strict, _tag

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
    dedup: Annotated[
        DedupSpec | None,
        BeforeValidator(_on_off, json_schema_input_type=DedupSpec | bool | Literal["exact"] | None),
    ] = None  # true, exact, or {...}
    decontaminate: Annotated[
        DecontaminateSpec | None,
        BeforeValidator(_on_off, json_schema_input_type=DecontaminateSpec | bool | None),
    ] = None  # true or {...}
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
    slot_tag: ClassVar[str] = "synthetic"

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
    slot_tag: ClassVar[str] = "mix"

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
    | Annotated[MixtureData, Tag("mix")]
    | Annotated[FileData, Tag("path")],
    Discriminator(_tag),
]


for _model in (DecontaminateSpec, SyntheticData, FileData, MixSource, MixtureData):
    _model.model_rebuild()
