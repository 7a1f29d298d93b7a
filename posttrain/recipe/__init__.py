"""The recipe: one YAML file that describes a whole post-training run. This package is the
schema alone: it imports nothing of posttrain but `posttrain.errors`.

`load_recipe(path, overrides)` reads the YAML (keeping line numbers), applies `--set`
overrides, validates it with pydantic and checks every `train:` key against the matching
trl config dataclass, so a typo fails in a second with `file:line: key: message`, not
after an hour of training. Unknown keys are errors everywhere, with a did-you-mean. The
checks that need code above the schema (reward options, data files, harness tasks, each stage
kind's own) run after it, in `posttrain.loading.load`, which is what the CLI calls.

A bare string in a model or data slot (`model: sft`, `data: label`) is another stage's
name, or else a path / hub id; `references()` lists them so the runner can order stages.

The schema is split by topic: base.py (`Strict`, references, model slots, `tagged_union`),
data.py (data blocks and row options), training.py (LoRA, MoE, rewards), evaluation.py (eval,
gates, harness), stages.py (`StageBase`, guard, sft / evaluate / grpo / rloo), distill.py, rlaif.py
(judges, labels, reward model), preference.py (dpo, kto, orpo), schema.py (STAGE_REGISTRY, `Recipe`);
source.py reads YAML with line numbers, loading.py is `load_recipe`, checks.py the cross-checks. Import from
`posttrain.recipe`; every public name is re-exported here.
"""

from posttrain.recipe.base import (
    DataReference,
    LoadOptions,
    ModelRef,
    ModelReference,
    PathModel,
    PresetModel,
    Quantization,
    Strict,
    tagged_union,
)
from posttrain.recipe.checks import (
    blocks,
    check_data,
    check_evaluation,
    check_references,
    check_trainer_keys,
    looks_like_path,
    references,
    row_options,
    stage_dependencies,
    trainer_config_class,
    trainer_defaults,
    trainer_settings,
)
from posttrain.recipe.data import (
    CurriculumSpec,
    DataSpec,
    DecontaminateSpec,
    DedupSpec,
    FileData,
    MixSource,
    MixtureData,
    RowOptions,
    SyntheticData,
    template_fields,
)
from posttrain.recipe.distill import (
    DENSE_SIZE_KEYS,
    STUDENT_NAME,
    DistillStage,
    GenerationSpec,
    MixSpec,
    StudentSpec,
    VerifierSpec,
    check_dense_sizes,
)
from posttrain.recipe.evaluation import EvalOptions, EvalSpec, GateSpec, HarnessSpec, fill_eval_defaults
from posttrain.recipe.generation import ENV_NAME, Backend, Endpoint, ServerSpec
from posttrain.recipe.loading import load_recipe
from posttrain.recipe.preference import SMOOTHED_LOSSES, DPOStage, KTOStage, ORPOStage, PreferenceStage
from posttrain.recipe.rlaif import (
    CONSTITUTIONS,
    JUDGE_BACKENDS,
    HFJudgeSpec,
    JudgeSpec,
    Labels,
    LikelihoodJudgeSpec,
    OpenAIJudgeSpec,
    Principles,
    RewardJudgeSpec,
    RewardModelStage,
    RlaifLabelStage,
    SamplingSpec,
    constitution_names,
    load_principles,
)
from posttrain.recipe.schema import STAGE_KINDS, STAGE_REGISTRY, Recipe, Stage
from posttrain.recipe.source import RecipeLoader, SourceMap, apply_override, parse_value, read_yaml
from posttrain.recipe.stages import (
    STAGE_NAME,
    EvaluateStage,
    GRPOStage,
    GuardSpec,
    RLGuardSpec,
    RLOOStage,
    RLStage,
    SFTStage,
    StageBase,
)
from posttrain.recipe.training import LoraSpec, LoraTarget, MoESpec, RewardSpec

__all__ = [
    "CONSTITUTIONS",
    "DENSE_SIZE_KEYS",
    "SMOOTHED_LOSSES",
    "ENV_NAME",
    "JUDGE_BACKENDS",
    "Backend",
    "Endpoint",
    "ServerSpec",
    "STAGE_KINDS",
    "STAGE_REGISTRY",
    "STAGE_NAME",
    "STUDENT_NAME",
    "CurriculumSpec",
    "DataReference",
    "DataSpec",
    "DecontaminateSpec",
    "DedupSpec",
    "DPOStage",
    "DistillStage",
    "EvalOptions",
    "EvalSpec",
    "EvaluateStage",
    "FileData",
    "GRPOStage",
    "GateSpec",
    "GenerationSpec",
    "GuardSpec",
    "HFJudgeSpec",
    "HarnessSpec",
    "JudgeSpec",
    "KTOStage",
    "Labels",
    "LikelihoodJudgeSpec",
    "LoraSpec",
    "LoraTarget",
    "MixSource",
    "MixSpec",
    "MixtureData",
    "MoESpec",
    "LoadOptions",
    "ModelRef",
    "ModelReference",
    "ORPOStage",
    "OpenAIJudgeSpec",
    "PathModel",
    "PreferenceStage",
    "PresetModel",
    "Principles",
    "Quantization",
    "Recipe",
    "RecipeLoader",
    "RewardJudgeSpec",
    "RewardModelStage",
    "RewardSpec",
    "RLGuardSpec",
    "RLOOStage",
    "RLStage",
    "RlaifLabelStage",
    "RowOptions",
    "SFTStage",
    "SamplingSpec",
    "SourceMap",
    "Stage",
    "StageBase",
    "Strict",
    "StudentSpec",
    "SyntheticData",
    "VerifierSpec",
    "apply_override",
    "blocks",
    "check_data",
    "check_dense_sizes",
    "check_evaluation",
    "check_references",
    "check_trainer_keys",
    "constitution_names",
    "fill_eval_defaults",
    "load_principles",
    "load_recipe",
    "looks_like_path",
    "parse_value",
    "read_yaml",
    "references",
    "row_options",
    "stage_dependencies",
    "tagged_union",
    "template_fields",
    "trainer_config_class",
    "trainer_defaults",
    "trainer_settings",
]
