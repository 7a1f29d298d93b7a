"""The worker side of `pool.py`: `python -m posttrain.rewards.pool_worker MODULE:FUNCTION [PRELOAD...]`.

Reads `(index, args)` messages on stdin and answers `(index, status, value)` on stdout until
EOF; it announces `ready` once its imports are done, so the caller's clock for an item starts
then. Kept apart from `pool.py` so that running it imports nothing it does not need.
"""

from __future__ import annotations

import importlib
import os
import sys
from multiprocessing.connection import Connection

from posttrain.rewards.pool import ERROR, OK, READY


def serve(target: str, preload: list[str]) -> None:
    """Worker loop on stdin/stdout: receive (index, args), reply (index, status, value) until EOF.

    The protocol owns fd 1; anything the judged code prints goes to stderr instead."""
    for module in preload:
        importlib.import_module(module)
    module, _, name = target.partition(":")
    fn = getattr(importlib.import_module(module), name)
    reader, writer = Connection(os.dup(0), writable=False), Connection(os.dup(1), readable=False)
    os.dup2(2, 1)
    writer.send((None, READY, None))
    while True:
        try:
            message = reader.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        index, args = message
        try:
            writer.send((index, OK, fn(*args)))
        except BaseException as e:  # a reward worker reports every failure, it never dies of one
            writer.send((index, ERROR, f"{type(e).__name__}: {str(e)[:200]}"))


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2:])
