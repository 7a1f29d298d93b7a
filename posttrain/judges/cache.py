"""The judge cache: every judge result on disk, so a re-run or a crash never pays for it twice.

One append-only JSONL file per judge (its id hashes the judge's config and model), one record
`{"key": ..., "value": ...}` per result, flushed and fsynced as it is written. A SIGKILL can
tear at most the last line; it is cut off when the cache is next opened. The file lives in
`<run>/cache/judges/`, outside the stage folder, so it outlives a re-run with other settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from posttrain.console import progress
from posttrain.distributed import map_batches


def cache_key(*parts: Any) -> str:
    """A stable key for a judge call: (judge id, prompt, answers...), whatever their types."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class JudgeCache:
    """Results by key, loaded from and appended to `path` (None: kept in memory only).
    Thread-safe appends. Under `accelerate launch` every rank loads the file and only the main
    process (`write=True`) appends to it."""

    def __init__(self, path: Path | None, write: bool = True) -> None:
        self.path = Path(path) if path is not None else None
        self.write = write
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()
        self._values = _load(self.path) if self.path is not None else {}

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, key: str) -> bool:
        return key in self._values

    def get(self, key: str) -> Any:
        return self._values.get(key)

    def put_many(self, items: Iterable[tuple[str, Any]]) -> None:
        """Append records and make them durable (one fsync for the batch) before returning."""
        lines = []
        for key, value in items:
            self._values[key] = value
            lines.append(json.dumps({"key": key, "value": value}, ensure_ascii=False) + "\n")
        if not lines or self.path is None or not self.write:
            return
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("".join(lines))
                f.flush()
                os.fsync(f.fileno())

    def map(
        self,
        keys: Sequence[str],
        compute: Callable[[list[int]], list[Any]],
        chunk: int,
        description: str | None = None,
    ) -> list[Any]:
        """The value of every key: cached ones read, the rest computed `chunk` at a time by
        `compute(indices)` and stored after each round of chunks, so a crash loses one round at
        most. The chunks are split over the ranks (`distributed.map_batches`): every rank must
        call this with the same keys and the same cache file. With a `description`, a progress
        bar counts the computed ones."""
        values: list[Any] = [None] * len(keys)
        todo: list[int] = []
        first: dict[str, int] = {}
        for i, key in enumerate(keys):
            if key in self._values:
                values[i] = self._values[key]
                self.hits += 1
            elif key in first:
                continue  # the same call twice in one batch: computed once below
            else:
                first[key] = i
                todo.append(i)
        self.misses += len(todo)
        chunks = [todo[start : start + chunk] for start in range(0, len(todo), chunk)]

        def store(finished: list[tuple[list[int], list[Any]]]) -> None:
            self.put_many(
                (keys[i], r) for batch, results in finished for i, r in zip(batch, results, strict=True)
            )
            advance(sum(len(batch) for batch, _ in finished))

        with progress(description, len(todo)) as advance:
            map_batches(chunks, compute, done=store)
        for i, key in enumerate(keys):
            if values[i] is None:
                values[i] = self._values[key]
        return values


def _load(path: Path) -> dict[str, Any]:
    """Every complete record; a torn last line (a crash mid-write) is cut off the file."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    values: dict[str, Any] = {}
    for line in data[:end].splitlines():
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # a line torn by an older crash, already followed by good ones
        if isinstance(record, dict) and "key" in record:
            values[record["key"]] = record.get("value")
    return values
