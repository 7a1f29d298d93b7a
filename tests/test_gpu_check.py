"""bench/gpu_check.py --smoke: every measurement of the GPU check runs, at tiny shapes on the CPU, so the
script is known to work on the day a GPU is lent. Slow (about a minute on 2 cores): seven
tiny SFT runs and four tiny GRPO runs, through trl and through posttrain."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_measurement(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--json", str(out), "--workdir", str(tmp_path / "work")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["mode"] == "smoke"
    errors = {k: v["error"] for k, v in figures.items() if isinstance(v, dict) and "error" in v}
    assert not errors, errors
    for model, modes in (("dense", ("padding", "packing")), ("moe", ("padding",))):
        sft = figures["sft"][model]
        assert set(sft) == {f"{who} {mode}" for who in ("trl", "posttrain") for mode in modes}
        assert all(run["tokens_per_s"] > 0 for run in sft.values())
        assert all(sft[f"posttrain {mode}"]["vs_trl"] > 0 for mode in modes)
        grpo = figures["grpo"][model]
        assert grpo["trl"]["step_s"] > 0 and grpo["posttrain"]["step_s"] > 0
    assert figures["grpo"]["vllm"]["skipped"] and figures["qlora"]["skipped"]
    planner = {k: v for k, v in figures["memory_planner"].items() if isinstance(v, dict)}
    assert set(planner) == {"sft", "lora", "grpo"}
    assert all(row["estimate_gib"] > 0 and "skipped" in row["measured"] for row in planner.values())
    fp8 = figures["fp8"]
    assert fp8["rel_diff_vs_dequantized"] < 1e-2  # the loader reads weight_scale_inv per 128x128 block
    assert 0 < fp8["rel_diff_vs_original"] < 0.2  # FP8 rounding, no more
