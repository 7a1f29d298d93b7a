"""One module per stage kind; `recipe.STAGE_REGISTRY` maps each kind to its schema class and module.

Every module exposes the same names, and nothing outside it branches on the kind:

    run(stage, ctx) -> Metrics              the stage itself (heavy imports inside)
    Metrics                                 a TypedDict: what `run` returns and metrics.json holds
                                            (from the pieces in posttrain.metrics)
    check(stage, recipe, path) -> None      recipe-time checks that need code above the schema
                                            (posttrain.loading runs them); None: nothing to check
    slot(stage) -> Slot | None              what preflight loads and checks (posttrain.preflight)
    workload(stage, recipe, shapes) -> Workload | list[Phase] | str
                                            what a GPU holds while it trains (posttrain.memory),
                                            or the phases it runs one after another (distill);
                                            None: not estimated (the memory plan says so)
    headline(name, metrics, start) -> list[str]
                                            the report's sentence on whether the stage did its job
                                            (posttrain.report); None: the table says it all
    outcome(metrics, curves) -> list[str]   what it did in a few words: the report's `training`
                                            cell and the console's closing line; None: nothing
    loss_panel: str | None                  the title of its panel in loss.png; None: no loss
                                            worth plotting (RL's reward is plotted instead)

Modules are imported when first needed, so `posttrain --help` stays instant.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

from posttrain.recipe import STAGE_REGISTRY, StageBase


@dataclasses.dataclass(frozen=True)
class Slot:
    """What a stage reads and generates: preflight's checks need nothing else of it."""

    model: Any  # whose tokenizer and positions apply (a stage name, a model spec, None = base)
    data: Any
    columns: tuple[str, ...] | None  # the columns it needs; None: `row_format` checks the rows
    new_tokens: int | None = None  # generated after each prompt (None: a training row, whole)
    max_length: int | None = None  # the trainer truncates rows to this
    rewards: tuple[Any, ...] = ()  # rewards (or verifiers) to run on a few rows
    reward_kind: str = "reward"
    row_format: Callable[[Any], Any] | None = None  # rows in one of several formats (SFT's), or raises
    # (tokenizer, rows, data label) -> facts about the rows as the stage will train on them (SFT: its
    # loss masking path); raises PosttrainError naming the first row the stage would refuse
    row_check: Callable[[Any, Any, str], list[str]] | None = None


def stage_module(stage: StageBase | str) -> ModuleType:
    """The module of a stage (or of a kind, by name)."""
    kind = stage if isinstance(stage, str) else stage.kind
    return importlib.import_module(STAGE_REGISTRY[kind][1])
