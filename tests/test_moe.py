"""MoE training: router metrics, freezing, bias balancing, ZeRO-3 leaf modules, LoRA targets."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain import artifacts, lora_targets, moe
from posttrain.errors import PosttrainError
from posttrain.recipe import LoraSpec, MoESpec


@pytest.fixture
def moe_model(tiny_moe):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_moe)


def tiny_mixtral():
    """A Mixtral-style model (softmax router, aux loss, no correction bias), built in memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "mixtral",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        vocab_size=64,
    )
    return AutoModelForCausalLM.from_config(config)


# --------------------------------------------------------------------------- metrics on literal counts


def test_load_metrics_balanced_and_skewed_layers():
    stats = torch.tensor(
        [
            [10.0, 10.0, 10.0, 10.0, 4.0, 20.0],  # balanced: 4 experts, entropy sum 4, 20 tokens
            [40.0, 0.0, 0.0, 0.0, 2.0, 20.0],  # everything on expert 0
        ],
        dtype=torch.float64,
    )
    m = moe.load_metrics(stats, ["layer_1", "layer_2"])
    assert m["moe/layer_1/load_cv"] == 0 and m["moe/layer_1/dead_experts"] == 0
    assert m["moe/layer_1/router_entropy"] == pytest.approx(0.2)
    assert m["moe/layer_2/load_cv"] == pytest.approx(3**0.5, abs=1e-3)  # std 17.32 / mean 10
    assert m["moe/layer_2/dead_experts"] == 3 and m["moe/layer_2/max_load"] == 4.0
    assert m["moe/dead_experts"] == 3
    assert m["moe/load_cv"] == pytest.approx(3**0.5 / 2, abs=1e-3)


def test_router_outputs_of_each_family_are_read():
    logits = torch.randn(5, 8)
    indices = torch.randint(0, 8, (5, 2))
    deepseek = (logits, torch.rand(5, 2), indices)  # transformers 5: logits, weights, indices
    remote = (indices, torch.rand(5, 2))  # DeepSeek remote code: indices, weights
    got, got_logits = moe._indices_and_logits(deepseek, 8, 2)
    assert torch.equal(got, indices) and torch.equal(got_logits, logits)
    assert moe._indices_and_logits(remote, 8, 2)[1] is None
    got, _ = moe._indices_and_logits(logits, 8, 2)  # a plain Linear gate returns logits only
    assert torch.equal(got, logits.topk(2).indices)


def test_bias_moves_against_load():
    model = tiny_mixtral()  # any blocks will do; give them a correction bias
    blocks = moe.moe_blocks(model)
    for block in blocks.values():
        block.gate.register_buffer("e_score_correction_bias", torch.zeros(4))
    counts = torch.tensor([[30.0, 10.0, 0.0, 0.0], [10.0, 10.0, 10.0, 10.0]])
    moe.update_expert_bias(blocks, counts, 0.1)
    first, second = (b.gate.e_score_correction_bias.tolist() for b in blocks.values())
    assert first == pytest.approx([-0.1, 0.0, 0.1, 0.1]) and second == [0.0, 0.0, 0.0, 0.0]


# --------------------------------------------------------------------------- hooks on a real model


def test_router_load_counts_real_tokens_only(moe_model):
    n_experts, top_k = moe.expert_count(moe_model)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0  # 2 padding tokens
    batch = {"input_ids": torch.randint(5, 40, (2, 6)), "attention_mask": mask}
    with moe.RouterLoad(moe_model) as load:
        moe_model(**batch)
        stats = load.take()
        with torch.no_grad():  # generation / reference passes are not training traffic
            moe_model(**batch)
        assert load.take().sum() == 0
    assert list(moe.moe_blocks(moe_model)) == ["layer_1", "layer_2", "layer_3"]
    assert stats.shape == (3, n_experts + 2)
    assert (stats[:, -1] == 10).all()  # 12 tokens, 2 of them padding
    assert (stats[:, :-2].sum(1) == 10 * top_k).all()
    entropy = stats[:, -2] / stats[:, -1]
    assert ((entropy > 0.5) & (entropy <= 1)).all()


def test_gradient_checkpointing_recompute_is_not_counted_twice(moe_model):
    """The backward pass re-runs each checkpointed layer; its tokens were counted in the forward."""
    batch = torch.randint(5, 40, (2, 6))
    moe_model.train()
    counts = []
    for checkpointing in (False, True):
        if checkpointing:
            moe_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        with moe.RouterLoad(moe_model) as load:
            moe_model(input_ids=batch, labels=batch).loss.backward()
            counts.append(load.take())
    assert torch.equal(counts[0], counts[1]) and (counts[1][:, -1] == 12).all()


def test_prepare_freezes_routers_and_keeps_them_under_lora(moe_model):
    setup = moe.prepare(moe_model, MoESpec(router="freeze"))
    routers = [n for n, p in moe_model.named_parameters() if ".mlp.gate." in n]
    assert routers and not any(p.requires_grad for n, p in moe_model.named_parameters() if n in routers)
    assert all(p.requires_grad for n, p in moe_model.named_parameters() if n not in routers)
    assert isinstance(setup.callbacks[0], moe.RouterMetrics)
    trained = moe.prepare(moe_model, MoESpec(router="train"), lora=LoraSpec())
    assert trained.modules_to_save == [f"model.layers.{i}.mlp.gate" for i in (1, 2, 3)]
    assert moe.prepare(moe_model, MoESpec(), lora=LoraSpec()).modules_to_save == []  # LoRA: frozen


def test_prepare_rejects_what_the_architecture_lacks(moe_model, tiny_dense):
    from transformers import AutoModelForCausalLM

    with pytest.raises(PosttrainError, match="no router auxiliary loss.*bias_update_rate"):
        moe.prepare(moe_model, MoESpec(aux_loss_coef=0.01))
    with pytest.raises(PosttrainError, match="no e_score_correction_bias"):
        moe.prepare(tiny_mixtral(), MoESpec(bias_update_rate=0.001))
    assert moe.train_defaults(MoESpec(aux_loss_coef=0.02)) == {"router_aux_loss_coef": 0.02}
    dense = AutoModelForCausalLM.from_pretrained(tiny_dense)
    assert moe.prepare(dense, MoESpec()).callbacks == []  # nothing asked, nothing done
    with pytest.raises(PosttrainError, match="no routed experts"):
        moe.prepare(dense, MoESpec(router="freeze"))


def test_zero3_leaf_modules_only_under_zero3(moe_model, monkeypatch):
    from deepspeed.utils import z3_leaf_module

    assert moe.register_zero3_leaf_modules(moe_model) == []
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert moe.register_zero3_leaf_modules(moe_model) == ["DeepseekV3MoE"]
    assert all(z3_leaf_module(b) for b in moe.moe_blocks(moe_model).values())
    assert not z3_leaf_module(moe_model.model.layers[0].mlp)  # the dense layer stays hooked per module


# --------------------------------------------------------------------------- LoRA targets


@pytest.mark.parametrize(
    "targets", [["attention"], ["dense_mlp"], ["shared_experts"], ["routed_experts"], "all"]
)
def test_lora_target_counts_match_peft(tiny_moe, targets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_moe)
    expected = lora_targets.count(model, targets, r=4)
    with lora_targets.literal_targets():
        peft_model = get_peft_model(model, LoraConfig(r=4, **lora_targets.peft_targets(model, targets)))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == expected["total"]
    group = {"attention": "self_attn", "dense_mlp": "layers.0.mlp", "shared_experts": "shared_experts"}
    for name in lora_targets.expand(targets):
        assert any(group.get(name, "mlp.experts") in n for n in trainable), name


def test_lora_targets_on_a_dense_model_and_in_recipes(tiny_dense, write_recipe, cli):
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(tiny_dense)
    with pytest.raises(PosttrainError, match="match nothing"):
        lora_targets.peft_targets(dense, ["routed_experts"])
    assert lora_targets.count(dense, ["attention", "dense_mlp"], 8)["total"] > 0
    recipe = write_recipe(
        """
        name: t
        base_model: {preset: tiny-deepseek-v3}
        stages:
          - name: sft
            kind: sft
            data: {synthetic: arithmetic, n: 8}
            lora: {targets: [attention], target_modules: [q_proj]}
        """
    )
    code, _, err = cli("validate", recipe)
    assert code == 2 and "use either targets or target_modules" in err


@pytest.mark.parametrize(
    ("base", "block", "message"),
    [
        ("tiny-deepseek-v3", "{router: freeze, aux_loss_coef: 0.01}", "router is freeze"),
        ("tiny-deepseek-v3", "{aux_loss_coef: 0.01}", "deepseek_v3 has no router auxiliary loss"),
        ("tiny-dense", "{bias_update_rate: 0.001}", "no routed experts"),
    ],
)
def test_moe_block_is_checked_at_recipe_load(write_recipe, cli, base, block, message):
    recipe = write_recipe(
        f"""
        name: t
        base_model: {{preset: {base}}}
        stages: [{{name: sft, kind: sft, data: {{synthetic: arithmetic, n: 8}}, moe: {block}}}]
        """
    )
    code, _, err = cli("validate", recipe)
    assert code == 2 and message in err and "stages.sft.moe" in err, err


# --------------------------------------------------------------------------- a training run


def test_bias_balancing_lowers_load_cv_in_sft(write_recipe, cli, tmp_path):
    """Two identical SFT runs on the tiny DeepSeek-V3, with and without DeepSeek-V3's bias update."""
    train = (
        "{max_steps: 12, per_device_train_batch_size: 8, learning_rate: 3.0e-3, logging_steps: 4,"
        ' save_strategy: "no", gradient_checkpointing: false, report_to: tensorboard}'
    )
    recipe = write_recipe(
        f"""
        name: bias
        base_model: {{preset: tiny-deepseek-v3}}
        stages:
          - {{name: plain, kind: sft, data: {{synthetic: arithmetic, n: 96}}, train: {train}}}
          - name: balanced
            kind: sft
            data: {{synthetic: arithmetic, n: 96}}
            moe: {{bias_update_rate: 0.05}}
            train: {train}
        """
    )
    code, _, err = cli("run", recipe)
    assert code == 0, err
    runs = tmp_path / "runs"
    plain = json.loads((runs / "plain" / "metrics.json").read_text())
    balanced = json.loads((runs / "balanced" / "metrics.json").read_text())
    assert balanced["moe/load_cv_last"] < 0.5 * plain["moe/load_cv_last"]
    assert balanced["moe/load_cv"] < plain["moe/load_cv"]
    assert plain["train"]["loss_last"] < plain["train"]["loss_first"]
    shares = moe.expert_shares(plain)
    assert list(shares) == ["layer_1", "layer_2", "layer_3"] and sum(shares["layer_1"]) == pytest.approx(
        1, abs=1e-3
    )
    assert (runs / "plain" / artifacts.MOE_HEATMAP).stat().st_size > 1000
    report = (runs / "report.md").read_text()
    assert "## Mixture of experts" in report and f"(balanced/{artifacts.MOE_HEATMAP})" in report
    events = b"".join(p.read_bytes() for p in (runs / "plain" / "logs").glob("events.out.tfevents.*"))
    assert b"moe/load_cv" in events and b"moe/layer_1/router_entropy" in events
    from safetensors.torch import load_file

    weights = load_file(runs / "balanced" / "model" / "model.safetensors")
    bias = weights["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert bias.abs().max() > 0.01  # the balancing moved it and it was saved with the model
