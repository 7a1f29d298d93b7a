"""Shared fixtures: tiny models, recipe files, and the CLI called through main().

Every test runs offline on CPU. Tiny runs use the `tiny-deepseek-v3` / `tiny-dense` presets.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
from hypothesis import settings

settings.register_profile("default", max_examples=150)
settings.register_profile("deep", max_examples=3000)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# One torch thread per test process: the suite runs on 2 xdist workers, and a count that followed
# the free cores (posttrain.cpu) would change float rounding from one run to the next.
os.environ.setdefault("POSTTRAIN_CPU_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny DeepSeek-V3 MoE (random weights, seed 0) with the shipped tokenizer."""
    from posttrain.models import materialize_preset

    return materialize_preset("tiny-deepseek-v3", 0, tmp_path_factory.mktemp("models") / "tiny-moe")


@pytest.fixture(scope="session")
def tiny_dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny dense Qwen2-style model (random weights, seed 0) with the shipped tokenizer."""
    from posttrain.models import materialize_preset

    return materialize_preset("tiny-dense", 0, tmp_path_factory.mktemp("models") / "tiny-dense")


@pytest.fixture
def write_recipe(tmp_path: Path):
    """write_recipe(yaml_text) -> path of a recipe whose output_dir is inside tmp_path."""

    def write(text: str, name: str = "recipe.yaml") -> Path:
        text = textwrap.dedent(text)
        if "output_dir" not in text:
            text = text.rstrip("\n") + f"\noutput_dir: {tmp_path / 'runs'}\n"  # last, so line numbers hold
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


@pytest.fixture
def cli(capsys: pytest.CaptureFixture):
    """cli(*args) -> (exit_code, stdout, stderr), calling posttrain's main() in-process."""
    from posttrain.cli import main

    def call(*args: str) -> tuple[int, str, str]:
        code = 0
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out = capsys.readouterr()
        return code, out.out, out.err

    return call


@pytest.fixture
def declared():
    """declared(run_dir) -> the ways its finished stages' metrics.json stray from their kind's
    declared `Metrics` ([] when every stage wrote exactly its declared shape)."""
    import yaml

    from posttrain import artifacts
    from posttrain.metrics import shape_problems
    from posttrain.stages import stage_module

    def check(run_dir: Path) -> list[str]:
        resolved = yaml.safe_load((run_dir / artifacts.RESOLVED_RECIPE).read_text())
        problems = []
        for stage in resolved["stages"]:
            metrics = artifacts.read_json(run_dir / stage["name"] / artifacts.METRICS)
            if metrics is not None:
                problems += shape_problems(metrics, stage_module(stage["kind"]).Metrics, stage["name"])
        return problems

    return check


@pytest.fixture
def kill_when():
    """kill_when(recipe, path): start `posttrain run recipe` in a subprocess (one CPU thread), SIGKILL
    it once `path` exists (asserting it was still running), and return; the caller resumes it."""
    import signal
    import subprocess
    import sys
    import time

    def kill(recipe: Path, path: Path, timeout: float = 180) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "posttrain", "run", str(recipe)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)  # fmt: skip
        try:
            deadline = time.time() + timeout
            while time.time() < deadline and not path.exists() and proc.poll() is None:
                time.sleep(0.02)
            assert proc.poll() is None, "the run finished (or failed) before it could be killed"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()

    return kill
