"""The root of the schema: STAGE_REGISTRY maps each `kind:` to its schema class and to the module
in posttrain/stages/ that runs it (append a new stage kind here: one line), `Stage` is the union
the classes make, and `Recipe` ties a base model, the stages and the recipe-level `eval:` block
together, with the source map that gives its errors a file and line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Discriminator, Field, PrivateAttr, Tag, field_validator, model_validator

from posttrain.errors import PosttrainError, did_you_mean
from posttrain.recipe.base import PathModel, PresetModel, Strict, _tag, tagged_union
from posttrain.recipe.distill import DistillStage
from posttrain.recipe.evaluation import EvalSpec, fill_eval_defaults
from posttrain.recipe.preference import DPOStage, KTOStage, ORPOStage
from posttrain.recipe.rlaif import RewardModelStage, RlaifLabelStage
from posttrain.recipe.source import SourceMap
from posttrain.recipe.stages import EvaluateStage, GRPOStage, RLOOStage, SFTStage, StageBase

# kind -> (schema class, the module that runs it). The module is named, not imported: the schema
# stays importable on its own, and posttrain.stages imports a kind's module when it is needed.
STAGE_REGISTRY: dict[str, tuple[type[StageBase], str]] = {
    "sft": (SFTStage, "posttrain.stages.sft"),
    "grpo": (GRPOStage, "posttrain.stages.grpo"),
    "evaluate": (EvaluateStage, "posttrain.stages.evaluate"),
    "rlaif_label": (RlaifLabelStage, "posttrain.stages.rlaif"),
    "reward_model": (RewardModelStage, "posttrain.stages.reward_model"),
    "distill": (DistillStage, "posttrain.stages.distill"),
    "dpo": (DPOStage, "posttrain.stages.dpo"),
    "kto": (KTOStage, "posttrain.stages.kto"),
    "orpo": (ORPOStage, "posttrain.stages.orpo"),
    "rloo": (RLOOStage, "posttrain.stages.rloo"),
}
STAGE_KINDS: dict[str, type[StageBase]] = {kind: schema for kind, (schema, _) in STAGE_REGISTRY.items()}


Stage = tagged_union("kind", STAGE_KINDS, "stage")


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

    @field_validator("name")
    @classmethod
    def _folder_name(cls, name: str) -> str:
        """The name is the run's folder under runs/: `../../x` or `/tmp/x` would write elsewhere."""
        if name.strip() in ("", ".", "..") or "/" in name or "\\" in name:
            raise ValueError(
                f"name '{name}' is not a folder name: the run directory runs/<name> must stay inside runs/; "
                "use letters, digits, '-', '_' or '.' (set output_dir to write elsewhere)"
            )
        return name

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
