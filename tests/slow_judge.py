"""A stand-in for math_judge.equivalent that sleeps or dies on demand: drives the timeout tests.

Imported by the verification workers (they inherit the test process's sys.path)."""

from __future__ import annotations

import os
import time


def equivalent(gold: str, pred: str) -> bool:
    if pred == "hang":
        time.sleep(60)
    if pred == "die":
        os._exit(1)
    if pred == "raise":
        raise RuntimeError("judge failed")
    return gold == pred
