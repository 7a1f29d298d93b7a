"""What a person sees at the command line: usage mistakes, --version, completion, the recipe
schema, the first line of a run, `export` with its model card, pushes to the Hub, and `chat`."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


# --------------------------------------------------------------------------- usage mistakes


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["trian", "r.yaml"], "No such command 'trian'. Did you mean 'run'?"),
        (["valdate", "r.yaml"], "Did you mean 'validate'?"),
        (["run"], "Missing argument 'RECIPE'. Usage: posttrain run [OPTIONS]"),
        (["run", "demo", "--max-steps", "3"], "--set stages.STAGE.train.max_steps=3"),
        (["run", "demo", "--max-steps=3"], "--set stages.STAGE.train.max_steps=3"),
        (["run", "demo", "--forse", "sft"], "Possible options: --force"),
        (["plan", "demo", "--nodes", "0"], "Invalid value for '--nodes'"),
        (["rewards", "lst"], "Did you mean 'list'?"),
        (["export", "runs/x"], "Missing option '--to'"),
    ],
)
def test_usage_mistakes_are_one_line_and_exit_2(cli, args: list[str], expected: str) -> None:
    code, out, err = cli(*args)
    assert code == 2, err
    assert expected in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and "--help" in err or "--set" in err


def test_a_usage_mistake_from_the_installed_command_is_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "posttrain", "run", "recipes/demo.yaml", "--max-steps", "3"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: No such option: --max-steps (a trainer option? --set stages.STAGE.train.max_steps=3)"
    ]


def test_version_and_bare_help(cli) -> None:
    from importlib.metadata import version

    code, out, _ = cli("--version")
    assert code == 0 and out.strip() == f"posttrain {version('posttrain')}"
    code, out, err = cli()
    assert code == 2 and "export" in out and "chat" in out and "Traceback" not in out + err


def test_shell_completion_completes_commands(monkeypatch) -> None:
    env = {
        **os.environ,
        "_POSTTRAIN_COMPLETE": "complete_bash",
        "COMP_WORDS": "posttrain ex",
        "COMP_CWORD": "1",
    }
    result = subprocess.run([sys.executable, "-c", "from posttrain.cli import main; main()"],
                            capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
    assert result.stdout.split() == ["export"], result
    # --show-completion detects the shell it runs under (shellingham walks the parent processes), so
    # it runs under bash here: pytest started in the background has no shell among its ancestors.
    command = f"{shlex.quote(sys.executable)} -m posttrain --show-completion; exit $?"  # `exit`: bash stays the parent
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "_POSTTRAIN_COMPLETE" in result.stdout, result


# --------------------------------------------------------------------------- the recipe schema


def test_schema_command_matches_the_shipped_schema_file(cli) -> None:
    code, out, _ = cli("schema")
    assert code == 0
    assert json.loads(out) == json.loads((RECIPES / "recipe.schema.json").read_text()), (
        "regenerate it: posttrain schema > recipes/recipe.schema.json"
    )


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_shipped_recipes_name_the_schema_and_pass_it(recipe: str) -> None:
    import jsonschema
    import yaml

    text = (RECIPES / recipe).read_text()
    assert text.splitlines()[0] == "# yaml-language-server: $schema=recipe.schema.json"
    validator = jsonschema.Draft202012Validator(json.loads((RECIPES / "recipe.schema.json").read_text()))
    assert [e.message for e in validator.iter_errors(yaml.safe_load(text))] == []


def test_the_schema_flags_what_the_recipe_loader_rejects() -> None:
    import jsonschema
    import yaml

    validator = jsonschema.Draft202012Validator(json.loads((RECIPES / "recipe.schema.json").read_text()))
    recipe = yaml.safe_load((RECIPES / "demo.yaml").read_text())
    recipe["stages"][0]["trian"] = {}  # a typo'd key
    recipe["stages"][1]["kind"] = "sftt"  # an unknown kind
    recipe["eval"]["k"] = "four"  # a wrong type
    paths = {tuple(e.absolute_path) for e in validator.iter_errors(recipe)}
    assert {("stages", 0), ("stages", 1), ("eval",)} <= paths


# --------------------------------------------------------------------------- the first line of a run


def test_run_prints_its_first_line_before_loading_any_heavy_library(tmp_path: Path) -> None:
    """The first line must come within 2 s; the recipe check imports trl (seconds), so the line
    must come before it. Asserted on what is imported, not on a clock."""
    script = (
        "import sys\n"
        "from posttrain import cli\n"
        "def first(*args, **kwargs):\n"
        "    print('HEAVY' if {'torch', 'transformers', 'trl'} & set(sys.modules) else 'LIGHT', args[0])\n"
        "    raise SystemExit(0)\n"
        "cli.console.print = first\n"
        "cli.main(['run', 'demo'])\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.stdout.startswith("LIGHT") and "checking the recipe" in result.stdout, result


# --------------------------------------------------------------------------- privacy


PRIVACY = ("VLLM_NO_USAGE_STATS", "DO_NOT_TRACK", "HF_HUB_DISABLE_TELEMETRY")


def test_the_cli_opts_out_of_usage_stats_and_telemetry_before_any_library_loads():
    env = {k: v for k, v in os.environ.items() if k not in PRIVACY}
    env["DO_NOT_TRACK"] = "0"  # a user who exported a choice keeps it
    script = (
        "import os\nfrom posttrain.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
        "import huggingface_hub.constants as hub\n"
        "print(os.environ['VLLM_NO_USAGE_STATS'], os.environ['DO_NOT_TRACK'], hub.HF_HUB_DISABLE_TELEMETRY)"
    )
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-3:] == ["1", "0", "True"]


def test_report_to_stays_local_unless_the_recipe_names_a_tracker(tmp_path, monkeypatch):
    from posttrain.context import StageContext
    from posttrain.errors import PosttrainError
    from posttrain.recipe import PresetModel
    from posttrain.training import trainer_args

    ctx = StageContext("sft", tmp_path, tmp_path, 0, PresetModel(preset="tiny-dense"), {})
    monkeypatch.setenv("KUBEFLOW_TRAINER_SERVER_URL", "http://controller")  # transformers would add kubeflow
    assert trainer_args("SFTConfig", {}, ctx).report_to == []
    assert trainer_args("SFTConfig", {"report_to": None}, ctx).report_to == []
    assert trainer_args("GRPOConfig", {"report_to": "tensorboard"}, ctx).report_to == []  # posttrain's own
    assert trainer_args("SFTConfig", {"report_to": ["tensorboard", "wandb"]}, ctx).report_to == ["wandb"]
    with pytest.raises(PosttrainError, match="stages.sft.train.report_to.*name the ones you want"):
        trainer_args("SFTConfig", {"report_to": "all"}, ctx)


def test_the_bitsandbytes_kernel_hub_notice_is_quiet_and_its_other_warnings_are_not() -> None:
    """bitsandbytes logs 'Failed to load CPU gemm_4bit_forward from kernels-community' on import
    without the `kernels` package (on CPUs with AVX-512 BF16, as here). The launches in
    test_distributed check that a whole `posttrain run` no longer prints it."""
    import logging

    from posttrain.cli import _no_kernel_hub_notice

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord(
            "bitsandbytes.backends.cpu.ops", logging.WARNING, "ops.py", 1, message, (), None
        )

    assert not _no_kernel_hub_notice(
        record("Failed to load CPU gemm_4bit_forward from kernels-community: %s.")
    )
    assert _no_kernel_hub_notice(record("another bitsandbytes warning"))
