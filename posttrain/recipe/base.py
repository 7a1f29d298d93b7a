"""What every recipe block builds on: `Strict` (unknown keys are errors with a did-you-mean),
the reference types that mark a bare string in a model or data slot as another stage's name
(or a path / hub id), the model slot itself (`ModelRef`: a reference, `{preset: ...}` or
`{path: ...}`), and `tagged_union`, which picks a schema class by a `kind` / `backend` key."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union  # noqa: UP035

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Tag, model_validator
from pydantic_core import PydanticCustomError

from posttrain.errors import did_you_mean, one_of


class Strict(BaseModel):
    """Every recipe block: unknown keys are errors that suggest the closest known key."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # Which member of a model or data slot's union a block of this class is (see `_tag`).
    slot_tag: ClassVar[str] = "path"

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
    if isinstance(value, Strict):
        return value.slot_tag
    return "path"


class PresetModel(Strict):
    """A tiny random-initialised model built from `recipes/models/<preset>.json` (offline, seconds)."""

    preset: str
    slot_tag: ClassVar[str] = "preset"


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
