"""The loading step: a recipe parsed by the schema, then checked against the code above it,
before any weights load. `posttrain run / validate / plan / verify` call `load`.

The schema (`posttrain.recipe.load_recipe`) checks shape and names: keys, types, references
between stages, trl config fields. What needs more than the schema runs here, after it:

- every reward's options bind to its factory (the reward registry, posttrain.rewards);
- local data files have the columns the recipe maps (a peek, posttrain.data_tools.peek);
- lm-eval harness tasks exist (posttrain.harness);
- each stage kind's own `check(stage, recipe, path)` (its module in posttrain/stages/).

Every problem is one `file:line: key: message (fix)` line, as the schema's are.
"""

from __future__ import annotations

from pathlib import Path

from posttrain.data_tools.peek import check_file_columns
from posttrain.harness import check_harness
from posttrain.recipe import FileData, HarnessSpec, Recipe, RewardSpec, blocks, load_recipe, row_options
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
