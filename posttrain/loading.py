"""The loading step: a recipe parsed by the schema, then checked against the code above it,
before any weights load. `posttrain run / validate / plan / verify` call `load`.

The schema (`posttrain.recipe.load_recipe`) checks shape and names: keys, types, references
between stages, trl config fields. What needs more than the schema runs here, after it:

- every reward's options bind to its factory (the reward registry, posttrain.rewards);
- local data files have the columns the recipe maps (a peek, posttrain.data_tools.peek);
- lm-eval harness tasks exist (posttrain.harness);
- model slots' loading options fit the model (`config:` keys exist in its config, `quantization:`
  has bitsandbytes and a LoRA to train), and `train:` keys that set a model-config field
  (`router_aux_loss_coef`) name one the model has; configs that cannot be read offline are skipped;
- each stage kind's own `check(stage, recipe, path)` (its module in posttrain/stages/).

Every problem is one `file:line: key: message (fix)` line, as the schema's are.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from posttrain.architecture import model_config, own_slot, text_config
from posttrain.data_tools.peek import check_file_columns
from posttrain.harness import check_harness
from posttrain.models import override_problem
from posttrain.recipe import (
    FileData,
    HarnessSpec,
    PathModel,
    PresetModel,
    Recipe,
    RewardSpec,
    blocks,
    load_recipe,
    row_options,
)
from posttrain.rewards import check_spec
from posttrain.stages import stage_module


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe, then check it against the code; every problem is a
    PosttrainError with file and line."""
    return check_recipe(load_recipe(path, overrides))


def check_recipe(recipe: Recipe) -> Recipe:
    """The checks that need code above the schema, in this order: rewards, data files, harness
    tasks, then each stage kind's own."""
    check_rewards(recipe)
    check_files(recipe)
    check_harness_tasks(recipe)
    check_model_slots(recipe)
    check_model_train_keys(recipe)
    for i, stage in enumerate(recipe.stages):
        check = stage_module(stage).check
        if check is not None:
            check(stage, recipe, ("stages", i))
    return recipe


def check_rewards(recipe: Recipe) -> None:
    """Each reward (GRPO's rewards, distillation verifiers, a reward judge's reward) exists and its
    options bind to its factory's signature and annotations."""
    for path, spec in blocks(recipe, RewardSpec):
        try:
            check_spec(spec.name, spec.options, spec.model is not None)
        except ValueError as e:
            raise recipe.error(path, str(e)) from None


def check_files(recipe: Recipe) -> None:
    """Local data files have the columns that `columns:` and `template:` name."""
    for path, spec in row_options(recipe):
        problem = check_file_columns(spec) if isinstance(spec, FileData) else None
        if problem:
            key, message, fix = problem
            raise recipe.error((*path, key), message, fix)


def check_harness_tasks(recipe: Recipe) -> None:
    """lm-eval is installed and knows every task an evaluation names."""
    for path, harness in blocks(recipe, HarnessSpec):
        problem = check_harness(harness)
        if problem:
            raise recipe.error(path, *problem)


# trl config keys that override the model-config field of the same name: a model whose config has
# no such field ignores them (DeepSeek-V2/V3 have no router auxiliary loss).
MODEL_CONFIG_TRAIN_KEYS = ("router_aux_loss_coef",)


def check_model_slots(recipe: Recipe) -> None:
    """Every model slot's loading options: `config:` keys exist in the model's config (when it can
    be read here), `quantization:` has bitsandbytes installed and, where a stage trains from the
    slot, a `lora:` (k-bit weights take no gradient)."""
    for path, slot in blocks(recipe, (PathModel, PresetModel)):
        if slot.config:
            config = model_config(recipe, slot.model_copy(update={"config": {}}))
            for key in slot.config:
                problem = override_problem(config, key)
                if problem:
                    raise recipe.error((*path, "config", key), *problem)
        if slot.quantization is not None and importlib.util.find_spec("bitsandbytes") is None:
            raise recipe.error(
                (*path, "quantization"), "quantization needs bitsandbytes, which is not installed",
                "pip install bitsandbytes (0.48+ has a CPU backend), or remove `quantization:`",
            )  # fmt: skip
        if slot.quantization is not None and "students" in path:
            raise recipe.error(
                (*path, "quantization"), "students are fully fine-tuned; k-bit weights take no gradient",
                "remove `quantization:` from the student",
            )  # fmt: skip
    for i, stage in enumerate(recipe.stages):
        trains_it = stage.trainer_config and stage.start_field == "model"  # (a teacher is frozen)
        slot = own_slot(recipe, stage.starting_model()) if trains_it else None
        if slot and slot.quantization and getattr(stage, "lora", None) is None:
            raise recipe.error(
                ("stages", i, "lora"), f"stage '{stage.name}' would fully fine-tune a quantised model",
                "add `lora:` (QLoRA), or drop the model's `quantization:`",
            )  # fmt: skip


def check_model_train_keys(recipe: Recipe) -> None:
    """`train:` keys that set a model-config field name one the model's config has."""
    for i, stage in enumerate(recipe.stages):
        train = (getattr(stage, "train", None) or {}) if stage.start_field == "model" else {}
        keys = [k for k in MODEL_CONFIG_TRAIN_KEYS if k in train]
        config = model_config(recipe, stage.starting_model()) if keys else None
        if config is None:
            continue
        text = text_config(config)
        for key in keys:
            if not hasattr(text, key):
                raise recipe.error(
                    ("stages", i, "train", key), f"{text.model_type} configs have no {key}, so it would do nothing",
                    "remove it (DeepSeek-style routers balance with `moe.bias_update_rate`)",
                )  # fmt: skip
