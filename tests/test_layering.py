"""The shape of the house: the recipe schema imports nothing above it, imports point down the
layers (import-linter), a stage kind is one schema class + one module + one registry line, the
loading step checks what the schema cannot, and `--debug` works on every command."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from test_recipe_fuzz import recipes

from posttrain import loading
from posttrain.errors import PosttrainError
from posttrain.recipe import STAGE_REGISTRY, StageBase
from posttrain.runner import order_stages
from posttrain.stages import stage_module

REPO = Path(__file__).resolve().parents[1]
HOOKS = (
    "run",
    "check",
    "slot",
    "workload",
    "headline",
    "outcome",
)  # what every stage module exposes, and `Metrics`
OPTIONAL = {"check", "workload", "headline", "outcome"}  # None says "this kind needs none"


def loaded_modules(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running `code`."""
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(out.stdout.split())


def test_the_recipe_schema_imports_nothing_above_it() -> None:
    posttrain = {m for m in loaded_modules("import posttrain.recipe") if m.startswith("posttrain")}
    above = {m for m in posttrain if not m.startswith(("posttrain.recipe", "posttrain.errors"))}
    assert above <= {"posttrain"}, above  # posttrain.recipes (shipped data) is read, not imported


def test_cli_and_stage_modules_load_no_deep_learning_library() -> None:
    stages = "; ".join(f"import {module}" for _, module in STAGE_REGISTRY.values())
    loaded = loaded_modules(f"import posttrain.cli, posttrain.loading, posttrain.preflight; {stages}")
    assert not {"torch", "transformers", "trl", "datasets", "deepspeed"} & loaded


def test_imports_point_down_the_layers() -> None:
    """The import-linter contract in pyproject.toml holds (function-local imports included)."""
    path = (
        f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # this venv's lint-imports
    )
    done = subprocess.run(
        [str(REPO / ".ci" / "lint-imports")], capture_output=True, text=True, env={**os.environ, "PATH": path}
    )
    assert done.returncode == 0 and "1 kept, 0 broken" in done.stdout, done.stdout[-2000:] + done.stderr


@pytest.mark.parametrize("kind", sorted(STAGE_REGISTRY))
def test_a_stage_kind_is_one_schema_class_and_one_module(kind: str) -> None:
    schema, module_name = STAGE_REGISTRY[kind]
    assert issubclass(schema, StageBase) and schema.model_fields["kind"].annotation.__args__ == (kind,)
    module = stage_module(kind)
    assert module.__name__ == module_name
    for hook in HOOKS:
        assert hasattr(module, hook), f"{module_name} must say what its `{hook}` is (None if it has none)"
        value = getattr(module, hook)
        assert callable(value) or (value is None and hook in OPTIONAL), (module_name, hook)
    assert isinstance(getattr(module, "loss_panel", 0), str | None), (
        f"{module_name} names its loss panel (or None)"
    )
    assert hasattr(module.Metrics, "__required_keys__"), f"{module_name}.Metrics declares its metrics"


def test_no_module_outside_the_schema_branches_on_a_kind() -> None:
    """Each kind's knowledge lives in its schema class and its module: nothing else compares a
    stage's `kind` with a kind's name or asks `isinstance(stage, <a kind's class>)`."""
    classes = {schema.__name__ for schema, _ in STAGE_REGISTRY.values()}
    found = []
    for path in sorted([*(REPO / "posttrain").rglob("*.py"), *(REPO / "rewards").rglob("*.py")]):
        if path.parent.name == "recipe" or path.parent.name == "stages" and path.name != "__init__.py":
            continue  # the schema, and each kind's own module
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                names = {o.value for o in operands if isinstance(o, ast.Constant)} & set(STAGE_REGISTRY)
                if names and any("kind" in ast.unparse(o) for o in operands):
                    found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
            asks = isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance"
            if asks and {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)} & classes:
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert found == []


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(recipe=recipes())
def test_the_loading_step_loads_or_fails_cleanly(tmp_path_factory, recipe) -> None:
    """What the schema passes, the loading step checks with the same one-line errors."""
    path = tmp_path_factory.mktemp("fuzz") / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    try:
        order_stages(loading.load(path))
    except PosttrainError as e:
        assert str(e) and "\n" not in str(e), repr(str(e))


def test_debug_anywhere_on_the_line_shows_the_traceback(write_recipe, cli) -> None:
    recipe = write_recipe(
        "name: t\nbase_model: {preset: tiny-deepseek-v3}\nstages: [{name: a, kind: sfft}]\n"
    )
    code, _, err = cli("validate", recipe)
    assert code == 2 and "did you mean 'sft'" in err and "Traceback" not in err
    for args in (("validate", recipe, "--debug"), ("--debug", "plan", recipe)):
        with pytest.raises(PosttrainError, match="did you mean 'sft'"):
            cli(*args)
