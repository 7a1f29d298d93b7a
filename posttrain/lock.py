"""One run at a time per run directory: an exclusive `flock` on `<run_dir>/run.lock`.

`posttrain run` takes the lock before it writes anything and holds it until it ends (under
`accelerate launch`, the main process holds it for every rank). A second run of the same
directory, same recipe or not, is refused with one line that names the holder (pid, host,
start time), which the lock file records. The kernel drops a flock when its process dies,
however it dies, so a lock left by a killed run is never stuck: the next run takes it and
says whose it was. `plan` and `verify` only read; `live_holder` tells them whether a run is on.

The lock file itself is never deleted (a run that opened the old file would lock a file
nobody else sees); a run that ends cleanly empties it, so "the last holder did not release
it" is exactly a non-empty file we can lock.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from posttrain.artifacts import LOCK
from posttrain.errors import PosttrainError, warn

PROBE_GRACE_S = 1.0  # a `plan` probing the lock holds it for microseconds; a run retries this long
_HELD: set[int] = set()  # descriptors of the locks this process holds


def _close_in_child() -> None:
    """A forked child (a DataLoader worker) would share the lock and keep it alive after its parent
    was killed; its copies are closed at once, which leaves the parent's lock as it is."""
    for fd in _HELD:
        os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds (or last held) a run directory's lock."""

    pid: int
    host: str
    started: str  # local time, ISO 8601

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started}"


class RunLock:
    """The lock of one run directory: `acquire()` once, `release()` when the run ends."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK
        self._fd: int | None = None

    def acquire(self) -> Holder | None:
        """Take the lock, or raise naming its live holder. Returns the previous holder when it
        died without releasing the lock (a killed run), so the caller can say it took over."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise PosttrainError(
                f"cannot write the run directory {self.path.parent}: {e.strerror}",
                key="output_dir",
                fix="pick a writable folder",
            ) from None
        try:
            locked = _lock(fd, fcntl.LOCK_EX, PROBE_GRACE_S)
        except OSError as e:  # a filesystem without locks (some NFS mounts): run, but say so
            os.close(fd)
            warn(
                f"cannot lock {self.path} ({e.strerror}): a second run of this directory would not be refused"
            )
            return None
        if not locked:
            os.close(fd)
            holder = read_holder(self.path)
            raise PosttrainError(
                f"{self.path.parent} is in use by another run ({holder or 'holder unknown'})",
                fix="wait for it to finish or stop it; for a second run at once, set another output_dir",
            )
        stale = _parse(os.pread(fd, 4096, 0))
        me = Holder(os.getpid(), socket.gethostname(), time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(dataclasses.asdict(me)).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        _HELD.add(fd)
        return stale

    def release(self) -> None:
        """Empty the lock file (a clean end leaves no holder behind) and unlock it."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        _HELD.discard(fd)
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the last descriptor drops the flock


def live_holder(run_dir: Path) -> Holder | None:
    """The holder of the run directory's lock while a run holds it, else None. Never blocks:
    a shared lock taken and dropped at once (a starting run retries past it)."""
    path = Path(run_dir) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        if _lock(fd, fcntl.LOCK_SH, 0.0):
            return None
        return read_holder(path) or Holder(0, "unknown host", "unknown time")
    except OSError:  # a filesystem without locks: nothing can be known
        return None
    finally:
        os.close(fd)  # also drops the probe's shared lock


def read_holder(path: Path) -> Holder | None:
    try:
        return _parse(path.read_bytes())
    except OSError:
        return None


def _parse(data: bytes) -> Holder | None:
    try:
        fields = json.loads(data)
        return Holder(int(fields["pid"]), str(fields["host"]), str(fields["started"]))
    except (ValueError, KeyError, TypeError):
        return None  # empty (released cleanly) or being written this instant


def _lock(fd: int, mode: int, grace_s: float) -> bool:
    """Try to flock `fd` without waiting, for up to `grace_s` seconds; False if another holds it."""
    deadline = time.monotonic() + grace_s
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
