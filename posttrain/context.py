"""What a stage sees of the run: `StageContext`, built by the runner for each stage.

Where to write (`out_dir`), what it may read (`stage_dirs`: the finished stages), the seed, and
how to resolve its slots: `ctx.model(ref)` turns a model slot into a path (a stage's `model/`,
a materialised preset, or as given) and `ctx.data(spec)` loads a data slot's rows. A stage
reads its inputs through it and nothing else, so any stage can be re-run alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from posttrain import artifacts
from posttrain.data_tools import DataReport, load_rows
from posttrain.distributed import on_main, state, unsharded_loading
from posttrain.models import materialize_preset
from posttrain.recipe import PathModel, PresetModel


@dataclasses.dataclass(frozen=True)
class StageContext:
    """What a stage sees of the run: where to write, what it may read, and the seed."""

    stage: str
    out_dir: Path
    run_dir: Path
    seed: int
    base_model: PresetModel | PathModel
    stage_dirs: Mapping[str, Path]
    resume: bool = False
    eval: Any = None

    def model(self, ref: Any) -> PathModel:
        """A model slot resolved to a path: a stage's `model/`, a materialised preset, or as given."""
        if ref is None:
            ref = self.base_model
        if isinstance(ref, PresetModel):
            dest = self.run_dir / artifacts.PRESETS / f"{ref.preset}-seed{self.seed}"
            with unsharded_loading():
                on_main(materialize_preset, ref.preset, self.seed, dest)
            return PathModel(path=str(dest))
        if isinstance(ref, PathModel):
            return ref
        if ref in self.stage_dirs:
            return PathModel(path=str(self.stage_dirs[ref] / artifacts.MODEL))
        return PathModel(path=str(ref))

    def data(self, spec: Any) -> Any:
        """Rows of a data slot; what dedup / decontamination removed goes to data_report.json."""
        report = DataReport()
        rows = load_rows(spec, seed=self.seed, stage_dirs=self.stage_dirs, report=report)
        if self.is_main:
            report.save(self.out_dir / artifacts.DATA_REPORT)
        return rows

    @property
    def is_main(self) -> bool:
        return state().is_main_process

    def barrier(self) -> None:
        state().wait_for_everyone()
