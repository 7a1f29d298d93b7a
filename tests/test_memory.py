"""The memory planner: ZeRO arithmetic on literal shapes, and `posttrain plan` on real configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain import memory
from posttrain.architecture import ModelShape
from posttrain.errors import PosttrainError

GIB = memory.GIB
SHAPE = ModelShape(
    name="m",
    total=10**9,
    active=10**9,
    routers=0,
    largest_layer=10**7,
    largest_moe_block=0,
    layers=10,
    hidden=1000,
    vocab=1000,
    mlp_width=4000,
    n_experts=0,
    top_k=0,
)
SHARDING = {s.name: s for s in memory.SHARDINGS}


def test_parse_size():
    assert memory.parse_size("80GB") == memory.parse_size("80 GiB") == 80 * GIB
    assert memory.parse_size("81920MB") == 80 * GIB
    with pytest.raises(PosttrainError, match="80GB"):
        memory.parse_size("lots")


def test_zero_stages_shard_what_the_paper_says():
    work = memory.Workload(model=SHAPE, trainable=10**9, lora=False)
    ddp, zero2, zero3, offload = (memory.estimate(work, SHARDING[n], 8) for n in SHARDING)
    assert (ddp["weights"], ddp["gradients"], ddp["optimizer"]) == (2 * 10**9, 2 * 10**9, 12 * 10**9)
    assert (zero2["weights"], zero2["gradients"], zero2["optimizer"]) == (
        2 * 10**9,
        250_000_000,
        1_500_000_000,
    )
    assert zero3["weights"] == 250_000_000 and zero3["zero3_gathered"] > 0 == ddp["zero3_gathered"]
    assert zero2["comm_buffers"] == zero3["comm_buffers"] == memory.REDUCE_BUCKET * 2
    assert ddp["comm_buffers"] == ddp["gradients"]  # the DDP reducer's copy
    assert offload["optimizer"] == offload["weights"] == 0
    assert offload["cpu_offload"] == 250_000_000 + 1_500_000_000
    assert ddp["activations"] == zero3["activations"] > 0
    assert ddp["total"] == sum(v for k, v in ddp.items() if k not in ("total", "cpu_offload"))


def test_lora_frozen_models_and_precision():
    held = (memory.Frozen("reference model", 10**9), memory.Frozen("reward model", 10**9, sharded=False))
    lora = memory.Workload(model=SHAPE, trainable=10**7, lora=True, frozen=held)
    numbers = memory.estimate(lora, SHARDING["ddp"], 8)
    assert numbers["weights"] == 2 * 10**9 + 4 * 10**7  # frozen base in bf16 + fp32 adapters
    assert numbers["gradients"] == 4 * 10**7 and numbers["optimizer"] == 8 * 10**7
    assert numbers["reference model"] == numbers["reward model"] == 2 * 10**9
    zero3 = memory.estimate(lora, SHARDING["zero3"], 8)
    assert zero3["reference model"] == 250_000_000  # prepared by DeepSpeed: sharded
    assert zero3["reward model"] == 2 * 10**9  # loaded by posttrain on each GPU: whole
    offload = memory.estimate(lora, SHARDING["zero3_offload"], 8)
    assert offload["reference model"] == 0 and offload["reward model"] == 2 * 10**9
    fp32 = memory.Workload(model=SHAPE, trainable=10**9, lora=False, bf16=False)
    assert memory.estimate(fp32, SHARDING["ddp"], 1)["weights"] == 4 * 10**9
    checkpointed = memory.activations(memory.Workload(model=SHAPE, trainable=0, lora=True))
    full = memory.activations(
        memory.Workload(model=SHAPE, trainable=0, lora=True, gradient_checkpointing=False)
    )
    assert checkpointed < full


def test_suggestions_when_nothing_fits():
    work = memory.Workload(model=SHAPE, trainable=10**9, lora=False)
    tight = memory.Cluster(gpus_per_node=1, nodes=1, gpu_memory=4 * GIB)
    plan = memory.plan_stage(work, tight)
    assert plan["fits_with"] == []
    assert any("nodes × 1 GPUs" in s for s in plan["suggestions"])
    roomy = memory.Cluster(gpus_per_node=8, nodes=1, gpu_memory=80 * GIB)
    assert memory.plan_stage(work, roomy)["fits_with"][0] == "ddp"


@pytest.fixture(scope="module")
def deepseek_v3(tmp_path_factory) -> Path:
    """DeepSeek-V3's published architecture as a local config.json (no weights)."""
    from transformers import AutoConfig

    path = tmp_path_factory.mktemp("dsv3")
    AutoConfig.for_model("deepseek_v3").save_pretrained(path)
    return path


def test_plan_json_for_deepseek_v3(deepseek_v3, write_recipe, cli):
    recipe = write_recipe(
        f"""
        name: big
        base_model: {{path: {deepseek_v3}}}
        stages:
          - name: sft
            kind: sft
            data: {{synthetic: arithmetic, n: 8}}
            train: {{per_device_train_batch_size: 1, max_length: 4096}}
          - name: lora
            kind: sft
            model: sft
            data: {{synthetic: arithmetic, n: 8}}
            lora: {{r: 16, targets: [attention, shared_experts]}}
            train: {{per_device_train_batch_size: 1, max_length: 4096}}
          - name: grpo
            kind: grpo
            model: sft
            data: {{synthetic: arithmetic, n: 8}}
            rewards: [{{name: accuracy}}]
            train: {{beta: 0.04, per_device_train_batch_size: 8, max_completion_length: 1024}}
        """
    )
    code, out, err = cli(
        "plan", recipe, "--gpus-per-node", "8", "--nodes", "2", "--gpu-memory", "80GB", "--json"
    )
    assert code == 0, err
    plan = json.loads(out)["memory"]
    full, lora, grpo = plan["stages"]
    assert [(f["label"], f["params"]) for f in grpo["params"]["frozen"]] == [
        ("reference model", full["params"]["total"])
    ]
    assert grpo["estimates"]["zero3"]["reference model"] == full["estimates"]["zero3"]["weights"]
    assert full["params"]["total"] == pytest.approx(671e9, rel=0.01)
    assert full["params"]["active"] == pytest.approx(37.5e9, rel=0.03)
    assert full["fits_with"] == [] and any("nodes" in s for s in full["suggestions"])
    assert any("LoRA" in s for s in full["suggestions"])
    assert lora["params"]["lora"] and lora["params"]["trainable"] < 2e8
    assert lora["fits_with"] == ["zero3_offload"]
    zero3 = full["estimates"]["zero3"]
    assert zero3["weights"] == pytest.approx(671e9 * 2 / 16, rel=0.01)
    assert zero3["zero3_gathered"] > 20 * GIB  # a whole 256-expert MoE block, gathered as one leaf
    assert plan["recommended"] is None
    code, _, err = cli("plan", recipe, "--nodes", "64", "--gpu-memory", "80GB")
    assert code == 0 and "recommended:" in err and "zero3.yaml" in err


def test_shipped_accelerate_configs_match_the_planner():
    from accelerate.commands.config.config_args import load_config_from_file

    for sharding in memory.SHARDINGS:
        config = load_config_from_file(str(memory.accelerate_config(sharding.name)))
        ds = config.deepspeed_config or {}
        assert int(ds.get("zero_stage", 0)) == sharding.zero_stage
        assert (ds.get("offload_optimizer_device", "none") != "none") == sharding.offload_optimizer
        if sharding.zero_stage == 3:
            assert ds["zero3_save_16bit_model"] is True
    for extra in ("single", "multinode_zero3"):
        assert load_config_from_file(str(memory.accelerate_config(extra))).num_processes >= 1


def test_slurm_template_launches_what_the_plan_recommends(write_recipe, tmp_path):
    """The sbatch script with stub Slurm/GPU/accelerate commands: it must pick the recommended config."""
    recipe = write_recipe(
        """
        name: tiny
        base_model: {preset: tiny-deepseek-v3}
        stages: [{name: sft, kind: sft, data: {synthetic: arithmetic, n: 8}}]
        """
    )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {
        "scontrol": "echo node0; echo node1",
        "srun": 'shift; SLURM_NODEID=0 "$@"',  # drop --kill-on-bad-exit=1, run the node command once
        "accelerate": f'echo "$@" > {tmp_path}/launched',
        "nvidia-smi": "echo 81559",
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    script = Path(memory.accelerate_config("zero3")).parent.parent / "slurm" / "posttrain.sbatch"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "SLURM_NNODES": "2",
        "SLURM_GPUS_ON_NODE": "8",
        "SLURM_JOB_NODELIST": "node[0-1]",
        "SLURM_JOB_ID": "7",
    }
    done = subprocess.run(
        ["bash", str(script), str(recipe), "--set", "seed=1"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    launched = (tmp_path / "launched").read_text().split()
    assert launched[launched.index("--config_file") + 1].endswith("accelerate/ddp.yaml")
    assert launched[launched.index("--num_processes") + 1] == "16"
    assert launched[launched.index("--main_process_ip") + 1] == "node0"
    assert launched[-5:] == ["posttrain", "run", str(recipe), "--set", "seed=1"]


@pytest.fixture(scope="module")
def dense_1b(tmp_path_factory) -> Path:
    """A 1.3B-parameter Llama-style config.json (no weights): big enough for the rows to differ."""
    from transformers import AutoConfig

    path = tmp_path_factory.mktemp("dense1b")
    AutoConfig.for_model(
        "llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
        num_attention_heads=16, num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096,
    ).save_pretrained(path)  # fmt: skip
    return path


def _plan(cli, recipe, *args: str, gpu_memory: str = "80GB") -> dict:
    code, out, err = cli(
        "plan", recipe, "--gpus-per-node", "8", "--gpu-memory", gpu_memory, "--json", "--no-preflight", *args
    )
    assert code == 0, err
    return {row["name"]: row for row in json.loads(out)["memory"]["stages"]}


def test_distill_plan_has_a_row_per_student_and_the_teacher(dense_1b, write_recipe, cli):
    recipe = write_recipe(
        f"""
        name: distill
        base_model: {{path: {dense_1b}}}
        stages:
          - name: distill
            kind: distill
            teacher: {{path: {dense_1b}}}
            data: {{synthetic: arithmetic, n: 8}}
            generation: {{backend: transformers, max_new_tokens: 1024, batch_size: 4}}
            students:
              - {{name: small, dense_from: {{path: {dense_1b}}}, num_hidden_layers: 4}}
              - {{name: big, dense_from: {{path: {dense_1b}}}, num_hidden_layers: 16}}
            train: {{per_device_train_batch_size: 2, max_length: 2048}}
        """
    )
    distill = _plan(cli, recipe)["distill"]
    phases = {p["name"]: p for p in distill["phases"]}
    assert list(phases) == ["teacher sampling", "student 'small' (sft)", "student 'big' (sft)"]
    small, big = phases["student 'small' (sft)"], phases["student 'big' (sft)"]
    assert (
        small["params"]["trainable"]
        < big["params"]["trainable"]
        < phases["teacher sampling"]["params"]["total"]
    )
    assert phases["teacher sampling"]["params"]["trainable"] == 0 and not big["params"]["frozen"]
    for sharding in ("ddp", "zero3"):  # students train one after another: the peak, not the sum
        totals = {name: p["estimates"][sharding]["total"] for name, p in phases.items()}
        stage = distill["estimates"][sharding]
        assert stage["total"] == max(totals.values()) < sum(totals.values())
        assert stage["peak"] == max(totals, key=totals.get)
    assert distill["estimates"]["ddp"]["peak"] == "student 'big' (sft)"  # full training beats sampling
    sampling = phases["teacher sampling"]["estimates"]
    assert sampling["ddp"] == sampling["zero3"] and sampling["ddp"]["kv_cache"] > 0  # outside DeepSpeed

    on_policy = (
        "stages.distill.train={per_device_train_batch_size: 2, max_completion_length: 1536}"  # 2048 tokens
    )
    logits = _plan(cli, recipe, "--set", "stages.distill.mode=logits", "--set", on_policy)["distill"]
    assert [p["name"] for p in logits["phases"]] == ["student 'small' (logits)", "student 'big' (logits)"]
    held = logits["phases"][1]
    assert [f["label"] for f in held["params"]["frozen"]] == ["teacher"]  # held during training
    teacher = phases["teacher sampling"]["params"]["total"]
    assert held["estimates"]["ddp"]["teacher"] == teacher * 2
    assert held["estimates"]["zero3"]["teacher"] == teacher * 2 // 8  # prepared by DeepSpeed: sharded
    assert held["estimates"]["ddp"]["total"] == big["estimates"]["ddp"]["total"] + teacher * 2

    served = _plan(
        cli, recipe, "--set", "stages.distill.generation.backend=vllm",
        "--set", "stages.distill.generation.vllm={gpu_memory_utilization: 0.5, tensor_parallel_size: 2}",
    )["distill"]  # fmt: skip
    share = served["phases"][0]["estimates"]["ddp"]
    assert share[memory.VLLM_ROW] == 40 * GIB and "weights" not in share


def test_vllm_colocate_share_counts_against_training_memory(dense_1b, write_recipe, cli):
    from trl import GRPOConfig

    recipe = write_recipe(
        f"""
        name: zero
        base_model: {{path: {dense_1b}}}
        stages:
          - name: grpo
            kind: grpo
            data: {{synthetic: arithmetic, n: 8}}
            rewards: [{{name: accuracy}}]
            train: {{per_device_train_batch_size: 8, num_generations: 8, max_completion_length: 1024,
                    use_vllm: true, vllm_mode: colocate}}
        """
    )
    default = _plan(cli, recipe, gpu_memory="40GB")["grpo"]
    trl_default = GRPOConfig.__dataclass_fields__["vllm_gpu_memory_utilization"].default
    assert default["params"]["vllm"]["gpu_memory_utilization"] == trl_default
    assert default["estimates"]["zero2"][memory.VLLM_ROW] == int(trl_default * 40 * GIB)
    assert "zero2" in default["fits_with"]
    greedy = _plan(
        cli, recipe, "--set", "stages.grpo.train.vllm_gpu_memory_utilization=0.9", gpu_memory="40GB"
    )
    assert greedy["grpo"]["fits_with"] == []  # the share flips the fit
    assert any("vllm_gpu_memory_utilization at most" in s for s in greedy["grpo"]["suggestions"])
    server = _plan(cli, recipe, "--set", "stages.grpo.train.vllm_mode=server", gpu_memory="40GB")["grpo"]
    assert server["estimates"]["zero2"][memory.VLLM_ROW] == 0
    assert "server" in server["params"]["vllm"]["note"]
    without = _plan(cli, recipe, "--set", "stages.grpo.train.use_vllm=false", gpu_memory="40GB")["grpo"]
    assert without["estimates"]["zero2"][memory.VLLM_ROW] == 0 and not without["params"]["vllm"]["note"]
    code, _, err = cli("plan", recipe, "--gpu-memory", "40GB", "--no-preflight",
                       "--set", "stages.grpo.train.vllm_gpu_memory_utilization=0.9")  # fmt: skip
    assert code == 0 and "· vllm share" in err and "0.9 × GPU memory" in err


def test_grpo_plan_rows_for_reward_model_judge_and_reference(dense_1b, write_recipe, cli):
    recipe = write_recipe(
        f"""
        name: rl
        base_model: {{path: {dense_1b}}}
        stages:
          - name: rm
            kind: reward_model
            data: {{synthetic: arithmetic, n: 8}}
          - name: grpo
            kind: grpo
            data: {{synthetic: arithmetic, n: 8}}
            rewards:
              - {{name: accuracy}}
              - {{name: reward_model, model: rm, weight: 0.5}}
              - {{name: judge, model: {{path: {dense_1b}}}, judge: {{backend: likelihood}}, weight: 0.1}}
              - {{name: judge, label: served, model: org/big-judge, weight: 0.1,
                  judge: {{backend: openai, base_url: "http://localhost:8000/v1", api_key_env: null}}}}
            train: {{beta: 0.04, num_generations: 4, per_device_train_batch_size: 4, max_completion_length: 256}}
        """
    )
    plan = _plan(cli, recipe)
    grpo, rm = plan["grpo"], plan["rm"]
    frozen = {f["label"]: f for f in grpo["params"]["frozen"]}
    policy = grpo["params"]["total"]
    assert list(frozen) == [
        "reference model",
        "reward model 'rm'",
        f"judge '{dense_1b}'",
        "judge 'org/big-judge'",
    ]
    assert frozen["reference model"]["params"] == policy
    assert frozen["reward model 'rm'"]["params"] == rm["params"]["total"] - 32000 * 2048  # no LM head
    assert frozen[f"judge '{dense_1b}'"]["params"] == policy
    assert (
        frozen["judge 'org/big-judge'"]["params"] == 0 and "served" in frozen["judge 'org/big-judge'"]["note"]
    )
    zero3 = grpo["estimates"]["zero3"]
    assert zero3["reference model"] == policy * 2 // 8  # trl prepares it with DeepSpeed
    assert zero3["reward model 'rm'"] == frozen["reward model 'rm'"]["params"] * 2  # whole on each GPU
    lora = _plan(cli, recipe, "--set", "stages.grpo.lora={r: 8}")["grpo"]
    assert "reference model" not in [f["label"] for f in lora["params"]["frozen"]]  # peft: adapter off
