"""`<stage>/samples.jsonl`: the completions an RL stage generated, with their rewards.

One line per completion of every logged step:

    {"step": 40, "prompt": [...], "completion": "<think>...", "rewards": {"accuracy": 1.0,
     "format": 1.0}, "advantage": 0.71}

trl's GRPOTrainer (with `log_completions`) writes each logged step's generation batch to
`<output_dir>/completions/completions_<step>.parquet` right after the `on_log` callbacks
run; `SamplesLog.on_log` turns the files written so far into JSONL lines (append, flush,
fsync: a SIGKILL loses at most a torn last line, which readers skip) and `collect()` picks
up the rest at the end. Steps already in the file (a resumed run) are not written twice,
nor is a batch identical to the previous one (logging more often than generating).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from posttrain import artifacts
from posttrain.rewards.text import completion_text

TABLE_COLUMNS = {"step", "prompt", "completion", "advantage"}  # the rest are rewards (and log_extra)


class SamplesLog(TrainerCallback):
    def __init__(self, path: Path, parquet_dir: Path) -> None:
        self.path = path
        self.parquet_dir = parquet_dir
        self.rows = 0
        self._last_batch: int | None = None
        self._logged = {row.get("step") for row in artifacts.read_jsonl(path)}

    def on_log(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.collect()

    def collect(self) -> None:
        for file in sorted(self.parquet_dir.glob("completions_*.parquet")):
            step = int(file.stem.rpartition("_")[2])
            if step not in self._logged:
                self._append(file)
                self._logged.add(step)

    def _append(self, file: Path) -> None:
        import pandas as pd

        frame = pd.read_parquet(file)
        batch = hash(frame.drop(columns=["step"]).to_json())
        if batch == self._last_batch:
            return
        self._last_batch = batch
        rows = [sample_row(record) for record in frame.to_dict(orient="records")]
        artifacts.append_jsonl(self.path, rows)
        self.rows += len(rows)


def sample_row(record: dict[str, Any]) -> dict[str, Any]:
    """One parquet record as a JSON-ready line; a reward's NaN (it returned None) becomes null."""
    return {
        "step": int(record["step"]),
        "prompt": _plain(record["prompt"]),
        "completion": completion_text(_plain(record["completion"])),
        "rewards": {k: _plain(v) for k, v in record.items() if k not in TABLE_COLUMNS},
        "advantage": _plain(record["advantage"]),
    }


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, float) and value != value:
        return None
    return value
