"""Every shipped recipe plans cleanly offline (`HF_HUB_OFFLINE=1 posttrain plan`), saying which
checks it skipped for want of the hub, and the real-scale ones fit their models' context."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SHIPPED = sorted(p.name for p in RECIPES.glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_plans_offline(cli, name: str, tmp_path: Path) -> None:
    code, out, err = cli("plan", RECIPES / name, "--set", f"output_dir={tmp_path / 'runs'}")
    shown = out + err
    problems = [line for line in shown.splitlines() if line.startswith("✗")]
    # trl's vLLM generation (r1-zero) needs a GPU: on a machine without one, that is the only problem
    assert all(".use_vllm: trl's vLLM generation needs a CUDA GPU" in line for line in problems), shown
    assert (code, "preflight: ok" in shown) == ((2, False) if problems else (0, True)), shown
    if not name.startswith("demo"):  # real-scale recipes read hub datasets: preflight says what it skipped
        assert "columns, lengths and rewards not checked: cannot load hub dataset" in shown, shown


def test_r1_zero_fits_its_models_4096_positions(cli, tmp_path: Path) -> None:
    """Qwen2.5-Math-7B's config (max_position_embeddings 4096, from its model card), standing in
    for the hub model: the GRPO completions and the evaluation leave room for the prompt."""
    model = tmp_path / "qwen2.5-math-7b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "max_position_embeddings": 4096,
        "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
    }))  # fmt: skip
    code, out, err = cli("validate", RECIPES / "r1-zero.yaml", "--set", f"base_model.path={model}")
    assert code == 0, out + err
    recipe = yaml.safe_load((RECIPES / "r1-zero.yaml").read_text())
    train = recipe["stages"][0]["train"]
    assert train["max_completion_length"] + 1024 <= 4096 and recipe["eval"]["max_new_tokens"] + 1024 <= 4096
    overlong = next(r for r in recipe["stages"][0]["rewards"] if r["name"] == "overlong")
    assert overlong["max_len"] == train["max_completion_length"]
