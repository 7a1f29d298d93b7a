"""A small persistent pool of worker processes with a hard timeout on every item.

math-verify's own timeouts use `signal.alarm`, which raises outside the main thread; trl's
stock reward then turns them off, and one pathological `simplify` can hang training. Here
each item runs in a worker process; a worker that overruns its item's deadline is killed
and replaced by a fresh one, the item is reported as a timeout, and the other items carry
on. A worker that dies (segfault, OOM) is reported as an error the same way. Any thread may
call `map`; calls are serialised. The worker side is `pool_worker.py`.

A worker is a fresh `python -m` interpreter, never a fork or a multiprocessing spawn: those
would copy the trainer's threads and CUDA state (fork) or import the caller's main script in
every worker (spawn, forkserver: a user's script without a `__main__` guard would run again).
A fresh interpreter takes a second or two to import math-verify, so a pool that has had to
kill a worker keeps one spare started, and the next replacement is ready at once.
bench/pool_bench.py measures this pool against pebble's ProcessPool.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import subprocess
import sys
import threading
import time
from collections import deque
from multiprocessing.connection import Connection, wait
from typing import Any

OK, TIMEOUT, ERROR, READY = "ok", "timeout", "error", "ready"
STARTUP_TIMEOUT = 120.0  # seconds a fresh worker may take to import its modules


@dataclasses.dataclass(frozen=True)
class Outcome:
    status: str  # "ok" | "timeout" | "error"
    value: Any = None  # the function's result when ok, a short error text otherwise


class _Worker:
    """One `python -m posttrain.rewards.pool_worker` process; a fresh interpreter, so nothing of the
    parent (threads, CUDA, its __main__) is inherited or re-imported."""

    def __init__(self, target: str, preload: tuple[str, ...]) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "posttrain.rewards.pool_worker", target, *preload],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self.to_worker = Connection(os.dup(self.process.stdin.fileno()), readable=False)
        self.conn = Connection(os.dup(self.process.stdout.fileno()), writable=False)
        self.process.stdin.close()
        self.process.stdout.close()
        self.ready = False  # True once it has imported everything and said so

    def send(self, message: Any) -> None:
        self.to_worker.send(message)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)
        self._close()

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.to_worker.send(None)
        try:
            self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self._close()

    def _close(self) -> None:
        self.to_worker.close()
        self.conn.close()


class WorkerPool:
    """`processes` workers that each import `target` ("module:function") once and call it per item."""

    def __init__(self, target: str, processes: int, preload: tuple[str, ...] = ()) -> None:
        self.target = target
        self.preload = preload
        self.processes = max(1, processes)
        self._workers: list[_Worker] = []
        self._spare: _Worker | None = None  # started after the first kill, for the next one
        self._lock = threading.Lock()
        self.restarts = 0

    def map(self, items: list[tuple], timeout: float) -> list[Outcome]:
        """Call the target on each item's arguments; every item gets an Outcome within ~`timeout` s."""
        if not items:
            return []
        with self._lock:
            self._start()
            return self._dispatch(items, timeout)

    def start(self) -> None:
        """Launch the workers now (they import in the background), so the first `map` need not wait."""
        with self._lock:
            self._start()

    def close(self) -> None:
        with self._lock:
            for worker in [*self._workers, *([self._spare] if self._spare else [])]:
                worker.stop()
            self._workers, self._spare = [], None

    def _start(self) -> None:
        while len(self._workers) < self.processes:
            self._workers.append(_Worker(self.target, self.preload))

    def _replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        fresh = self._spare or _Worker(self.target, self.preload)
        self._spare = _Worker(self.target, self.preload)  # imports while idle
        self._workers[self._workers.index(worker)] = fresh
        self.restarts += 1
        return fresh

    def _dispatch(self, items: list[tuple], timeout: float) -> list[Outcome]:
        results: list[Outcome | None] = [None] * len(items)
        pending = deque(range(len(items)))
        idle = list(self._workers)
        busy: dict[Connection, tuple[_Worker, int, float]] = {}
        while pending or busy:
            while idle and pending:
                worker, index = idle.pop(), pending.popleft()
                try:
                    worker.send((index, items[index]))
                except (OSError, ValueError):  # the worker died while idle
                    idle.append(self._replace(worker))
                    pending.appendleft(index)
                    continue
                # the item's clock starts once a fresh worker has finished importing
                allowed = timeout if worker.ready else STARTUP_TIMEOUT + timeout
                busy[worker.conn] = (worker, index, time.monotonic() + allowed)
            soonest = min(deadline for _, _, deadline in busy.values())
            for conn in wait(list(busy), timeout=max(0.0, soonest - time.monotonic())):
                worker, index, _ = busy.pop(conn)
                try:
                    _, status, value = conn.recv()
                    if status == READY:
                        worker.ready = True
                        busy[conn] = (worker, index, time.monotonic() + timeout)
                        continue
                    results[index] = Outcome(status, value)
                except (EOFError, OSError):
                    results[index] = Outcome(ERROR, "worker process died")
                    worker = self._replace(worker)
                idle.append(worker)
            now = time.monotonic()
            for conn, (worker, index, deadline) in list(busy.items()):
                if now >= deadline:
                    del busy[conn]
                    results[index] = Outcome(TIMEOUT, f"over {timeout:g}s")
                    idle.append(self._replace(worker))
        return [r if r is not None else Outcome(ERROR, "lost") for r in results]


_POOLS: dict[str, WorkerPool] = {}
_POOLS_LOCK = threading.Lock()


def shared_pool(target: str, processes: int | None = None, preload: tuple[str, ...] = ()) -> WorkerPool:
    """The process-wide pool for `target`, created on first use (default: min(4, CPU count) workers)."""
    with _POOLS_LOCK:
        pool = _POOLS.get(target)
        if pool is None:
            pool = WorkerPool(target, processes or min(4, os.cpu_count() or 1), preload)
            _POOLS[target] = pool
        elif processes and processes > pool.processes:
            pool.processes = processes
        return pool


@atexit.register
def _close_pools() -> None:
    for pool in list(_POOLS.values()):
        pool.close()
