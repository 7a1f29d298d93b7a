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
from posttrain.metrics import Curves, EvalMetrics, MoESummary, TrainMetrics
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
    curves: Curves
    gate: dict[str, float] | None
    source: str | None = None  # the stage whose model this one started from, if any
    part_curves: dict[str, Curves] = dataclasses.field(default_factory=dict)

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
                part_curves={
                    p.parent.name: read_curves(p) for p in sorted(folder.glob(f"*/{artifacts.LOGS}"))
                },
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


def outcome(kind: str, metrics: dict[str, Any], curves: Curves | None = None) -> list[str]:
    """What a stage did, in a few words: the report's `training` cell and the console's closing
    line. Each kind's module says it (`outcome`; curves fill in what its metrics lack)."""
    describe = stage_module(kind).outcome if kind in STAGE_KINDS and metrics else None
    return describe(metrics, curves or {}) if describe is not None else []


def train_cell(stage: StageSummary) -> str:
    return ", ".join(outcome(stage.kind, stage.metrics, stage.curves))


def data_cell(stage: StageSummary) -> str:
    m = stage.metrics
    parts = [f"{m['rows']} rows"] if "rows" in m else [f"{m['prompts']} prompts"] if "prompts" in m else []
    if isinstance(m.get("pairs"), dict):  # a reward model's preference pairs
        parts.append(f"{m['pairs']['train']} pairs + {m['pairs']['held_out']} held out")
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


def curve_panels(stages: list[StageSummary], name: str) -> dict[str, list[tuple[str, list]]]:
    """{panel title: [(line label, curve)]}: one panel per metric family of curve `name`. Each
    kind's training loss is its own quantity (token cross-entropy, a pairwise ranking loss), so
    each kind's module names its panel (`loss_panel`; None: no loss worth plotting, as GRPO's,
    about 0 by construction, whose reward is plotted)."""
    panels: dict[str, list[tuple[str, list]]] = {}
    for s in stages:
        title = "RL: mean reward per step"
        if name == "loss":
            title = stage_module(s.kind).loss_panel if s.kind in STAGE_KINDS else None
            if title is None:
                continue
        lines = [(s.name, s.curves.get(name))] + [
            (f"{s.name}/{p}", c.get(name)) for p, c in s.part_curves.items()
        ]
        panels.setdefault(title, []).extend((label, curve) for label, curve in lines if curve)
    return {title: lines for title, lines in panels.items() if lines}


def plot_curves(stages: list[StageSummary], name: str, path: Path) -> bool:
    """One panel per metric family (see curve_panels), one line per stage, integer steps, and each
    line's last value written at its end."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = curve_panels(stages, name)
    if not panels:
        path.unlink(missing_ok=True)
        return False
    figure, axes_row = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.4), squeeze=False)
    for axes, (title, lines) in zip(axes_row[0], panels.items(), strict=True):
        for label, curve in lines:
            steps, values = [step for step, _ in curve], [value for _, value in curve]
            (line,) = axes.plot(steps, values, marker="." if len(curve) < 30 else None, label=label)
            axes.annotate(f"{values[-1]:.3f}", (steps[-1], values[-1]), xytext=(4, 0), textcoords="offset points",
                          va="center", fontsize=8, color=line.get_color())  # fmt: skip
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set(xlabel="step", ylabel=name, title=title)
        axes.margins(x=0.18)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    _save(figure, path)
    return True


def accuracy_bars(stages: list[StageSummary]) -> list[tuple[str, dict[str, Any]]]:
    """(label, eval results) of every evaluated model: each stage's, and each distilled student's."""
    bars = [(s.name, s.eval) for s in stages if "accuracy" in s.eval]
    for s in stages:
        for name, student in (s.metrics.get("students") or {}).items():
            if "accuracy" in student:
                bars.append((f"{s.name}/{name}", student.get("eval") or {"accuracy": student["accuracy"]}))
    return bars


def plot_accuracy(stages: list[StageSummary], path: Path) -> bool:
    """Bars per evaluated model (stages and students): greedy accuracy, and pass@1 / pass@k / maj@k
    when sampled; every bar carries its value, so a 0 reads as 0, and a metric a model lacks has no bar."""
    import matplotlib.pyplot as plt

    bars = accuracy_bars(stages)
    if not bars:
        path.unlink(missing_ok=True)
        return False
    keys = [(label, key) for label, key in EVAL_COLUMNS[:4] if any(key in e for _, e in bars)]
    width = 0.8 / len(keys)
    figure, axes = plt.subplots(figsize=(max(4.5, 1.3 * len(bars) + 2), 3.6))
    for j, (label, key) in enumerate(keys):
        shown = [(i, e[key]) for i, (_, e) in enumerate(bars) if isinstance(e.get(key), int | float)]
        xs = [i + (j - (len(keys) - 1) / 2) * width for i, _ in shown]
        container = axes.bar(xs, [v for _, v in shown], width, label=label)
        axes.bar_label(container, fmt="%.2f", fontsize=7, padding=1)
    axes.set_xticks(range(len(bars)), [name for name, _ in bars], rotation=20 if len(bars) > 5 else 0)
    axes.set(
        ylim=(0, 1.22), yticks=[0, 0.2, 0.4, 0.6, 0.8, 1.0], ylabel="held-out", title="evaluation per model"
    )
    axes.legend(fontsize=8, ncols=len(keys))
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
