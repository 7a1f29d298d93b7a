"""The `posttrain` command: run, validate and plan recipes.

Everything beyond typer and rich is imported inside the commands (the recipe schema loads
pydantic, the stages torch and trl), so `--help` is instant. A problem with the user's input
prints one line and exits 2; add `--debug` anywhere on the line for the traceback (`main`
reads it, so no command needs to).

    posttrain run recipes/demo.yaml
    posttrain run recipes/demo.yaml --set stages.sft.train.learning_rate=1e-3 --force sft
    accelerate launch --config_file recipes/accelerate/zero3.yaml -m posttrain run r.yaml
    posttrain report runs/demo                       # rebuild report.md and its plots
    posttrain verify recipes/demo.yaml               # is the run directory complete and intact?
    posttrain data inspect data.jsonl --columns prompt=question --model PATH
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import warnings
from importlib.resources import files
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from posttrain.artifacts import write_atomic
from posttrain.console import console
from posttrain.distributed import PeerFailed, leave
from posttrain.errors import PosttrainError, did_you_mean
from posttrain.lock import live_holder

app = typer.Typer(
    name="posttrain",
    help="DeepSeek-style post-training from one recipe: SFT, RLAIF reward models, GRPO, distillation. "
    "Add --debug to any command to see tracebacks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

Recipe = Annotated[
    Path,
    typer.Argument(
        metavar="RECIPE",
        help="The recipe YAML file, or the name of a shipped one (demo).",
        show_default=False,
    ),
]
Set = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="Override a recipe key: --set stages.sft.train.learning_rate=1e-4 (repeatable)."
    ),
]
RunDir = Annotated[
    Path, typer.Argument(metavar="RUN_DIR", help="A run directory (runs/<name>).", show_default=False)
]
StageOption = Annotated[
    str | None,
    typer.Option("--stage", help="The stage whose model: sft, grpo, distill/base (default: the last one)."),
]


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"posttrain {version('posttrain')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """DeepSeek-style post-training from one recipe: SFT, RLAIF reward models, GRPO, distillation."""


def _load(recipe: Path, overrides: list[str] | None):  # -> Recipe
    from posttrain.loading import load

    return load(shipped_recipe(recipe), overrides or [])


def shipped_recipe(path: Path) -> Path:
    """`posttrain run demo` finds the recipe that ships in the package when no such file is here."""
    if path.exists() or path.parent != Path("."):
        return path

    shipped = Path(str(files("posttrain.recipes"))) / (path.name if path.suffix else f"{path.name}.yaml")
    return shipped if shipped.exists() else path


def _quiet_libraries() -> None:
    """posttrain's own lines and bars only: no per-map, weight-loading or shard-writing bars from
    datasets and transformers, no info chatter, no DeepSpeed accelerator notice on a CPU machine."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    warnings.filterwarnings("ignore", category=FutureWarning)  # libraries' deprecation notices
    import datasets
    import transformers

    from posttrain.training import has_accelerator

    if not has_accelerator():  # what DeepSpeed falls back to anyway, after a warning that says so
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_warning()
    transformers.logging.disable_progress_bar()


def _no_kernel_hub_notice(record: logging.LogRecord) -> bool:
    """False for the notice bitsandbytes logs on import (peft imports it) when the `kernels` package
    that fetches its Hub CPU kernel is absent: its own 4-bit CPU path runs anyway."""
    return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


@app.command()
def run(
    recipe: Recipe,
    set_: Set = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Validate and show the plan; train nothing.")
    ] = False,
    force: Annotated[
        list[str] | None, typer.Option("--force", help="Re-run this stage even if cached.")
    ] = None,
    only: Annotated[
        str | None, typer.Option("--only", help="Run this stage alone (its inputs must be done).")
    ] = None,
    verify_hashes: Annotated[
        bool,
        typer.Option("--verify-hashes", help="Hash every file of a finished stage before reusing it."),
    ] = False,
) -> None:
    """Run a recipe: every stage in order, skipping finished ones and resuming interrupted ones."""
    console.print(f"[dim]posttrain run {escape(str(recipe))}: checking the recipe…[/]", soft_wrap=True)
    with console.status("[dim]loading trl and transformers, checking every stage…[/]"):  # ~10 s
        _quiet_libraries()
        loaded = _load(recipe, set_)
    if dry_run:
        _print_plan(loaded, tuple(force or ()))
        _print_preflight(loaded, with_memory=True)
        return
    from posttrain.preflight import require_vllm, require_working_rewards
    from posttrain.runner import order_stages
    from posttrain.runner import run as run_recipe

    require_working_rewards(loaded)  # a broken reward fails here, before any weights load
    require_vllm(loaded)  # and trl's vLLM generation without a GPU, vllm or its server
    names = [s.name for s in order_stages(loaded)]
    console.print(f"[bold]{loaded.name}[/]: {len(names)} stages ({' → '.join(names)}) in {loaded.run_dir}",
                  soft_wrap=True)  # fmt: skip
    try:
        results = run_recipe(
            loaded, force=tuple(force or ()), only=only, report=_report, verify_hashes=verify_hashes
        )
    except KeyboardInterrupt as e:  # typer would turn it into a silent exit code
        console.print(f"[yellow]interrupted[/]{': ' + str(e) if str(e) else ''}")
        raise typer.Exit(130) from None
    leave()  # all ranks together, before the interpreter's exit-time destructors run
    if os.environ.get("RANK", "0") != "0":  # under accelerate launch, the main process reports
        return
    console.print(f"[bold green]done[/] {loaded.run_dir}")
    for name, metrics in results.items():
        console.print(f"  {name}: {_summary(loaded.stage(name).kind, metrics)}")


def _report(stage: str, event: str, details: dict) -> None:
    if event == "cached":
        console.print(
            f"[dim]✓ stage {details['index']}/{details['total']} {stage}: cached ({details['dir']})[/]"
        )
    elif event in ("start", "resume"):
        verb = "resuming" if event == "resume" else "running"
        where = f"stage {details['index']}/{details['total']}"
        console.rule(f"[bold]{where} · {stage}[/] ({details['kind']}): {verb}")
    elif event == "re-evaluate":
        console.print(f"[yellow]↻ {stage}: eval changed, re-evaluating[/]")
    elif event == "rebuild":
        console.print(
            f"[yellow]↻ {stage}: finished, but damaged ({escape(details['why'])}); rebuilding[/]",
            soft_wrap=True,
        )
    elif event == "lock":
        console.print(f"[yellow]{details['dir']}: taking over the lock of a run that ended without releasing it "
                      f"({escape(details['holder'])})[/]", soft_wrap=True)  # fmt: skip
    elif event == "done":
        console.print(
            f"[green]✓ {stage}[/] in {details['wall_time_s']:.1f}s: {_summary(details['kind'], details['metrics'])}"
        )
    elif event == "pushed":
        console.print(f"[green]↑ {stage}[/] pushed to {', '.join(details['urls'])}")


def _summary(kind: str, metrics: dict) -> str:
    """A stage's metrics in one line: what its kind says it did (report.outcome), then the
    held-out evaluation (posttrain.metrics.EvalMetrics)."""
    from posttrain.metrics import EvalMetrics
    from posttrain.report import outcome

    parts = outcome(kind, metrics)
    evaluation: EvalMetrics = metrics.get("eval") or {}
    if "accuracy" in evaluation:
        parts.append(f"eval accuracy {evaluation['accuracy']:.3f} (n={evaluation['n']})")
    if "pass_at_1" in evaluation:
        parts.append(f"pass@1 {evaluation['pass_at_1']:.3f} (k={evaluation['k']})")
    return ", ".join(parts) or "ok"


@app.command()
def validate(recipe: Recipe, set_: Set = None) -> None:
    """Check a recipe (schema, references, trainer keys) without loading any model."""
    from posttrain.runner import order_stages

    loaded = _load(recipe, set_)
    order = " → ".join(s.name for s in order_stages(loaded))
    console.print(f"[green]✓[/] {recipe}: {len(loaded.stages)} stages ({order})", soft_wrap=True)


@app.command()
def plan(
    recipe: Recipe,
    set_: Set = None,
    force: Annotated[list[str] | None, typer.Option("--force", help="Show this stage as re-run.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable plan on stdout.")] = False,
    gpus_per_node: Annotated[
        int, typer.Option("--gpus-per-node", min=1, help="GPUs per node, for the memory estimate.")
    ] = 8,
    nodes: Annotated[int, typer.Option("--nodes", min=1, help="Nodes, for the memory estimate.")] = 1,
    gpu_memory: Annotated[
        str | None,
        typer.Option("--gpu-memory", help="Memory per GPU (e.g. 80GB): estimate each stage's memory."),
    ] = None,
    preflight: Annotated[
        bool, typer.Option(help="Load tokenizers and data, check columns, lengths and rewards.")
    ] = True,
) -> None:
    """Show the stages in run order, their inputs, and which are cached, then the preflight checks;
    with --gpu-memory, also each stage's per-GPU memory under DDP / ZeRO-2 / ZeRO-3 / ZeRO-3 +
    offload and what fits."""
    loaded = _load(recipe, set_)
    memory = _memory_plan(loaded, gpus_per_node, nodes, gpu_memory) if gpu_memory else None
    if as_json:
        from posttrain.runner import make_plan

        rows = [
            {
                "name": p.stage.name,
                "kind": p.stage.kind,
                "inputs": p.deps,
                "status": p.status,
                "fingerprint": p.fingerprint,
            }
            for p in make_plan(loaded, tuple(force or ()))
        ]
        out = {"name": loaded.name, "run_dir": str(loaded.run_dir), "stages": rows}
        if (holder := live_holder(loaded.run_dir)) is not None:
            out["live_run"] = dataclasses.asdict(holder)
        if preflight:
            out["preflight"] = [dataclasses.asdict(f) for f in _preflight(loaded)]
        typer.echo(json.dumps({**out, **({"memory": memory} if memory else {})}, indent=2))
        if any(f["problem"] for f in out.get("preflight", [])):
            raise typer.Exit(2)
        return
    _print_plan(loaded, tuple(force or ()))
    if memory:
        _print_memory(memory)
    if preflight:
        _print_preflight(loaded, with_memory=False)


def _preflight(recipe) -> list:
    _quiet_libraries()
    from posttrain.preflight import preflight

    return preflight(recipe)


def _print_preflight(recipe, with_memory: bool) -> None:
    """One line per finding; exit 2 when any is a problem, so a broken run never starts."""
    from posttrain.preflight import memory_findings

    findings = _preflight(recipe) + (memory_findings(recipe) if with_memory else [])
    for finding in findings:
        style = "red" if finding.problem else "yellow" if finding.warning else "dim"
        console.print(f"[{style}]{escape(finding.line())}[/]", highlight=False, soft_wrap=True)
    problems = sum(f.problem for f in findings)
    if problems:
        console.print(f"[red]preflight: {problems} problem(s)[/]")
        raise typer.Exit(2)
    console.print("[green]preflight: ok[/]")


def _memory_plan(recipe, gpus_per_node: int, nodes: int, gpu_memory: str) -> dict:
    from posttrain.memory import Cluster, parse_size
    from posttrain.preflight import memory_plan

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # configs come from disk or the hub cache, never the network
    return memory_plan(recipe, Cluster(gpus_per_node, nodes, parse_size(gpu_memory)))


def _print_memory(memory: dict) -> None:
    """The per-GPU table: a row per stage (a phased stage's peak), then a row per phase and per frozen
    model or vLLM share it holds; then each stage's breakdown under its lightest fitting setting."""
    from posttrain.memory import GIB, SHARDINGS

    gpus = memory["gpus_per_node"] * memory["nodes"]
    table = Table(
        title=f"memory per GPU: {memory['nodes']} node(s) × {memory['gpus_per_node']} GPUs, "
        f"{memory['gpu_memory'] / GIB:.0f} GiB each ({gpus} GPUs)"
    )
    for column in ("stage", "params total / active / trainable", *(s.name for s in SHARDINGS)):
        table.add_column(column, justify="right" if column in {s.name for s in SHARDINGS} else "left")
    for row in memory["stages"]:
        _memory_rows(table, row, row["name"])
        for phase in row.get("phases", []):
            _memory_rows(table, phase, f"  {phase['name']}")
    console.print(table)
    for row in memory["stages"]:
        if "estimates" not in row:
            continue
        name = (row["fits_with"] or ["zero3_offload"])[0]
        best = row["estimates"][name]
        parts = ", ".join(
            f"{k} {best[k] / GIB:.1f}"
            for k in best
            if k not in ("total", "fits", "cpu_offload", "peak") and best[k]
        )
        host = best["cpu_offload"] / GIB
        offload = (
            f"; host memory {host:.1f} GiB per GPU, {host * memory['gpus_per_node']:.0f} GiB per node"
            if host
            else ""
        )
        peak = f" (peak: {best['peak']})" if "peak" in best else ""
        console.print(f"  {row['name']} with {name}{peak}: {best['total'] / GIB:.1f} GiB = {parts}{offload}")
        for hint in row["suggestions"]:
            console.print(f"    [yellow]→ {hint}[/]")
    rec = memory["recommended"]
    console.print(
        f"recommended: [bold]{rec['accelerate_config']}[/]"
        if rec
        else "[red]no shipped setting fits every stage[/]"
    )


def _memory_rows(table: Table, row: dict, name: str) -> None:
    """A stage's (or phase's) row of the table, and one below it per frozen model and vLLM share."""
    from posttrain.memory import GIB, SHARDINGS, VLLM_ROW

    if "skipped" in row:
        table.add_row(name, f"[dim]{escape(row['skipped'])}[/]", *("-" for _ in SHARDINGS))
        return
    estimates = row["estimates"]
    cells = [f"[{'green' if estimates[s.name]['fits'] else 'red'}]{estimates[s.name]['total'] / GIB:.1f}[/]"
             for s in SHARDINGS]  # fmt: skip
    if "phases" in row:  # a phased stage: its row is the peak phase's
        peaks = dict.fromkeys(estimates[s.name]["peak"] for s in SHARDINGS)
        table.add_row(name, f"peak: {', '.join(peaks)}", *cells)
        return
    p = row["params"]
    counts = f"{_count(p['total'])} / {_count(p['active'])} / {_count(p['trainable'])}"
    table.add_row(
        name, counts + (" (LoRA)" if p["lora"] else " (sampling)" if p["inference"] else ""), *cells
    )
    held = [(f["label"], f["params"], f["note"]) for f in p["frozen"]]
    share = p["vllm"]["gpu_memory_utilization"]
    if share or p["vllm"]["note"]:
        held.append((VLLM_ROW if share else "vllm", 0, _vllm_note(p)))
    for label, params, note in held:
        what = " · ".join(x for x in (f"{_count(params)} frozen" if params else "", note) if x)
        table.add_row(
            f"    · {label}",
            f"[dim]{escape(what)}[/]",
            *(f"[dim]{estimates[s.name].get(label, 0) / GIB:.1f}[/]" for s in SHARDINGS),
        )


def _vllm_note(params: dict) -> str:
    vllm = params["vllm"]
    share = vllm["gpu_memory_utilization"]
    if not share:
        return vllm["note"]
    if params["inference"]:  # the engine must at least hold its slice of the weights
        return f"{share:g} × GPU memory, at least the weights over {vllm['tensor_parallel']} GPU(s)"
    return f"{share:g} × GPU memory ({vllm['note']})"


def _count(n: int) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _print_plan(recipe, force: tuple[str, ...]) -> None:
    from posttrain.runner import make_plan

    table = Table(title=f"{recipe.name} → {recipe.run_dir}")
    for column in ("#", "stage", "kind", "inputs", "status"):
        table.add_column(column)
    styles = {"cached": "dim", "run": "bold", "resume": "yellow", "waits": "default", "rebuild": "yellow"}
    for i, p in enumerate(make_plan(recipe, force), 1):
        status = {"waits": "run (after inputs)"}.get(p.status, p.status)
        table.add_row(
            str(i), p.stage.name, p.stage.kind, ", ".join(p.deps) or "-", f"[{styles[p.status]}]{status}[/]"
        )
    console.print(table)
    _print_live_run(recipe)


def _print_live_run(recipe) -> None:
    holder = live_holder(recipe.run_dir)
    if holder is not None:
        console.print(
            f"[yellow]a run is live in {escape(str(recipe.run_dir))} ({escape(str(holder))}): statuses change as it goes[/]",
            soft_wrap=True,
        )


@app.command()
def report(run_dir: RunDir) -> None:
    """Rebuild a run's report.md and plots from its stage folders."""
    from posttrain.report import write_report

    if not run_dir.is_dir():
        raise PosttrainError(f"{run_dir}: no such run directory", fix="pass runs/<name>")
    path = write_report(run_dir)
    console.print(f"[green]✓[/] {path}")


@app.command()
def verify(recipe: Recipe, set_: Set = None) -> None:
    """Check the recipe's run directory: every stage complete, its listed files intact, its
    model loadable, every JSONL file (judge caches, samples, traces) uncorrupted. Exit 2 if not."""
    from posttrain.verify import verify_run

    loaded = _load(recipe, set_)
    problems = verify_run(loaded)
    for problem in problems:
        typer.echo(problem)
    if problems:
        raise typer.Exit(2)
    console.print(f"[green]✓[/] {loaded.run_dir}: {len(loaded.stages)} stages complete and valid")


@app.command()
def schema() -> None:
    """Print the recipe's JSON schema (editors validate recipes with it: see the first line of
    recipes/demo.yaml)."""
    from posttrain.recipe.json_schema import recipe_schema

    typer.echo(json.dumps(recipe_schema(), indent=2))


@app.command()
def export(
    run_dir: RunDir,
    to: Annotated[Path, typer.Option("--to", help="A new folder for the model.", show_default=False)],
    stage: StageOption = None,
    merge: Annotated[
        bool, typer.Option("--merge/--no-merge", help="Merge a LoRA adapter into its base model.")
    ] = True,
    push_to_hub: Annotated[
        str | None,
        typer.Option("--push-to-hub", metavar="REPO", help="Also upload it to this Hub model repo."),
    ] = None,
    license: Annotated[
        str | None,
        typer.Option("--license", help="The card's license (default: the base model's, else other)."),
    ] = None,
) -> None:
    """Write a stage's model as a standalone folder: weights, tokenizer and a model card."""
    from posttrain.export import export_model, push

    dest = export_model(run_dir, stage, to, merge=merge, license=license)
    loader = (
        "peft's AutoPeftModelForCausalLM"
        if (dest / "adapter_config.json").exists()
        else "AutoModelForCausalLM"
    )
    console.print(
        f"[green]✓[/] {dest}: a model card and weights; loads with {loader}.from_pretrained", soft_wrap=True
    )
    if push_to_hub:
        console.print(f"[green]↑[/] {push(dest, push_to_hub)}")


@app.command()
def chat(
    model: Annotated[
        Path,
        typer.Argument(
            metavar="MODEL_OR_RUN_DIR", help="A model folder, or a run directory.", show_default=False
        ),
    ],
    stage: StageOption = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Reply length.")] = 256,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="0 is greedy.")] = 0.0,
    system: Annotated[str | None, typer.Option("--system", help="A system prompt.")] = None,
) -> None:
    """Talk to a model in the terminal through its chat template (/reset forgets, /exit or Ctrl-D ends)."""
    _quiet_libraries()
    from posttrain.chat import chat_loop

    chat_loop(model, stage, max_new_tokens=max_new_tokens, temperature=temperature, system=system)


data_app = typer.Typer(help="Look at datasets before training on them.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("inspect")
def data_inspect(
    source: Annotated[str, typer.Argument(help="A data file, folder or hub dataset id.", show_default=False)],
    columns: Annotated[
        str | None, typer.Option("--columns", help="canonical=source pairs: prompt=question,answer=solution.")
    ] = None,
    template: Annotated[str | None, typer.Option("--template", help="Build prompt: '{question}'.")] = None,
    split: Annotated[str | None, typer.Option("--split", help="Split (default train).")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Hub dataset config.")] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="Preset or model path whose tokenizer counts tokens.")
    ] = None,
    examples: Annotated[int, typer.Option("--examples", help="Rows to show rendered.")] = 3,
    out: Annotated[Path, typer.Option("--out", help="Folder for the length histogram.")] = Path("."),
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable summary on stdout.")] = False,
    loss_mask: Annotated[
        bool, typer.Option("--loss-mask", help="Show which tokens SFT trains on (JSON: trained_text).")
    ] = False,
    chat_template: Annotated[
        str | None, typer.Option("--chat-template", help="A .jinja file or trl built-in to render with.")
    ] = None,
) -> None:
    """Rows, columns, examples through the chat template, token lengths, duplicates, histogram."""
    _quiet_libraries()
    from posttrain.data_tools.summary import inspect_data, parse_columns

    summary = inspect_data(
        source, columns=parse_columns(columns), template=template, split=split, name=name,
        model=model, examples=examples, out_dir=out, loss_mask=loss_mask, chat_template=chat_template,
    )  # fmt: skip
    if as_json:
        typer.echo(json.dumps(summary, indent=2, ensure_ascii=False))
        return
    lengths = summary["token_lengths"]
    console.print(f"[bold]{source}[/]: {summary['rows']} rows; columns: {', '.join(summary['columns'])}")
    console.print(
        f"tokens per row ({summary['tokenizer']}): "
        + ", ".join(f"{k} {v:g}" for k, v in lengths.items() if k != "mean")
        + f", mean {lengths['mean']:.1f}"
    )
    dup = summary["duplicates"]
    console.print(f"duplicates: {dup['exact']} exact, {dup['near']} near")
    if loss_mask:
        console.print(f"{summary['masking']}; [bold green]trained[/], [dim]not trained[/]")
    for i, example in enumerate(summary["examples"], 1):
        console.rule(f"example {i}")
        if loss_mask:
            console.print(masked_text(example), highlight=False)
        else:
            console.print(example, markup=False, highlight=False)
    console.print(f"length histogram: {summary['histogram']}")


def masked_text(example: dict):  # -> rich.text.Text
    """An example's text with its loss-carrying tokens in bold green (plain text: the colour is gone,
    so trained runs are also set in ⟦ ⟧)."""
    from rich.text import Text

    text = Text()
    plain = not console.is_terminal
    for run in example["runs"]:
        piece = f"⟦{run['text']}⟧" if plain and run["trained"] else run["text"]
        text.append(piece, style="bold green" if run["trained"] else "dim")
    return text


# --------------------------------------------------------------------------- rewards

rewards_app = typer.Typer(help="List rewards and score completions with them.", no_args_is_help=True)
app.add_typer(rewards_app, name="rewards")


@rewards_app.command("list")
def rewards_list() -> None:
    """The registered rewards, each with its one-line summary."""
    from posttrain.rewards import describe

    for name, summary in describe().items():
        typer.echo(f"{name:22s} {summary}")


@rewards_app.command("score")
def rewards_score(
    file: Annotated[
        Path, typer.Argument(help="JSONL rows with `completion` and the columns the rewards read.")
    ],
    reward: Annotated[
        list[str],
        typer.Option(
            "--reward", help="A reward name, package.module:function, or '{name: format, mode: lenient}'."
        ),
    ],
    out: Annotated[
        Path | None, typer.Option("--out", help="Write each row with `rewards: {name: score}`.")
    ] = None,
    tokenizer: Annotated[
        str | None, typer.Option("--tokenizer", help="Count lengths and n-grams in this model's tokens.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Summary as JSON on stdout.")] = False,
) -> None:
    """Score completions with rewards: mean, std, share of None, errors, timeouts, samples/s per reward."""
    from posttrain.rewards.score import parse_reward, read_rows, score_rows

    specs = [parse_reward(r) for r in reward]
    rows = read_rows(file)
    tok = None
    if tokenizer:
        from posttrain.models import load_tokenizer
        from posttrain.recipe import PathModel

        tok = load_tokenizer(PathModel(path=tokenizer))
    scored, summary = score_rows(rows, specs, tok, label=str(file))
    if out is not None:
        write_atomic(out, "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in scored))
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    typer.echo(
        f"{'reward':22s} {'mean':>8s} {'std':>8s} {'none':>6s} {'errors':>7s} {'timeouts':>9s} {'samples/s':>10s}"
    )
    for name, s in summary.items():
        typer.echo(
            f"{name:22s} {s['mean']:8.4f} {s['std']:8.4f} {s['none_frac']:6.1%} {int(s['errors']):7d} "
            f"{int(s['timeouts']):9d} {s['samples_per_s']:10.1f}"
        )
    typer.echo(f"{len(rows)} rows" + (f" -> {out}" if out else ""))


def private_by_default() -> None:
    """Nothing leaves the machine unless the user asks: vLLM's usage statistics, the Hugging Face
    hub's telemetry and DO_NOT_TRACK-aware libraries opt out (setdefault: an exported value wins).
    Set before any of them is imported, since they read these at import time."""
    for name in ("VLLM_NO_USAGE_STATS", "DO_NOT_TRACK", "HF_HUB_DISABLE_TELEMETRY"):
        os.environ.setdefault(name, "1")


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line and exit code 2 (tracebacks with --debug)."""
    private_by_default()
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("POSTTRAIN_DEBUG") == "1"
    args = [a for a in args if a != "--debug"]  # a flag of the whole line, for every command
    # before any command imports peft (which imports bitsandbytes); validate loads it too
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_no_kernel_hub_notice)
    try:
        code = app(args=args, prog_name="posttrain", standalone_mode=False)
        if isinstance(code, int) and code:  # typer returns Exit codes instead of raising them
            sys.exit(code)
    except PosttrainError as e:
        if debug:
            raise
        console.print(
            f"[bold red]error{_rank_label()}:[/] {escape(str(e))}", soft_wrap=True
        )  # keep [brackets]
        sys.exit(2)
    except typer.Abort:
        console.print("[yellow]interrupted[/]")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.TyperException as e:  # click's errors (typer bundles its own click): usage mistakes
        if debug:
            raise
        if type(e).__name__ != "NoArgsIsHelpError":  # `posttrain` alone has printed its help
            console.print(f"[bold red]error:[/] {escape(usage_error(e, args))}", soft_wrap=True)
        sys.exit(2)
    except Exception as e:  # a peer rank's failure
        if isinstance(e, PeerFailed):  # the main process failed and has printed why
            console.print(f"[dim]stopping{_rank_label()}: {e}[/]", soft_wrap=True)
            sys.exit(2)
        raise


# A command people type that posttrain calls something else.
SYNONYMS = {"train": "run", "fit": "run", "finetune": "run", "check": "validate", "show": "plan"}


def usage_error(e: typer.TyperException, args: list[str]) -> str:
    """A click usage error as one line, with a did-you-mean and where to look."""
    message = " ".join(e.format_message().split()).rstrip(".")
    ctx = getattr(e, "ctx", None)
    command = ctx.command_path if ctx is not None else "posttrain"
    kind = type(e).__name__
    if message.startswith("No such command") and "Did you mean" not in message:
        close = did_you_mean(message.split("'")[1] if "'" in message else "", SYNONYMS)
        if close:
            meant = SYNONYMS[close.split("'")[1]]
            return f"{message}. Did you mean '{meant}'? (see `posttrain {meant} --help`)"
    if kind == "NoSuchOption" and not e.possibilities and _takes_set(ctx):
        return f"{message} (a trainer option? --set stages.STAGE.train.{_as_key(e.option_name, args)})"
    if kind in ("MissingParameter", "BadArgumentUsage") and ctx is not None:
        message += ". " + " ".join(ctx.get_usage().split())
    return f"{message} (see `{command} --help`)"


def _takes_set(ctx: typer.Context | None) -> bool:
    return ctx is not None and any("--set" in getattr(p, "opts", ()) for p in ctx.command.params)


def _as_key(option: str, args: list[str]) -> str:
    """`--max-steps 3` (or `--max-steps=3`) as the trl key and value: `max_steps=3`."""
    key = option.lstrip("-").replace("-", "_")
    for i, arg in enumerate(args):
        if arg.startswith(option + "="):
            return f"{key}={arg.split('=', 1)[1]}"
        if arg == option and i + 1 < len(args) and not args[i + 1].startswith("-"):
            return f"{key}={args[i + 1]}"
    return f"{key}=VALUE"


def _rank_label() -> str:
    """' (rank 1/2)' in a multi-process launch, so each line says which process wrote it."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    return f" (rank {rank}/{world})" if world > 1 else ""


if __name__ == "__main__":
    main()
