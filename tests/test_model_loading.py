"""Loading options in the model slot (dtype, attention, config overrides, quantisation), honoured
wherever the model loads and recorded; long context by YaRN; MoE controls that do what they say."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain import artifacts, loading, models
from posttrain.preflight import preflight
from posttrain.recipe import PathModel
from posttrain.runner import run

YARN = (
    "{max_position_embeddings: 1024, rope_parameters: "
    "{rope_type: yarn, factor: 2.0, original_max_position_embeddings: 512}}"
)
ORIGINAL_POSITIONS = 512  # tiny-dense's max_position_embeddings


def long_rows(folder: Path, n: int = 8) -> Path:
    """`text` rows of about 900 characters (the preset tokenizer is one token per character):
    longer than tiny-dense's 512 positions, shorter than the YaRN-scaled 1024."""
    rows = [{"text": " ".join(f"{i + k}+{i}={2 * i + k}" for i in range(90))[:900]} for k in range(n)]
    path = folder / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


LONG_RECIPE = """\
name: long
output_dir: {out}
base_model: {{preset: tiny-dense, attn_implementation: eager, config: {config}}}
stages:
  - name: sft
    kind: sft
    data: {{path: {data}}}
    train: {{max_steps: 4, per_device_train_batch_size: 2, learning_rate: 3.0e-3, logging_steps: 1,
             max_length: 1024, save_strategy: 'no'}}
"""


@pytest.fixture(scope="module")
def long_context(tmp_path_factory):
    """A YaRN-scaled tiny-dense (1024 positions from 512), SFT on rows longer than 512 tokens."""
    tmp = tmp_path_factory.mktemp("yarn")
    path = tmp / "recipe.yaml"
    path.write_text(LONG_RECIPE.format(out=tmp / "runs", config=YARN, data=long_rows(tmp)))
    recipe = loading.load(path)
    return recipe, preflight(recipe), run(recipe)


def test_yarn_sft_trains_on_rows_longer_than_the_original_positions(long_context) -> None:
    recipe, _, _ = long_context
    rows = Path(recipe.stages[0].data.path).read_text().splitlines()
    lengths = [len(json.loads(line)["text"]) for line in rows]
    assert min(lengths) > ORIGINAL_POSITIONS
    metrics = artifacts.read_json(recipe.run_dir / "sft" / artifacts.METRICS)
    assert metrics["train"]["loss_last"] < metrics["train"]["loss_first"]
    saved = artifacts.read_json(recipe.run_dir / "sft" / artifacts.MODEL / artifacts.MODEL_CONFIG)
    assert saved["max_position_embeddings"] == 1024
    rope = saved["rope_parameters"]  # merged over the preset's own: rope_theta is kept
    assert rope["rope_type"] == "yarn" and rope["factor"] == 2.0 and rope["rope_theta"] == 10000.0


def test_preflight_length_checks_use_the_overridden_context(long_context, tmp_path) -> None:
    _, findings, _ = long_context
    assert not [f for f in findings if f.problem], [f.line() for f in findings]
    plain = tmp_path / "plain.yaml"
    plain.write_text(LONG_RECIPE.format(out=tmp_path / "runs", config="{}", data=long_rows(tmp_path)))
    lines = [f.line() for f in preflight(loading.load(plain)) if f.problem]
    assert any(f"max_position_embeddings {ORIGINAL_POSITIONS}" in line for line in lines), lines


def test_loading_options_are_recorded_in_manifest_and_saved_config(long_context) -> None:
    recipe, _, _ = long_context
    manifest = artifacts.read_json(recipe.run_dir / "sft" / artifacts.MANIFEST)
    assert manifest["model_loading"]["attn_implementation"] == "eager"
    assert manifest["model_loading"]["config"]["rope_parameters"]["rope_type"] == "yarn"
    saved = artifacts.read_json(recipe.run_dir / "sft" / artifacts.MODEL / artifacts.MODEL_CONFIG)
    assert saved[models.LOADING_RECORD]["attn_implementation"] == "eager"


def test_a_model_saved_by_a_stage_loads_with_the_attention_it_trained_with(long_context) -> None:
    """Evaluation, a judge or the next stage load `<stage>/model/` by path: the dtype and attention
    recorded in its config apply unless their own slot says otherwise."""
    recipe, _, _ = long_context
    folder = str(recipe.run_dir / "sft" / artifacts.MODEL)
    assert models.load_causal_lm(PathModel(path=folder)).config._attn_implementation == "eager"
    own = PathModel(path=folder, attn_implementation="sdpa")
    assert models.load_causal_lm(own).config._attn_implementation == "sdpa"


def test_grpo_reference_model_loads_like_the_policy(write_recipe, cli, tmp_path, monkeypatch) -> None:
    """trl builds GRPO's reference model itself, from the policy's path: it gets the slot's config
    overrides and attention through `model_init_kwargs`, or its positions would differ."""
    import trl.trainer.grpo_trainer as grpo_trainer

    loaded = []
    original = grpo_trainer.create_model_from_path

    def recording(model_id, **kwargs):
        loaded.append(original(model_id, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(grpo_trainer, "create_model_from_path", recording)
    recipe = write_recipe(f"""
        name: ref
        base_model: {{preset: tiny-dense, attn_implementation: eager, config: {YARN}}}
        stages:
          - name: grpo
            kind: grpo
            data: {{synthetic: arithmetic, n: 8, seed: 1}}
            rewards: [{{name: accuracy}}]
            train: {{num_generations: 4, per_device_train_batch_size: 4, max_completion_length: 8,
                     max_steps: 1, beta: 0.04, save_strategy: 'no'}}
        """)
    code, _, err = cli("run", recipe)
    assert code == 0, err
    (reference,) = loaded
    assert reference.config.rope_parameters["rope_type"] == "yarn"
    assert reference.config.max_position_embeddings == 1024
    assert reference.config._attn_implementation == "eager"


@pytest.mark.parametrize(
    ("slot", "train", "message"),
    [
        ("{preset: tiny-dense, config: {max_position_embedding: 4096}}", "{}",
         "qwen2 configs have no 'max_position_embedding' (did you mean 'max_position_embeddings'?)"),
        ("{preset: tiny-dense}", "{model_init_kwargs: {load_in_4bit: true}}",
         "posttrain loads the models itself"),
        ("{preset: tiny-dense, quantization: {bits: 4}}", "{}", "would fully fine-tune a quantised model"),
        ("{preset: tiny-deepseek-v3}", "{router_aux_loss_coef: 0.01}", "deepseek_v3 configs have no router_aux_loss_coef"),
    ],
)  # fmt: skip
def test_loading_options_that_would_fail_or_do_nothing_exit_2(
    write_recipe, cli, slot, train, message
) -> None:
    recipe = write_recipe(f"""
        name: bad
        base_model: {slot}
        stages:
          - {{name: sft, kind: sft, data: {{synthetic: arithmetic, n: 8}}, train: {train}}}
        """)
    code, _, err = cli("validate", recipe)
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_train_key_the_model_config_lacks_is_named_on_deepseek_v2(write_recipe, cli, tmp_path) -> None:
    from transformers import AutoConfig

    for family in ("deepseek_v2", "mixtral"):
        AutoConfig.for_model(family, num_hidden_layers=1).save_pretrained(tmp_path / family)
    text = """
        name: aux
        base_model: {{path: {path}}}
        stages:
          - {{name: sft, kind: sft, data: {{synthetic: arithmetic, n: 8}}, train: {{router_aux_loss_coef: 0.01}}}}
        """
    code, _, err = cli("validate", write_recipe(text.format(path=tmp_path / "deepseek_v2")))
    assert code == 2 and "train.router_aux_loss_coef" in err and "deepseek_v2 configs" in err, err
    code, _, err = cli("validate", write_recipe(text.format(path=tmp_path / "mixtral"), name="ok.yaml"))
    assert code == 0, err  # Mixtral has a router auxiliary loss: the key does something


def test_missing_bitsandbytes_is_one_line(write_recipe, cli, monkeypatch) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a)
    )
    recipe = write_recipe("""
        name: q
        base_model: {preset: tiny-dense, quantization: {bits: 4}}
        stages:
          - {name: sft, kind: sft, data: {synthetic: arithmetic, n: 8}, lora: {r: 4}}
        """)
    code, _, err = cli("validate", recipe)
    assert code == 2 and "base_model.quantization" in err and "pip install bitsandbytes" in err, err


def test_default_lora_leaves_frozen_routers_alone(tiny_moe) -> None:
    """`lora: {}` (peft's all-linear) on the DeepSeek-V3 preset: attention, dense MLP, shared and
    routed experts get LoRA, the routers none (they stay frozen, as the stage says)."""
    from peft import get_peft_model

    from posttrain import moe
    from posttrain.lora_targets import literal_targets, named_targets
    from posttrain.recipe import LoraSpec, MoESpec
    from posttrain.training import lora_config

    model = models.load_causal_lm(PathModel(path=str(tiny_moe)), trainable=True)
    spec = LoraSpec(r=4)
    experts = moe.prepare(model, MoESpec(), lora=spec)
    with literal_targets(named_targets(spec, model) is not None):  # as the stages build it
        peft_model = get_peft_model(
            model, lora_config(spec, model=model, modules_to_save=experts.modules_to_save)
        )
    adapted = {n.split(".lora_A")[0] for n, _ in peft_model.named_modules() if ".lora_A" in n}
    adapted |= {n for n, _ in peft_model.named_parameters() if "lora" in n and "experts" in n}
    assert not [n for n in adapted if n.endswith((".mlp.gate", ".mlp.router"))], sorted(adapted)
    for part in (
        "self_attn.q_a_proj",
        "mlp.shared_experts.down_proj",
        "layers.0.mlp.gate_proj",
        "mlp.experts",
    ):
        assert any(part in n for n in adapted), part
    assert not [
        n for n, p in peft_model.named_parameters() if n.endswith("mlp.gate.weight") and p.requires_grad
    ]


def test_students_take_loading_options(write_recipe, cli, tiny_moe, tiny_dense) -> None:
    """A `path:` student loads with options like any model slot; a `dense_from:` student is
    derived from the teacher's config as it loads (its `config:` overrides applied)."""
    from posttrain.students import dense_config, load_config

    teacher = PathModel(path=str(tiny_moe), config={"max_position_embeddings": 2048})
    assert dense_config(load_config(teacher)).max_position_embeddings == 2048
    text = f"""
        name: students
        base_model: {{path: {tiny_moe}}}
        stages:
          - name: distill
            kind: distill
            teacher: {{path: {tiny_moe}, dtype: float32, quantization: {{bits: 4}}}}  # frozen: fine
            data: {{synthetic: arithmetic, n: 8}}
            verifiers: [{{name: accuracy}}]
            students:
              - {{name: s, path: {{path: {tiny_dense}, dtype: float32, attn_implementation: eager}}}}
        """
    code, _, err = cli("validate", write_recipe(text))
    assert code == 0, err
    quantized = text.replace("attn_implementation: eager", "quantization: {bits: 4}")
    code, _, err = cli("validate", write_recipe(quantized, name="quantized.yaml"))
    assert code == 2 and "fully fine-tuned" in err, err
    assert "stages.distill.students.s.path.quantization" in err
