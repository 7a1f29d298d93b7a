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
    lora = memory.Workload(model=SHAPE, trainable=10**7, lora=True, frozen=(10**9,))
    numbers = memory.estimate(lora, SHARDING["ddp"], 8)
    assert numbers["weights"] == 2 * 10**9 + 4 * 10**7  # frozen base in bf16 + fp32 adapters
    assert numbers["gradients"] == 4 * 10**7 and numbers["optimizer"] == 8 * 10**7
    assert numbers["frozen_models"] == 2 * 10**9
    assert memory.estimate(lora, SHARDING["zero3"], 8)["frozen_models"] == 250_000_000
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
    assert grpo["params"]["frozen_models"] == [full["params"]["total"]]  # the reference model
    assert grpo["estimates"]["zero3"]["frozen_models"] == full["estimates"]["zero3"]["weights"]
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
