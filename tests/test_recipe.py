"""Recipe schema: every mistake is one line with file, line, key and a fix; shipped recipes validate."""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.errors import PosttrainError
from posttrain.recipe import FileData, PathModel, PresetModel, SyntheticData, load_recipe
from posttrain.runner import order_stages

RECIPES = Path(__file__).resolve().parent.parent / "recipes"

GOOD = """\
name: t
base_model: {preset: tiny-deepseek-v3}
stages:
  - name: sft
    kind: sft
    data: {synthetic: arithmetic, n: 10}
    train: {learning_rate: 1.0e-3}
"""


def error_of(write_recipe, text: str, overrides: tuple[str, ...] = ()) -> PosttrainError:
    with pytest.raises(PosttrainError) as info:
        load_recipe(write_recipe(text), overrides)
    return info.value


def test_good_recipe_parses_into_typed_blocks(write_recipe):
    recipe = load_recipe(write_recipe(GOOD))
    assert recipe.name == "t"
    assert isinstance(recipe.base_model, PresetModel)
    stage = recipe.stage("sft")
    assert isinstance(stage.data, SyntheticData) and stage.data.n == 10
    assert stage.train == {"learning_rate": 1.0e-3}


@pytest.mark.parametrize(
    "snippet, line, key, words",
    [
        (
            "    train: {lerning_rate: 1.0e-3}\n",
            7,
            "stages.sft.train.lerning_rate",
            "did you mean 'learning_rate'",
        ),
        ("    dataa: {synthetic: arithmetic}\n", 7, "stages.sft.dataa", "did you mean 'data'"),
        ("    lora: {r: 8, alpah: 16}\n", 7, "stages.sft.lora.alpah", "did you mean 'alpha'"),
        ("    lora: {r: 0}\n", 7, "stages.sft.lora.r", "greater than 0"),
        ("    model: stf\n", 7, "stages.sft.model", "did you mean 'sft'"),
    ],
)
def test_stage_mistakes_name_line_key_and_fix(write_recipe, snippet, line, key, words):
    text = GOOD.replace("    train: {learning_rate: 1.0e-3}\n", snippet)
    err = error_of(write_recipe, text)
    assert err.line == line, str(err)
    assert err.key == key, str(err)
    assert words in str(err)
    assert "\n" not in str(err)


def test_unknown_top_level_key(write_recipe):
    err = error_of(write_recipe, GOOD + "sed: 1\n")
    assert err.key == "sed" and "did you mean 'seed'" in str(err) and err.line == 8


def test_unknown_kind_suggests_the_closest(write_recipe):
    err = error_of(write_recipe, GOOD.replace("kind: sft", "kind: sfft"))
    assert err.key == "stages.sft.kind" and err.line == 5 and "did you mean 'sft'" in str(err)


def test_missing_required_key(write_recipe):
    err = error_of(write_recipe, GOOD.replace("base_model: {preset: tiny-deepseek-v3}\n", ""))
    assert err.key == "base_model" and "missing" in str(err)


def test_yaml_syntax_error_has_its_line(write_recipe):
    err = error_of(write_recipe, "name: t\nbase_model: {preset: x\nstages: []\n")
    assert err.line == 3 and "invalid YAML" in str(err)


def test_duplicate_yaml_key(write_recipe):
    err = error_of(write_recipe, GOOD + "seed: 1\nseed: 2\n")
    assert err.line == 9 and "duplicate key 'seed'" in str(err)


def test_duplicate_stage_names(write_recipe):
    stage = GOOD.split("stages:\n")[1]
    err = error_of(write_recipe, GOOD + stage)
    assert "two stages are named 'sft'" in str(err)


def test_cycle_is_an_error(write_recipe):
    text = GOOD.replace("    kind: sft\n", "    kind: sft\n    model: other\n") + (
        "  - name: other\n    kind: sft\n    model: sft\n    data: {synthetic: arithmetic}\n"
    )
    recipe = load_recipe(write_recipe(text))
    with pytest.raises(PosttrainError, match="cycle: sft -> other -> sft"):
        order_stages(recipe)


def test_references_order_stages_regardless_of_listing(write_recipe):
    text = """\
    name: t
    base_model: {preset: tiny-deepseek-v3}
    stages:
      - {name: c, kind: sft, model: b, data: {synthetic: arithmetic}}
      - {name: a, kind: sft, data: {synthetic: arithmetic}}
      - {name: b, kind: sft, model: a, data: a}
    """
    recipe = load_recipe(write_recipe(text))
    assert [s.name for s in order_stages(recipe)] == ["a", "b", "c"]


def test_paths_and_hub_ids_are_not_stage_references(write_recipe):
    text = GOOD.replace("    kind: sft\n", "    kind: sft\n    model: Qwen/Qwen3-0.6B\n").replace(
        "data: {synthetic: arithmetic, n: 10}", "data: {path: data/train.jsonl, columns: {prompt: question}}"
    )
    recipe = load_recipe(write_recipe(text))
    stage = recipe.stage("sft")
    assert stage.model == "Qwen/Qwen3-0.6B" and isinstance(stage.data, FileData)
    assert stage.data.columns == {"prompt": "question"}


def test_set_overrides_address_stages_by_name(write_recipe):
    recipe = load_recipe(
        write_recipe(GOOD),
        ["stages.sft.train.learning_rate=0.5", "seed=7", "base_model={path: org/model, dtype: bfloat16}"],
    )
    assert recipe.stage("sft").train["learning_rate"] == 0.5
    assert recipe.seed == 7
    assert recipe.base_model == PathModel(path="org/model", dtype="bfloat16")


def test_set_override_errors_point_at_the_flag(write_recipe):
    err = error_of(write_recipe, GOOD, ("stages.sft.train.lerning_rate=1",))
    assert err.file == "--set" and "did you mean 'learning_rate'" in str(err)
    err = error_of(write_recipe, GOOD, ("stages.sfx.train.learning_rate=1",))
    assert "did you mean 'sft'" in str(err)
    err = error_of(write_recipe, GOOD, ("seed",))
    assert "KEY=VALUE" in str(err)


def test_lora_extra_keys_are_checked_against_peft(write_recipe):
    load_recipe(write_recipe(GOOD.replace("    train:", "    lora: {r: 4, use_rslora: true}\n    train:")))
    err = error_of(write_recipe, GOOD.replace("    train:", "    lora: {r: 4, use_rslra: true}\n    train:"))
    assert err.key == "stages.sft.lora.use_rslra" and "use_rslora" in str(err)


def test_lora_dropout_with_fused_expert_targets(write_recipe):
    text = GOOD.replace(
        "    train:", "    lora: {dropout: 0.1, target_parameters: [mlp.experts.down_proj]}\n    train:"
    )
    assert "dropout must be 0" in str(error_of(write_recipe, text))


def test_missing_file_and_non_mapping():
    with pytest.raises(PosttrainError, match="no such file"):
        load_recipe("does/not/exist.yaml")


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path: Path):
    recipe = load_recipe(path)
    assert order_stages(recipe)


def test_yaml_12_floats_and_typed_train_values(write_recipe):
    recipe = load_recipe(write_recipe(GOOD.replace("1.0e-3", "1e-3")), ["stages.sft.train.max_length=null"])
    assert recipe.stage("sft").train["learning_rate"] == 0.001
    err = error_of(write_recipe, GOOD.replace("learning_rate: 1.0e-3", "learning_rate: fast"))
    assert err.key == "stages.sft.train.learning_rate" and "expects float, got 'fast'" in str(err)
    err = error_of(write_recipe, GOOD, ("stages.sft.train.max_steps=ten",))
    assert "expects int, got 'ten'" in str(err)
