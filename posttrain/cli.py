"""The `posttrain` command: run, validate and plan recipes.

Heavy libraries (torch, transformers, trl) are imported inside the commands, so `--help`
is instant. A problem with the user's input prints one line and exits 2; add `--debug`
for the traceback.

    posttrain run recipes/demo.yaml
    posttrain run recipes/demo.yaml --set stages.sft.train.learning_rate=1e-3 --force sft
    accelerate launch --config_file recipes/accelerate/zero3.yaml -m posttrain run r.yaml
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from posttrain.errors import PosttrainError

app = typer.Typer(
    name="posttrain",
    help="DeepSeek-style post-training from one recipe: SFT, RLAIF reward models, GRPO, distillation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True, highlight=False)

Recipe = Annotated[
    Path,
    typer.Argument(help="The recipe YAML file, or the name of a shipped one (demo).", show_default=False),
]
Set = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="Override a recipe key: --set stages.sft.train.learning_rate=1e-4 (repeatable)."
    ),
]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]


def _load(recipe: Path, overrides: list[str] | None):  # -> Recipe
    from posttrain.recipe import load_recipe

    return load_recipe(shipped_recipe(recipe), overrides or [])


def shipped_recipe(path: Path) -> Path:
    """`posttrain run demo` finds the recipe that ships in the package when no such file is here."""
    if path.exists() or path.parent != Path("."):
        return path
    from importlib.resources import files

    shipped = Path(str(files("posttrain.recipes"))) / (path.name if path.suffix else f"{path.name}.yaml")
    return shipped if shipped.exists() else path


def _quiet_libraries() -> None:
    """Keep the trainer's progress bar; drop datasets' per-map bars and info chatter."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # libraries' deprecation notices
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_warning()


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
    debug: Debug = False,
) -> None:
    """Run a recipe: every stage in order, skipping finished ones and resuming interrupted ones."""
    loaded = _load(recipe, set_)
    if dry_run:
        _print_plan(loaded, tuple(force or ()))
        return
    _quiet_libraries()
    from posttrain.runner import run as run_recipe

    results = run_recipe(loaded, force=tuple(force or ()), only=only, report=_report)
    console.print(f"[bold green]done[/] {loaded.run_dir}")
    for name, metrics in results.items():
        console.print(f"  {name}: {_summary(metrics)}")


def _report(stage: str, event: str, details: dict) -> None:
    if event == "cached":
        console.print(f"[dim]✓ {stage}: cached ({details['dir']})[/]")
    elif event in ("start", "resume"):
        verb = "resuming" if event == "resume" else "running"
        console.rule(f"[bold]{stage}[/] ({details['kind']}): {verb}")
    elif event == "re-evaluate":
        console.print(f"[yellow]↻ {stage}: eval changed, re-evaluating[/]")
    elif event == "done":
        console.print(f"[green]✓ {stage}[/] in {details['wall_time_s']:.1f}s: {_summary(details['metrics'])}")


def _summary(metrics: dict) -> str:
    parts = []
    train = metrics.get("train") or {}
    if train.get("loss_first") is not None:
        parts.append(f"loss {train['loss_first']:.3f} → {train['loss_last']:.3f}")
    evaluation = metrics.get("eval") or {}
    if "accuracy" in evaluation:
        parts.append(f"eval accuracy {evaluation['accuracy']:.3f} (n={evaluation['n']})")
    models = {"teacher": metrics.get("teacher") or {}, **(metrics.get("students") or {})}
    if "students" in metrics and all("accuracy" in m for m in models.values()):
        sizes = [f"{name} {m['accuracy']:.3f} ({m['parameters'] / 1e6:.2f}M)" for name, m in models.items()]
        parts.append("accuracy " + ", ".join(sizes))
    return ", ".join(parts) or "ok"


@app.command()
def validate(recipe: Recipe, set_: Set = None, debug: Debug = False) -> None:
    """Check a recipe (schema, references, trainer keys) without loading any model."""
    from posttrain.runner import order_stages

    loaded = _load(recipe, set_)
    order = " → ".join(s.name for s in order_stages(loaded))
    console.print(f"[green]✓[/] {recipe}: {len(loaded.stages)} stages ({order})")


@app.command()
def plan(
    recipe: Recipe,
    set_: Set = None,
    force: Annotated[list[str] | None, typer.Option("--force", help="Show this stage as re-run.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable plan on stdout.")] = False,
    debug: Debug = False,
) -> None:
    """Show the stages in run order, their inputs, and which are cached."""
    loaded = _load(recipe, set_)
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
        typer.echo(
            json.dumps({"name": loaded.name, "run_dir": str(loaded.run_dir), "stages": rows}, indent=2)
        )
        return
    _print_plan(loaded, tuple(force or ()))


def _print_plan(recipe, force: tuple[str, ...]) -> None:
    from posttrain.runner import make_plan

    table = Table(title=f"{recipe.name} → {recipe.run_dir}")
    for column in ("#", "stage", "kind", "inputs", "status"):
        table.add_column(column)
    styles = {"cached": "dim", "run": "bold", "resume": "yellow", "waits": ""}
    for i, p in enumerate(make_plan(recipe, force), 1):
        status = {"waits": "run (after inputs)"}.get(p.status, p.status)
        table.add_row(
            str(i), p.stage.name, p.stage.kind, ", ".join(p.deps) or "-", f"[{styles[p.status]}]{status}[/]"
        )
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line and exit code 2 (tracebacks with --debug)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("POSTTRAIN_DEBUG") == "1"
    try:
        app(args=args, prog_name="posttrain", standalone_mode=False)
    except PosttrainError as e:
        if debug:
            raise
        console.print(f"[bold red]error:[/] {e}", soft_wrap=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        console.print("[yellow]interrupted[/]")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # click's usage errors
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
