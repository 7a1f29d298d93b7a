"""The run report: `report.md` at the top of the run directory, with PNG plots beside it.

One table holds every stage (in run order) with its training metrics, data preparation and
evaluation, read through the shapes posttrain.metrics and each kind's `Metrics` declare; `loss.png`, `reward.png` and `accuracy.png` show the curves (read back from each
stage's TensorBoard logs) and the evaluation per stage. The runner rewrites it after every
stage (main process only); `posttrain report RUN_DIR` rebuilds it from the files alone.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import yaml

from posttrain import artifacts
from posttrain.metrics import EvalMetrics, MoESummary, TrainMetrics
from posttrain.recipe import STAGE_KINDS
from posttrain.stages import stage_module
from posttrain.stages.distill import Metrics as DistillMetrics

CURVES = {"loss": "train/loss", "reward": "train/reward"}
EVAL_COLUMNS = (
    ("accuracy", "accuracy"),
    ("pass@1", "pass_at_1"),
    ("pass@k", "pass_at_k"),
    ("maj@k", "maj_at_k"),
    ("format", "format_rate"),
)


@dataclasses.dataclass
class StageSummary:
    """What the report shows of one stage, read from its folder."""

    name: str
    kind: str
    status: str  # complete | running | pending
    metrics: dict[str, Any]  # the kind's `Metrics` (posttrain/stages/<kind>.py), as metrics.json holds it
    data: list[dict[str, Any]]
    curves: dict[str, list[tuple[int, float]]]
    gate: dict[str, float] | None
    source: str | None = None  # the stage whose model this one started from, if any

    @property
    def eval(self) -> EvalMetrics:
        return self.metrics.get("eval") or {}

    @property
    def train(self) -> TrainMetrics:
        return self.metrics.get("train") or {}


def read_curves(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{loss | reward: [(step, value), ...]} from a stage's TensorBoard event files."""
    if not log_dir.is_dir() or not any(log_dir.glob("events.*")):
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags().get("scalars", []))
    return {
        name: [(e.step, e.value) for e in events.Scalars(tag)] for name, tag in CURVES.items() if tag in tags
    }


def collect(run_dir: Path) -> tuple[str, list[StageSummary]]:
    """The run's name and a summary of each stage, in the order of the resolved recipe."""
    resolved_file = run_dir / artifacts.RESOLVED_RECIPE
    resolved = yaml.safe_load(resolved_file.read_text()) if resolved_file.exists() else {}
    stages = resolved.get("stages") or [
        {"name": d.name, "kind": (artifacts.read_json(d / artifacts.MANIFEST) or {}).get("kind", "?")}
        for d in sorted(run_dir.iterdir())
        if (d / artifacts.MANIFEST).exists() or (d / artifacts.RUNNING).exists()
    ]
    summaries = []
    for stage in stages:
        folder = run_dir / stage["name"]
        done = artifacts.completed_manifest(folder) is not None
        status = "complete" if done else "running" if (folder / artifacts.RUNNING).exists() else "pending"
        gate = stage.get("gate") or None
        summaries.append(
            StageSummary(
                name=stage["name"],
                kind=stage.get("kind", "?"),
                status=status,
                metrics=(artifacts.read_json(folder / artifacts.METRICS) or {}) if done else {},
                data=(artifacts.read_json(folder / artifacts.DATA_REPORT) or {}).get("steps", []),
                curves=read_curves(folder / artifacts.LOGS),
                gate={k: v for k, v in gate.items() if v is not None} if gate else None,
                source=_source(stage),
            )
        )
    return resolved.get("name") or run_dir.name, summaries


def _source(stage: dict[str, Any]) -> str | None:
    """The stage whose model a (resolved) stage starts from, when it names one."""
    schema = STAGE_KINDS.get(stage.get("kind"))
    start = stage.get(schema.start_field) if schema is not None and schema.start_field else None
    return start if isinstance(start, str) else None


# --------------------------------------------------------------------------- table


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return ""
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _first_last(curve: list[tuple[int, float]]) -> tuple[float, float] | None:
    return (curve[0][1], curve[-1][1]) if curve else None


def train_cell(stage: StageSummary) -> str:
    train = stage.train
    parts = []
    loss = (train.get("loss_first"), train.get("loss_last"))
    if None in loss:
        loss = _first_last(stage.curves.get("loss", [])) or (None, None)
    if None not in loss:
        parts.append(f"loss {loss[0]:.3f} → {loss[1]:.3f}")
    reward = _first_last(stage.curves.get("reward", []))
    if reward:
        parts.append(f"reward {reward[0]:.3f} → {reward[1]:.3f}")
    if train.get("steps"):
        parts.append(f"{train['steps']} steps")
    return ", ".join(parts)


def data_cell(stage: StageSummary) -> str:
    parts = [f"{stage.metrics['rows']} rows"] if "rows" in stage.metrics else []
    for step, short in (("dedup", "dup"), ("decontaminate", "contaminated")):
        removed = sum(s["removed"] for s in stage.data if s["step"] == step)
        if any(s["step"] == step for s in stage.data):
            parts.append(f"−{removed} {short}")
    return ", ".join(parts)


def gate_cell(stage: StageSummary) -> str:
    if not stage.gate:
        return ""
    cells = []
    for key, minimum in stage.gate.items():
        metric = key.removeprefix("min_")
        value = stage.eval.get(metric)
        mark = "" if value is None else (" ✓" if value >= minimum else " ✗")
        cells.append(f"{metric} ≥ {minimum:g}{mark}")
    return ", ".join(cells)


def table(stages: list[StageSummary]) -> str:
    head = ["stage", "kind", "status", "time (s)", "training", "data"]
    head += [label for label, _ in EVAL_COLUMNS] + ["length", "n", "gate"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in stages:
        row = [s.name, s.kind, s.status, _num(s.metrics.get("wall_time_s"), 1), train_cell(s), data_cell(s)]
        row += [_num(s.eval.get(key)) for _, key in EVAL_COLUMNS]
        row += [_num(s.eval.get("mean_length"), 1), _num(s.eval.get("n")), gate_cell(s)]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    return "\n".join(lines)


def details(stages: list[StageSummary]) -> list[str]:
    """Benchmark results and what data preparation removed, per stage, when there are any."""
    lines: list[str] = []
    for s in stages:
        harness = s.eval.get("harness") or {}
        for task, values in harness.items():
            shown = ", ".join(f"{m} {v:.3f}" for m, v in values.items())
            lines.append(f"- **{s.name}** lm-eval `{task}`: {shown}")
        for step in s.data:
            if step["removed"]:
                example = (step.get("examples") or [{}])[0].get("removed", "")
                lines.append(
                    f"- **{s.name}** {step['step']} removed {step['removed']} of {step['rows_in']} rows "
                    f"from `{step['source']}`" + (f", e.g. “{example}”" if example else "")
                )
    return lines


def headlines(stages: list[StageSummary]) -> list[str]:
    """One sentence per stage that says whether it did its job, the way a reader asks it: did RL
    beat its starting point, does the reward model rank right above wrong, did a student keep up.
    Each kind's module writes its own (`headline`; None: the table row says it all)."""
    by_name = {s.name: s for s in stages}
    lines = []
    for s in stages:
        headline = stage_module(s.kind).headline if s.kind in STAGE_KINDS else None
        if headline is not None:
            start = by_name.get(s.source or "")
            lines += headline(s.name, s.metrics, (start.name, start.metrics) if start else None)
    return lines


def distill_section(stages: list[StageSummary]) -> list[str]:
    """Per distill stage: the teacher and its students side by side (size, accuracy, speed)."""
    lines: list[str] = []
    for s in stages:
        metrics: DistillMetrics = s.metrics  # type: ignore[assignment]  (any kind with students)
        students = metrics.get("students")
        if not students:
            continue
        pass_rate = (metrics.get("traces") or {}).get("pass_rate")
        title = f"**{s.name}**" + (f": trace pass rate {pass_rate:.3f}" if pass_rate is not None else "")
        head = ["model", "parameters", "active", "accuracy", "vs teacher", "tokens/s", "vs teacher"]
        lines += [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, m in {"teacher": metrics.get("teacher") or {}, **students}.items():
            sizes = [f"{m[k] / 1e6:.2f} M" if m.get(k) else "" for k in ("parameters", "active_parameters")]
            row = [name, *sizes, _num(m.get("accuracy")), _num(m.get("accuracy_vs_teacher"), 2)]
            row += [_num(m.get("tokens_per_s"), 1), _num(m.get("speedup_vs_teacher"), 2)]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return ["", "## Distillation", "", *lines] if lines else []


def moe_section(run_dir: Path, stages: list[StageSummary]) -> list[str]:
    """Router balance of every stage that trained an MoE model, with its expert-load heatmap."""
    lines: list[str] = []
    for s in stages:
        m: MoESummary = s.metrics  # type: ignore[assignment]  (the MoE keys of any trainer's metrics)
        if "moe/load_cv" not in m:
            continue
        trend = (
            f" ({_num(m['moe/load_cv_first'])} → {_num(m['moe/load_cv_last'])})"
            if "moe/load_cv_last" in m
            else ""
        )
        lines.append(
            f"- **{s.name}**: load CV {_num(m['moe/load_cv'])}{trend}, max load {_num(m.get('moe/max_load'))}, "
            f"router entropy {_num(m.get('moe/router_entropy'))}, dead experts {m.get('moe/dead_experts', 0)}"
        )
        if (run_dir / s.name / artifacts.MOE_HEATMAP).exists():
            lines.append(f"\n  ![{s.name} expert load]({s.name}/{artifacts.MOE_HEATMAP})")
    return ["", "## Mixture of experts", "", *lines] if lines else []


# --------------------------------------------------------------------------- plots


def _save(figure: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.stem}.{os.getpid()}.png")
    figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    os.replace(tmp, path)


def plot_curves(stages: list[StageSummary], name: str, path: Path) -> bool:
    """One line per stage that logged this curve (loss or reward against its own steps)."""
    import matplotlib.pyplot as plt

    drawn = [(s.name, s.curves[name]) for s in stages if s.curves.get(name)]
    if not drawn:
        path.unlink(missing_ok=True)
        return False
    figure, axes = plt.subplots(figsize=(6, 3.5))
    for label, curve in drawn:
        axes.plot([step for step, _ in curve], [value for _, value in curve], label=label)
    axes.set(xlabel="step", ylabel=name, title=f"training {name} per stage")
    axes.legend()
    _save(figure, path)
    return True


def plot_accuracy(stages: list[StageSummary], path: Path) -> bool:
    """Bars per evaluated stage: greedy accuracy, and pass@1 / maj@k when sampled."""
    import matplotlib.pyplot as plt

    evaluated = [s for s in stages if "accuracy" in s.eval]
    if not evaluated:
        path.unlink(missing_ok=True)
        return False
    keys = [(label, key) for label, key in EVAL_COLUMNS[:4] if any(key in s.eval for s in evaluated)]
    width = 0.8 / len(keys)
    figure, axes = plt.subplots(figsize=(max(4, 1.2 * len(evaluated) + 2), 3.5))
    for j, (label, key) in enumerate(keys):
        xs = [i + j * width for i in range(len(evaluated))]
        axes.bar(xs, [s.eval.get(key, 0.0) for s in evaluated], width, label=label)
    axes.set_xticks([i + width * (len(keys) - 1) / 2 for i in range(len(evaluated))])
    axes.set_xticklabels([s.name for s in evaluated])
    axes.set(ylim=(0, 1), ylabel="held-out", title="evaluation per stage")
    axes.legend()
    _save(figure, path)
    return True


# --------------------------------------------------------------------------- report


def write_report(run_dir: Path) -> Path:
    """(Re)write `report.md` and its plots from the run directory; returns the report's path."""
    import matplotlib

    matplotlib.use("Agg")
    run_dir = Path(run_dir)
    name, stages = collect(run_dir)
    lines = [f"# {name}", "", *headlines(stages), "", table(stages), ""]
    plots = [plot_curves(stages, curve, run_dir / f"{curve}.png") and curve for curve in CURVES]
    plots.append(plot_accuracy(stages, run_dir / "accuracy.png") and "accuracy")
    lines += [f"![{p}]({p}.png)" for p in plots if p]
    lines += distill_section(stages)
    more = details(stages)
    if more:
        lines += ["", "## Details", "", *more]
    lines += moe_section(run_dir, stages)
    path = run_dir / artifacts.REPORT
    artifacts.write_atomic(path, "\n".join(lines).rstrip() + "\n")
    return path
