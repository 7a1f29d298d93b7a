"""A built reward never crashes training: the wrapper every reward runs inside.

`Reward` calls the reward function with trl's arguments and returns one finite float or None
per completion, whatever happens. A reward that raises on the batch is retried one sample
at a time, so a single bad row costs that row (None), not the batch. A reward that returns the
wrong number of scores is not retried: that is a bug in the reward, not in a row, and a retry
one by one would hide it; every completion of the batch counts as an error. It counts samples,
None results, errors and timeouts (`stats`) and reports them through trl's `log_metric`
as `rewards/<name>/errors`, `rewards/<name>/none_frac` and whatever the reward logs itself
(the accuracy reward logs `timeouts`). `last_error` keeps the latest failure, so a guard that
stops training on a reward that never scores can say why.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("posttrain.rewards")


class RewardStats:
    """Running totals of one reward (thread-safe): what `posttrain rewards score` and metrics.json report."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.totals: dict[str, float] = {"samples": 0, "none": 0, "errors": 0, "timeouts": 0, "seconds": 0.0}

    def add(self, key: str, value: float) -> None:
        with self._lock:
            self.totals[key] = self.totals.get(key, 0) + value

    def as_dict(self) -> dict[str, float]:
        with self._lock:
            totals = dict(self.totals)
        seconds = totals.get("seconds", 0.0)
        totals["samples_per_s"] = totals["samples"] / seconds if seconds > 0 else 0.0
        return totals


class Reward:
    """A reward function with trl's signature, hardened: see the module docstring."""

    def __init__(self, name: str, fn: Callable[..., list[Any]], columns: tuple[str, ...] = ()) -> None:
        self.__name__ = name  # trl names metrics and completion-table columns after it
        self.name = name
        self.fn = fn
        self.columns = columns
        self.stats = RewardStats()
        self.last_error: str | None = None

    def __repr__(self) -> str:
        return f"Reward({self.name!r})"

    def __call__(
        self, prompts: list[Any] | None = None, completions: list[Any] | None = None, **kwargs: Any
    ) -> list[float | None]:
        completions = list(completions or [])
        n = len(completions)
        outer_log = kwargs.pop("log_metric", None)
        reported = {"errors": 0.0}  # errors the reward counts itself join the guard's own

        def log_metric(key: str, value: float) -> None:
            if key in reported:
                reported[key] += value
                return
            self.stats.add(key, value)
            if outer_log is not None:
                outer_log(f"rewards/{self.name}/{key}", value)

        started = time.perf_counter()
        errors = 0
        try:
            scores = _clean(
                self.fn(prompts=prompts, completions=completions, log_metric=log_metric, **kwargs), n
            )
        except WrongCount as e:  # the reward's own contract is broken, whatever the rows
            self.last_error = str(e)
            logger.warning("reward '%s' %s; counted as %d errors", self.name, e, n)
            scores, errors = [None] * n, n
        except Exception as e:  # any failure of the batch: retry sample by sample
            self.last_error = _short(e)
            logger.warning(
                "reward '%s' failed on a batch of %d (%s); scoring one by one", self.name, n, _short(e)
            )
            scores = [self._one(i, prompts, completions, kwargs, log_metric) for i in range(n)]
            errors = sum(s is _FAILED for s in scores)
            scores = [None if s is _FAILED else s for s in scores]
        errors += reported["errors"]
        nones = sum(s is None for s in scores)
        for key, value in (
            ("seconds", time.perf_counter() - started),
            ("samples", n),
            ("none", nones),
            ("errors", errors),
        ):
            self.stats.add(key, value)
        if outer_log is not None and n:
            outer_log(f"rewards/{self.name}/errors", errors)
            outer_log(f"rewards/{self.name}/none_frac", nones / n)
        return scores

    def _one(self, i: int, prompts: Any, completions: list[Any], kwargs: dict, log_metric: Callable) -> Any:
        """Score sample `i` alone (every per-row argument sliced to it); _FAILED when it raises."""
        n = len(completions)
        row = {
            k: (v[i : i + 1] if isinstance(v, list | tuple) and len(v) == n else v) for k, v in kwargs.items()
        }
        prompt = prompts[i : i + 1] if isinstance(prompts, list | tuple) and len(prompts) == n else prompts
        try:
            return _clean(
                self.fn(prompts=prompt, completions=completions[i : i + 1], log_metric=log_metric, **row), 1
            )[0]
        except Exception as e:
            logger.debug("reward '%s' failed on sample %d: %s", self.name, i, _short(e))
            return _FAILED


_FAILED = object()


class WrongCount(ValueError):
    """A reward returned a list of scores whose length is not the number of completions."""


def _clean(scores: Any, n: int) -> list[float | None]:
    """One finite float or None per completion; anything else is the reward's bug (ValueError)."""
    scores = list(scores)
    if len(scores) != n:
        raise WrongCount(f"returned {len(scores)} scores for {n} completions")
    out: list[float | None] = []
    for s in scores:
        if s is None:
            out.append(None)
            continue
        value = float(s)
        out.append(value if math.isfinite(value) else None)
    return out


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e)[:200]}"
