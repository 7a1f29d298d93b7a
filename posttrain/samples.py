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

trl's RLOOTrainer keeps the same table of the logged batch in memory and writes no parquet:
`SamplesLog(path, trainer=...)`, given the trainer once it is built, reads that table in
`on_log`, while it still holds the step being logged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from posttrain import artifacts
from posttrain.rewards.text import completion_text

TABLE_COLUMNS = {"step", "prompt", "completion", "advantage"}  # the rest are rewards (and log_extra)


class SamplesLog(TrainerCallback):
    def __init__(self, path: Path, parquet_dir: Path | None = None) -> None:
        self.path = path
        self.parquet_dir = parquet_dir
        self.trainer: Any = None  # a trainer whose in-memory `_logs` table to read (no parquet_dir)
        self.rows = 0
        self._last_batch: int | None = None
        self._logged = {row.get("step") for row in artifacts.read_jsonl(path)}

    def on_log(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        if self.trainer is not None and state.global_step not in self._logged:
            self._append(logged_table(self.trainer, state.global_step))
            self._logged.add(state.global_step)
        self.collect()

    def collect(self) -> None:
        if self.parquet_dir is None:
            return
        import pandas as pd

        for file in sorted(self.parquet_dir.glob("completions_*.parquet")):
            step = int(file.stem.rpartition("_")[2])
            if step not in self._logged:
                self._append(pd.read_parquet(file))
                self._logged.add(step)

    def _append(self, frame: Any) -> None:
        if frame is None or not len(frame):
            return
        batch = hash(frame.drop(columns=["step"]).to_json())
        if batch == self._last_batch:
            return
        self._last_batch = batch
        rows = [sample_row(record) for record in frame.to_dict(orient="records")]
        artifacts.append_jsonl(self.path, rows)
        self.rows += len(rows)


def logged_table(trainer: Any, step: int) -> Any:
    """The trainer's table of the batch it is logging, as the parquet files hold it (None if empty)."""
    import pandas as pd

    logs = getattr(trainer, "_logs", None) or {}
    if not logs.get("prompt"):
        return None
    table = {"step": [step] * len(logs["prompt"]), "prompt": list(logs["prompt"]),
             "completion": list(logs["completion"]),
             **{name: list(values) for name, values in logs.get("rewards", {}).items()},
             **{name: list(values) for name, values in logs.get("extra", {}).items()},
             "advantage": list(logs["advantages"])}  # fmt: skip
    return pd.DataFrame(table)


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
