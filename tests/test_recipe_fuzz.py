"""Property-based: whatever a recipe file holds, loading it gives a Recipe or one clean error line."""

from __future__ import annotations

from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from posttrain.errors import PosttrainError
from posttrain.recipe import STAGE_KINDS, Recipe, load_recipe
from posttrain.runner import order_stages

# Examples per test come from the hypothesis profile (tests/conftest.py): 150 by default,
# `pytest --hypothesis-profile=deep tests/test_recipe_fuzz.py` for 3000.
SETTINGS = settings(deadline=None, suppress_health_check=list(HealthCheck))

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["sft", "grpo", "accuracy", "tiny-deepseek-v3", "a/b", "x.jsonl", "1e-3", "-1", ""]),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


def keys_of(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


@st.composite
def stages(draw: st.DrawFn) -> dict:
    kind = draw(st.sampled_from([*STAGE_KINDS, "sfft", None]))
    fields = keys_of(STAGE_KINDS[kind]) if kind in STAGE_KINDS else ["name", "data"]
    chosen = draw(st.lists(st.sampled_from(fields), max_size=5, unique=True))
    stage: dict = {key: draw(values) for key in chosen}
    stage["name"] = draw(st.sampled_from(["sft", "grpo", "rm", "x", "bad name", 3]))
    if kind is not None:
        stage["kind"] = kind
    if draw(st.booleans()):
        stage["data"] = draw(
            st.sampled_from(
                [{"synthetic": "arithmetic", "n": 4}, "sft", {"path": "missing.jsonl"}, {"synthetic": "x"}]
            )
        )
    return stage


@st.composite
def recipes(draw: st.DrawFn) -> dict:
    recipe: dict = {
        "name": draw(st.sampled_from(["r", "", 1])),
        "base_model": draw(
            st.sampled_from([{"preset": "tiny-deepseek-v3"}, {"path": "org/m"}, {"preset": 1}, "x", None])
        ),
        "stages": draw(st.lists(stages(), max_size=3)),
    }
    for key in draw(
        st.lists(st.sampled_from([*keys_of(Recipe), "stagse", "evals"]), max_size=3, unique=True)
    ):
        recipe[key] = draw(values)
    return recipe


def loads_cleanly(path: Path) -> None:
    try:
        order_stages(load_recipe(path))
    except PosttrainError as e:
        assert str(e) and "\n" not in str(e), repr(str(e))


@SETTINGS
@given(recipe=recipes())
def test_structured_recipes_load_or_fail_cleanly(tmp_path_factory, recipe):
    path = tmp_path_factory.mktemp("fuzz") / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    loads_cleanly(path)


@SETTINGS
@given(text=st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_arbitrary_text_loads_or_fails_cleanly(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "recipe.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    loads_cleanly(path)


@SETTINGS
@given(assignment=st.text(max_size=40))
def test_any_set_override_loads_or_fails_cleanly(tmp_path_factory, assignment):
    path = tmp_path_factory.mktemp("fuzz") / "recipe.yaml"
    path.write_text(
        "name: r\nbase_model: {preset: tiny-deepseek-v3}\nstages: [{name: s, kind: sft, data: {synthetic: arithmetic}}]\n"
    )
    try:
        load_recipe(path, [assignment])
    except PosttrainError as e:
        assert "\n" not in str(e)
