"""The run report: `report.md` at the top of the run directory, with PNG plots beside it.

One table holds every stage (in run order) with its training metrics, data preparation and
evaluation; `loss.png`, `reward.png` and `accuracy.png` show the curves (read back from each
stage's TensorBoard logs) and the evaluation per stage. The runner rewrites it after every
stage (main process only); `posttrain report RUN_DIR` rebuilds it from the files alone.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from posttrain import artifacts

REPORT = "report.md"
CURVES = {"loss": "train/loss", "reward": "train/reward"}
MOE_HEATMAP = "moe_expert_load.png"  # posttrain.moe.HEATMAP, not imported here: it loads transformers
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
    metrics: dict[str, Any]
    data: list[dict[str, Any]]
    curves: dict[str, list[tuple[int, float]]]
    gate: dict[str, float] | None
    source: str | None = None  # the stage whose model this one started from, if any
    part_curves: dict[str, dict[str, list[tuple[int, float]]]] = dataclasses.field(default_factory=dict)

    @property
    def eval(self) -> dict[str, Any]:
        return self.metrics.get("eval") or {}


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
    import yaml

    resolved_file = run_dir / "recipe.resolved.yaml"
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
                data=(artifacts.read_json(folder / "data_report.json") or {}).get("steps", []),
                curves=read_curves(folder / "logs"),
                part_curves={p.parent.name: read_curves(p) for p in sorted(folder.glob("*/logs"))},
                gate={k: v for k, v in gate.items() if v is not None} if gate else None,
                source=next((stage[k] for k in ("model", "teacher") if isinstance(stage.get(k), str)), None),
            )
        )
    return resolved.get("name") or run_dir.name, summaries


# --------------------------------------------------------------------------- table


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return ""
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _first_last(curve: list[tuple[int, float]]) -> tuple[float, float] | None:
    return (curve[0][1], curve[-1][1]) if curve else None


def outcome(metrics: dict[str, Any], curves: dict[str, list[tuple[int, float]]] | None = None) -> list[str]:
    """What a stage did, in a few words, from its metrics (curves fill in what they lack): the
    report's `training` cell and the console's closing line. RL says how its reward moved, not its
    loss (about 0 by construction); labelling what it kept; a reward model its held-out accuracy."""
    curves = curves or {}
    parts: list[str] = []
    train = metrics.get("train") or {}
    reward = (metrics.get("rl") or {}).get("reward")
    moved = (reward["first"], reward["last"]) if reward else _first_last(curves.get("reward", []))
    loss = (train.get("loss_first"), train.get("loss_last"))
    if None in loss:
        loss = _first_last(curves.get("loss", [])) or (None, None)
    if moved:
        parts.append(f"reward {moved[0]:.3f} → {moved[1]:.3f}")
    elif None not in loss:
        parts.append(f"loss {loss[0]:.3f} → {loss[1]:.3f}")
    if train.get("steps"):
        parts.append(f"{train['steps']} steps")
    if metrics.get("pairs_judged") is not None:
        parts.append(f"kept {metrics['kept']} of {metrics['pairs_judged']} pairs")
        agreement = metrics.get("agreement_with_answer") or {}
        if agreement.get("n"):
            parts.append(f"agrees with the answer on {agreement['accuracy']:.3f} (n={agreement['n']})")
    held_out = metrics.get("held_out") or {}
    if held_out.get("accuracy") is not None:
        parts.append(f"held-out pairwise accuracy {held_out['accuracy']:.3f} (n={held_out['n']})")
    models = {"teacher": metrics.get("teacher") or {}, **(metrics.get("students") or {})}
    if "students" in metrics and all("accuracy" in m for m in models.values()):
        sizes = [f"{name} {m['accuracy']:.3f} ({m['parameters'] / 1e6:.2f}M)" for name, m in models.items()]
        parts.append("accuracy " + ", ".join(sizes))
    return parts


def train_cell(stage: StageSummary) -> str:
    return ", ".join(outcome(stage.metrics, stage.curves))


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
    beat its starting point, does the reward model rank right above wrong, did a student keep up."""
    by_name = {s.name: s for s in stages}
    lines = []
    for s in stages:
        start = by_name.get(s.source or "")
        before, after = (start.eval.get("accuracy") if start else None), s.eval.get("accuracy")
        if s.kind == "grpo" and before is not None and after is not None:
            sampled = (start.eval.get("pass_at_1"), s.eval.get("pass_at_1"))
            pass_at_1 = (
                f"; pass@1 {sampled[0]:.3f} → {sampled[1]:.3f} ({(sampled[1] - sampled[0]) * 100:+.1f})"
                if None not in sampled
                else ""
            )
            lines.append(f"- **{s.name}** lifted held-out accuracy {before:.3f} → {after:.3f} "
                         f"({(after - before) * 100:+.1f} points over {start.name}{pass_at_1})")  # fmt: skip
        held_out = s.metrics.get("held_out") or {}
        if "accuracy" in held_out:
            rvw = held_out.get("right_vs_wrong") or {}
            extra = f", {rvw['accuracy']:.3f} on right-vs-wrong pairs (n={rvw['n']})" if rvw.get("n") else ""
            lines.append(f"- **{s.name}** ranks the chosen answer first on {held_out['accuracy']:.3f} of "
                         f"{held_out['n']} held-out pairs{extra} (chance: 0.5)")  # fmt: skip
        agreement = s.metrics.get("agreement_with_answer") or {}
        if agreement.get("n"):
            lines.append(f"- **{s.name}**: the judge kept {s.metrics.get('kept')} of {s.metrics.get('pairs_judged')} "
                         f"pairs and agrees with the reference answer on {agreement['accuracy']:.3f} of "
                         f"{agreement['n']} pairs with one right answer")  # fmt: skip
        teacher = s.metrics.get("teacher") or {}
        for name, m in (s.metrics.get("students") or {}).items():
            if m.get("accuracy_vs_teacher") is not None and m.get("parameters_vs_teacher") is not None:
                lines.append(f"- **{s.name}/{name}** keeps {m['accuracy_vs_teacher']:.0%} of the teacher's accuracy "
                             f"({m['accuracy']:.3f} vs {teacher.get('accuracy', 0):.3f}) with "
                             f"{m['parameters_vs_teacher']:.0%} of its parameters")  # fmt: skip
    return lines


def distill_section(stages: list[StageSummary]) -> list[str]:
    """Per distill stage: the teacher and its students side by side (size, accuracy, speed)."""
    lines: list[str] = []
    for s in stages:
        students = s.metrics.get("students")
        if not students:
            continue
        pass_rate = (s.metrics.get("traces") or {}).get("pass_rate")
        title = f"**{s.name}**" + (f": trace pass rate {pass_rate:.3f}" if pass_rate is not None else "")
        head = ["model", "parameters", "active", "accuracy", "vs teacher", "tokens/s", "vs teacher"]
        lines += [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, m in {"teacher": s.metrics.get("teacher") or {}, **students}.items():
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
        m = s.metrics
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
        if (run_dir / s.name / MOE_HEATMAP).exists():
            lines.append(f"\n  ![{s.name} expert load]({s.name}/{MOE_HEATMAP})")
    return ["", "## Mixture of experts", "", *lines] if lines else []


# --------------------------------------------------------------------------- plots


def _save(figure: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.stem}.{os.getpid()}.png")
    figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    os.replace(tmp, path)


# Each stage kind's training loss is its own quantity (token cross-entropy, a pairwise ranking
# loss): one panel each, never one axis. GRPO's loss is about 0 by construction: its reward is plotted.
LOSS_PANELS = {"sft": "SFT: token cross-entropy", "reward_model": "reward model: pairwise loss",
               "distill": "distillation students: token cross-entropy"}  # fmt: skip
NOT_A_LOSS = {"grpo"}


def curve_panels(stages: list[StageSummary], name: str) -> dict[str, list[tuple[str, list]]]:
    """{panel title: [(line label, curve)]}: one panel per metric family of curve `name`."""
    panels: dict[str, list[tuple[str, list]]] = {}
    for s in stages:
        if name == "loss" and s.kind in NOT_A_LOSS:
            continue
        title = LOSS_PANELS.get(s.kind, f"{s.kind}: loss") if name == "loss" else "RL: mean reward per step"
        lines = [(s.name, s.curves.get(name))] + [
            (f"{s.name}/{p}", c.get(name)) for p, c in s.part_curves.items()
        ]
        panels.setdefault(title, []).extend((label, curve) for label, curve in lines if curve)
    return {title: lines for title, lines in panels.items() if lines}


def plot_curves(stages: list[StageSummary], name: str, path: Path) -> bool:
    """One panel per metric family (see LOSS_PANELS), one line per stage, integer steps, and each
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
    path = run_dir / REPORT
    artifacts.write_atomic(path, "\n".join(lines).rstrip() + "\n")
    return path
