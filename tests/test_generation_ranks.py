"""Generation split over ranks: `accelerate launch --num_processes 2` (gloo, CPU) must give what one
process gives: same completions, same metrics, same files. (How much faster 2 processes are is
measured in bench/eval_ranks.py, not asserted here; a failure on rank 1 stopping both ranks is
in tests/test_served.py.)

One recipe covers evaluate (greedy + k samples) and distill (teacher traces, the teacher's eval):
a 1-process run and a 2-process run of it are compared file for file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_distributed import BASE, launch, metrics, write

from posttrain import artifacts

EVAL = {
    "data": {"synthetic": "arithmetic", "n": 128, "seed": 7},
    "max_new_tokens": 32,
    "batch_size": 8,
    "k": 2,
}
STUDENT = {"name": "small", "dense_from": {"preset": "tiny-deepseek-v3"}, "num_hidden_layers": 1}
DISTILL = {
    "name": "distill",
    "kind": "distill",
    "teacher": {"preset": "tiny-deepseek-v3"},
    "data": {"synthetic": "arithmetic", "n": 24, "seed": 5},
    "samples_per_prompt": 2,
    "generation": {"max_new_tokens": 16, "batch_size": 4},
    "students": [STUDENT],
    "train": {"max_steps": 1, "per_device_train_batch_size": 2, "save_strategy": "no", "report_to": "none"},
}
# What may differ between world sizes: timings, and who did the work.
TIMING = {"seconds", "tokens_per_s", "processes", "prompts_per_s"}


def run_alone(recipe: Path) -> subprocess.CompletedProcess:
    """`posttrain run recipe` in one process, with the launch's environment (one thread each)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "posttrain", "run", str(recipe)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=420)


def without_timing(block: dict) -> dict:
    return {k: v for k, v in block.items() if k not in TIMING}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, Path]:
    """The same recipe on 1 and on 2 processes: {world size: run directory}."""
    root = tmp_path_factory.mktemp("ranks")
    out = {}
    for world in (1, 2):
        recipe = {"name": f"w{world}", "output_dir": str(root / f"w{world}"), **BASE, "eval": EVAL,
                  "stages": [{"name": "eval-base", "kind": "evaluate"}, DISTILL]}  # fmt: skip
        path = write(root / f"w{world}.yaml", recipe)
        done = run_alone(path) if world == 1 else launch(path, "--multi_gpu")  # DDP; gloo on a CPU
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]
        out[world] = root / f"w{world}"
    return out


def test_evaluate_is_the_same_on_one_and_two_processes(runs):
    one, two = (metrics(runs[w] / "eval-base")["eval"] for w in (1, 2))
    assert (one["processes"], two["processes"]) == (1, 2)
    assert without_timing(one) == without_timing(two)
    assert one["n"] == 128 and "pass_at_1" in one
    samples = [(runs[w] / "eval-base" / artifacts.EVAL_SAMPLES).read_text() for w in (1, 2)]
    assert samples[0] == samples[1]  # greedy and sampled completions, same rows, same order


def test_distill_traces_are_the_same_on_one_and_two_processes(runs):
    files = [(runs[w] / "distill" / artifacts.SAMPLES).read_text() for w in (1, 2)]
    assert files[0] == files[1] and len(files[0].splitlines()) == 24
    traces = [
        (runs[w] / "distill" / artifacts.TRACES).read_text().replace(str(runs[w]), "RUN") for w in (1, 2)
    ]
    assert traces[0] == traces[1]  # the teacher's path is in each run's own folder
    teacher = [without_timing(metrics(runs[w] / "distill")["teacher"]["eval"]) for w in (1, 2)]
    assert teacher[0] == teacher[1]
    stats = [metrics(runs[w] / "distill")["traces"] for w in (1, 2)]
    assert stats[0]["samples"] == stats[1]["samples"] == 48 and stats[0]["kept"] == stats[1]["kept"]


def test_the_process_group_timeout_is_configurable(monkeypatch):
    from datetime import timedelta

    from posttrain.distributed import DEFAULT_TIMEOUT_S, timeout
    from posttrain.errors import PosttrainError

    monkeypatch.delenv("POSTTRAIN_DIST_TIMEOUT_S", raising=False)
    assert timeout() == timedelta(seconds=DEFAULT_TIMEOUT_S)
    monkeypatch.setenv("POSTTRAIN_DIST_TIMEOUT_S", "7200")
    assert timeout() == timedelta(hours=2)
    monkeypatch.setenv("POSTTRAIN_DIST_TIMEOUT_S", "soon")
    with pytest.raises(PosttrainError, match="POSTTRAIN_DIST_TIMEOUT_S='soon' is not a positive number"):
        timeout()
