"""Cross-checks that need the whole validated recipe, run by `load_recipe` before any
weights load: every bare string names a stage or a path (`references`, which also orders the
stages), every `train:` key is a field of its trl config with a value of the right type,
decontamination has sets to check against, curricula are not undone by shuffling, and gates
have an evaluation to read. Checks that need code above the schema (reward options, data
files' columns, harness tasks, each stage kind's own rules) run in posttrain.loading."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from posttrain.errors import did_you_mean
from posttrain.recipe.base import DataReference, ModelReference
from posttrain.recipe.data import RowOptions
from posttrain.recipe.schema import Recipe
from posttrain.recipe.stages import EvaluateStage, StageBase
from posttrain.recipe.training import LoraSpec
from posttrain.recipe.trl_choices import choices_problem


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
    """trl's config class `name` ("GRPOConfig"), or one in a trl submodule ("experimental.orpo.ORPOConfig")."""
    import importlib

    module, _, cls = name.rpartition(".")
    if module.startswith("experimental"):  # the recipe asked for it by name: no warning on every load
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    return getattr(importlib.import_module(f"trl.{module}" if module else "trl"), cls)


def trainer_defaults(name: str) -> dict[str, Any]:
    """trl's defaults for the fields of config `name` that have one."""
    fields = dataclasses.fields(trainer_config_class(name))
    return {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}


def trainer_settings(stage: StageBase, **defaults: Any) -> dict[str, Any]:
    """A trainer stage's `train:` block over `defaults` (posttrain's) over trl's own defaults."""
    return {**trainer_defaults(stage.trainer_config), **defaults, **stage.train}


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
                problem = choices_problem(trainer_config_class(config), key, value)
                if problem:
                    raise recipe.error(path, *problem)
            _check_length(recipe, ("stages", i, block), getattr(stage, block, None) or {})
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
            for key, value in lora.model_extra.items():
                if key not in fields:
                    hint = did_you_mean(key, fields | set(LoraSpec.model_fields)) or "see peft's LoraConfig"
                    raise recipe.error(("stages", i, "lora", key), "not a LoRA option", hint)
                if problem := choices_problem(LoraConfig, key, value):
                    raise recipe.error(("stages", i, "lora", key), *problem)


def _check_length(recipe: Recipe, path: tuple, train: dict[str, Any]) -> None:
    """`num_train_epochs: 0` (or -1) without `max_steps` trains nothing, silently."""
    epochs, steps = train.get("num_train_epochs"), train.get("max_steps")
    if isinstance(epochs, int | float) and epochs <= 0 and not (isinstance(steps, int) and steps > 0):
        raise recipe.error(
            (*path, "num_train_epochs"), f"{epochs} epochs train 0 steps", "set it above 0, or set max_steps"
        )


def _scalar_types(annotation: Any) -> tuple[type, ...]:
    """The scalar types a plainly typed dataclass field takes (`float`, `int | None`, ...);
    empty for anything richer, which trl checks itself."""
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


def row_options(recipe: Recipe) -> list[tuple[tuple, RowOptions]]:
    """Every data block of the recipe (the eval set's first), with its key path."""
    found = list(blocks(recipe.eval, RowOptions, ("eval",)))
    for i, stage in enumerate(recipe.stages):
        found += blocks(stage, RowOptions, ("stages", i))
    return found


def check_data(recipe: Recipe) -> None:
    """Decontamination has something to check against; a curriculum is not undone by the
    trainer's shuffling."""
    for path, spec in row_options(recipe):
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
    """Gates have an evaluation to read, evaluate stages have data."""
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
