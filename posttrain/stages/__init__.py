"""One module per stage kind, each with one entry function `run(stage, ctx) -> metrics`.

Modules are imported only when their stage runs, so `posttrain --help` stays instant.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

RUNNERS = {
    "sft": "posttrain.stages.sft",
    "evaluate": "posttrain.stages.evaluate",
    "grpo": "posttrain.stages.grpo",
    "rlaif_label": "posttrain.stages.rlaif",
    "reward_model": "posttrain.stages.reward_model",
    "distill": "posttrain.stages.distill",
}


def get_runner(kind: str) -> Callable[..., dict[str, Any]]:
    return importlib.import_module(RUNNERS[kind]).run
