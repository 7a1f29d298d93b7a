"""Each stage kind's metrics have a declared shape (its module's `Metrics`), and the report and the
CLI read exactly what is declared: a report built from the declarations shows every line, and
what real stages write conforms to them (checked where the tests run each kind: `declared` in
tests/conftest.py). Renaming a key on either side breaks one of the two."""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from posttrain import artifacts
from posttrain.cli import _summary
from posttrain.metrics import TrainMetrics, shape_problems
from posttrain.recipe import STAGE_REGISTRY
from posttrain.report import write_report
from posttrain.stages import stage_module

# One stage of each kind, as a resolved recipe lists them; grpo starts from sft.
STAGES = [
    {"name": "sft", "kind": "sft"},
    {"name": "label", "kind": "rlaif_label", "policy": "sft"},
    {"name": "rm", "kind": "reward_model", "model": "sft"},
    {"name": "grpo", "kind": "grpo", "model": "sft"},
    {"name": "distill", "kind": "distill", "teacher": "grpo"},
    {"name": "base", "kind": "evaluate"},
]


def example(shape: Any) -> Any:
    """A value with every field the shape declares (optional ones too), nested shapes filled in."""
    if isinstance(shape, type) and hasattr(shape, "__required_keys__"):
        return {key: example(hint) for key, hint in typing.get_type_hints(shape).items()}
    args = [a for a in typing.get_args(shape) if a is not type(None)]
    if typing.get_origin(shape) is dict:
        return {"small": example(args[1])}
    if args:  # X | None
        return example(args[0])
    return {float: 0.5, int: 3, str: "x", bool: True}.get(shape, {})


@pytest.fixture
def declared_run(tmp_path: Path) -> Path:
    """A run directory whose every stage wrote its kind's declared metrics in full."""
    artifacts.write_atomic(
        tmp_path / artifacts.RESOLVED_RECIPE, yaml.safe_dump({"name": "r", "stages": STAGES})
    )
    for stage in STAGES:
        folder = tmp_path / stage["name"]
        metrics = example(stage_module(stage["kind"]).Metrics)
        if stage["kind"] == "sft":
            metrics["moe/layer_1/expert_share"] = [0.5, 0.5]  # one per-layer key, as moe writes them
        artifacts.write_json(folder / artifacts.METRICS, metrics)
        artifacts.write_json(folder / artifacts.MANIFEST, {"completion_id": "c", "kind": stage["kind"]})
        artifacts.write_json(folder / artifacts.COMPLETE, {"completion_id": "c"})
    return tmp_path


def test_the_report_shows_every_line_the_declared_metrics_feed(declared_run: Path) -> None:
    report = write_report(declared_run).read_text()
    for stage in STAGES:
        row = next(line for line in report.splitlines() if line.startswith(f"| {stage['name']} |"))
        fields = typing.get_type_hints(stage_module(stage["kind"]).Metrics)
        assert "| complete | 0.5 |" in row, row  # wall time
        if "eval" in fields:
            assert "| 0.500 | 0.500 | 0.500 | 0.500 | 0.500 | 0.5 | 3 |" in row, row  # evaluation columns
        outcome = stage_module(stage["kind"]).outcome
        if outcome is not None:  # the training cell is what the kind says it did
            cell = ", ".join(outcome(example(stage_module(stage["kind"]).Metrics), {}))
            assert cell and f"| {cell} |" in row, row
        if "rows" in fields:
            assert "| 3 rows |" in row, row
        if stage_module(stage["kind"]).headline is not None:
            assert f"- **{stage['name']}" in report, stage["kind"]
    for name, cell in (("sft", "loss 0.500 → 0.500, 3 steps"), ("grpo", "3 steps"), ("label", "kept 3 of 3 pairs"),
                       ("rm", "held-out pairwise accuracy 0.500 (n=3)"), ("distill", "accuracy teacher 0.500")):  # fmt: skip
        assert cell in next(line for line in report.splitlines() if line.startswith(f"| {name} |"))
    assert "- **grpo** lifted held-out accuracy 0.500 → 0.500 (+0.0 points over sft; pass@1" in report
    assert "| small | 0.00 M | 0.00 M | 0.500 | 0.50 | 0.5 | 0.50 |" in report  # the distillation table
    assert "**distill**: trace pass rate 0.500" in report
    assert "- **sft**: load CV 0.500 (0.500 → 0.500), max load 0.500, router entropy 0.500" in report


def test_the_cli_summary_reads_the_declared_fields() -> None:
    sft = example(stage_module("sft").Metrics)
    assert (
        _summary("sft", sft) == "loss 0.500 → 0.500, 3 steps, eval accuracy 0.500 (n=3), pass@1 0.500 (k=3)"
    )
    distill = example(stage_module("distill").Metrics)
    assert _summary("distill", distill) == "accuracy teacher 0.500 (0.00M), small 0.500 (0.00M)"


@pytest.mark.parametrize("kind", sorted(STAGE_REGISTRY))
def test_every_kind_declares_its_metrics(kind: str) -> None:
    shape = stage_module(kind).Metrics
    assert hasattr(shape, "__required_keys__") and shape.__required_keys__, kind
    assert shape_problems(example(shape), shape) == []


def test_shape_problems_name_missing_and_undeclared_keys() -> None:
    train = example(TrainMetrics)
    assert shape_problems(train, TrainMetrics) == []
    renamed = {**{k: v for k, v in train.items() if k != "loss_first"}, "first_loss": 1.0}
    assert shape_problems(renamed, TrainMetrics) == [
        "metrics: missing 'loss_first'",
        "metrics: 'first_loss' is not declared in TrainMetrics",
    ]
    sft = stage_module("sft").Metrics
    nested = {**example(sft), "train": renamed, "moe/layer_0/load_cv": 0.1}  # per-layer MoE keys are fine
    assert shape_problems(nested, sft) == [
        "metrics.train: missing 'loss_first'",
        "metrics.train: 'first_loss' is not declared in TrainMetrics",
    ]
    assert shape_problems(json.loads('{"train": 1}'), sft)[0] == "metrics: missing 'parameters'"
