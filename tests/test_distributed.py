"""Several processes on this CPU: `accelerate launch --num_processes 2` with gloo, DeepSpeed ZeRO-2/3.

Each launch costs two interpreter start-ups, so the stages are tiny and one launch covers as
much as it can: the ZeRO-3 launch trains a full fine-tune, a LoRA and a GRPO stage on top of it
(three stages in one process, each evaluated by both ranks, a share each), and a 1-process run of
the same global batch must land on the same weights.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from posttrain.memory import accelerate_config

TRAIN = {
    "max_steps": 3,
    "per_device_train_batch_size": 4,
    "learning_rate": 1.0e-3,
    "logging_steps": 1,
    "save_strategy": "no",
    "gradient_checkpointing": False,
}
FULL_STAGE = {
    "name": "full",
    "kind": "sft",
    "data": {"synthetic": "arithmetic", "n": 48},
    "moe": {"bias_update_rate": 0.01},
    "train": TRAIN,
}
BASE = {"seed": 0, "base_model": {"preset": "tiny-deepseek-v3"}}
DIGIT_REWARD = """
from posttrain.rewards.text import completion_text


def digit_share(completions, **kwargs):
    texts = [completion_text(c) for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(
    recipe: Path, *launch_args: str, pythonpath: Path | None = None
) -> tuple[list[str], dict[str, str]]:
    """`accelerate launch --num_processes 2 ... -m posttrain run recipe` on a free port, and its
    environment. launch_args come after the defaults, so they override them (argparse keeps the last)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--main_process_port",
        str(free_port()),
        *launch_args,
        "-m",
        "posttrain",
        "run",
        str(recipe),
    ]
    return command, env


def launch(
    recipe: Path, *launch_args: str, timeout: int = 420, pythonpath: Path | None = None
) -> subprocess.CompletedProcess:
    command, env = launch_command(recipe, *launch_args, pythonpath=pythonpath)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def write(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def manifest(stage_dir: Path) -> dict:
    return json.loads((stage_dir / "manifest.json").read_text())


def metrics(stage_dir: Path) -> dict:
    return json.loads((stage_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("zero3")
    lora = {
        "name": "lora",
        "kind": "sft",
        "model": "full",
        "data": {"synthetic": "arithmetic", "n": 48, "seed": 3},
        "lora": {"r": 4, "targets": ["attention", "routed_experts"]},
        "moe": {"router": "train"},
        "train": {**TRAIN, "max_steps": 2, "learning_rate": 1.0e-2},
    }
    grpo = {
        "name": "grpo",
        "kind": "grpo",
        "model": "full",
        "data": {"synthetic": "arithmetic", "n": 16, "seed": 1},
        "rewards": [{"name": "accuracy"}, {"name": "digit_reward:digit_share"}],
        "train": {
            "num_generations": 4,
            "per_device_train_batch_size": 4,
            "max_completion_length": 12,
            "max_steps": 2,
            "logging_steps": 1,
            "learning_rate": 1.0e-3,
            "beta": 0.04,  # a reference model, sharded by trl under ZeRO-3 too
            "save_strategy": "no",
        },
    }
    recipe = {
        "name": "zero3",
        "output_dir": str(root / "runs"),
        **BASE,
        "stages": [FULL_STAGE, lora, grpo],
        "eval": {"data": {"synthetic": "arithmetic", "split": "test", "n": 8}, "max_new_tokens": 16},
    }
    recipe = write(root / "recipe.yaml", recipe)
    # A reward that varies between random completions, so the tiny policy gets advantages to follow.
    (root / "digit_reward.py").write_text(DIGIT_REWARD)
    done = launch(recipe, "--use_deepspeed", "--zero_stage", "3", pythonpath=root)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return root / "runs"


def test_zero3_full_and_lora_sft(zero3_run):
    for stage in ("full", "lora"):
        info = manifest(zero3_run / stage)
        assert (info["world_size"], info["zero_stage"], info["distributed_type"]) == (2, 3, "DEEPSPEED")
        assert (zero3_run / stage / "COMPLETE").exists()
        assert "accuracy" in metrics(zero3_run / stage)["eval"]  # evaluated on rank 0 while rank 1 waited
    full, lora = metrics(zero3_run / "full"), metrics(zero3_run / "lora")
    assert full["train"]["loss_last"] < full["train"]["loss_first"]
    assert full["parameters"]["total"] == 1_014_784  # counted through ZeRO-3's partitioning
    assert {"moe/load_cv", "moe/router_entropy", "moe/dead_experts"} <= set(full)
    assert lora["parameters"]["trainable"] < full["parameters"]["total"] / 10
    # rank 0 gathered the shards into one model; LoRA merged by rank 0 alone
    before = load_file(zero3_run / "full" / "model" / "model.safetensors")
    after = load_file(zero3_run / "lora" / "model" / "model.safetensors")
    assert before.keys() == after.keys()
    bias = before["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert bias.abs().max() > 0  # balanced with counts summed over both ranks
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "model.layers.2.self_attn.o_proj.weight" in changed  # LoRA on attention, merged by rank 0
    assert "model.layers.2.mlp.gate.weight" in changed  # router: train -> trained in full under LoRA
    assert any(".mlp.experts." in k for k in changed)  # per-expert LoRA (experts that got tokens)
    assert not any("shared_experts" in k or "layers.0.mlp" in k for k in changed)  # not targets
    assert (zero3_run / "recipe.resolved.yaml").exists()


def test_zero3_grpo_keeps_routers_frozen(zero3_run):
    info = manifest(zero3_run / "grpo")
    assert (info["world_size"], info["zero_stage"], info["distributed_type"]) == (2, 3, "DEEPSPEED")
    result = metrics(zero3_run / "grpo")
    assert result["train"]["steps"] == 2 and "kl" in result["rl"]
    assert {"moe/load_cv", "moe/router_entropy", "moe/layer_1/expert_share"} <= set(result)
    assert (zero3_run / "grpo" / "moe_expert_load.png").exists()
    before = load_file(zero3_run / "full" / "model" / "model.safetensors")
    after = load_file(zero3_run / "grpo" / "model" / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "model.layers.2.self_attn.o_proj.weight" in changed
    assert not any(k.endswith("mlp.gate.weight") for k in changed)  # RL default: routers frozen


def test_two_process_zero3_matches_one_process(zero3_run, write_recipe, cli, tmp_path):
    """Same global batch (2 x 4 vs 1 x 8), same data order: same weights, loss and expert biases."""
    recipe = write_recipe(yaml.safe_dump({"name": "single", **BASE, "stages": [FULL_STAGE]}))
    code, _, err = cli("run", recipe, "--set", "stages.full.train.per_device_train_batch_size=8")
    assert code == 0, err
    single = tmp_path / "runs" / "full"
    assert manifest(single)["world_size"] == 1 and manifest(single)["zero_stage"] == 0
    sharded = load_file(zero3_run / "full" / "model" / "model.safetensors")
    alone = load_file(single / "model" / "model.safetensors")
    diff = max((sharded[k] - alone[k]).abs().max().item() for k in alone)
    assert diff < 1e-4, diff  # the updates themselves are ~1e-2
    a, b = metrics(zero3_run / "full")["train"], metrics(single)["train"]
    assert a["loss_last"] == pytest.approx(b["loss_last"], abs=1e-4)


def test_zero2_from_shipped_config(tmp_path):
    recipe = {"name": "zero2", "output_dir": str(tmp_path / "runs"), **BASE, "stages": [FULL_STAGE]}
    recipe = write(tmp_path / "recipe.yaml", recipe)
    done = launch(recipe, "--config_file", str(accelerate_config("zero2")), "--mixed_precision", "no")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    stage = tmp_path / "runs" / "full"
    info = manifest(stage)
    assert (info["world_size"], info["zero_stage"], info["distributed_type"]) == (2, 2, "DEEPSPEED")
    result = metrics(stage)
    assert result["train"]["loss_last"] < result["train"]["loss_first"] and "moe/load_cv" in result


def test_multinode_config_on_loopback(tmp_path):
    """The shipped 2-node ZeRO-3 config as two nodes run it: two `accelerate launch`es at once,
    machine_rank 0 and 1, one process each, meeting on 127.0.0.1 and sharing one filesystem (rank 0
    writes the run directory, rank 1 reads it after a barrier). On this CPU: --mixed_precision no
    (the config's bf16 is for GPUs) and 2 processes in all instead of 16; the rest as shipped."""
    recipe = {"name": "multinode", "output_dir": str(tmp_path / "runs"), **BASE, "stages": [FULL_STAGE]}
    recipe = write(tmp_path / "recipe.yaml", recipe)
    shared = ["--config_file", str(accelerate_config("multinode_zero3")), "--mixed_precision", "no"]
    shared += ["--num_machines", "2", "--num_processes", "2", "--main_process_ip", "127.0.0.1"]
    shared += ["--main_process_port", str(free_port())]
    nodes, logs = [], [(tmp_path / f"node{rank}.log").open("w") for rank in (0, 1)]
    for rank, log in enumerate(logs):  # files, not pipes: neither node can block writing its output
        command, env = launch_command(recipe, *shared, "--machine_rank", str(rank))
        nodes.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True))
    try:
        codes = [node.wait(timeout=420) for node in nodes]
    finally:
        for node, log in zip(nodes, logs, strict=True):
            node.kill()
            log.close()
    logs = [(tmp_path / f"node{rank}.log").read_text() for rank in (0, 1)]
    assert codes == [0, 0], logs[0][-4000:] + logs[1][-4000:]
    stage = tmp_path / "runs" / "full"
    info = manifest(stage)
    assert (info["world_size"], info["zero_stage"], info["distributed_type"]) == (2, 3, "DEEPSPEED")
    result = metrics(stage)
    assert result["train"]["loss_last"] < result["train"]["loss_first"]
    assert (stage / "COMPLETE").exists() and (stage / "model" / "model.safetensors").exists()
    assert "done" in logs[0] and "gemm_4bit_forward" not in logs[0] + logs[1]  # bitsandbytes' notice


@pytest.mark.slow  # ~16 s warm; ~110 s the first time, while DeepSpeed JIT-builds its CPU Adam op
def test_zero3_cpu_offload_from_shipped_config(tmp_path):
    """ZeRO-3 with weights and optimizer state in host memory, 2 steps: DeepSpeed's CPU Adam (a C++
    op JIT-built into ~/.cache/torch_extensions on its first use) steps the shards, and rank 0
    gathers them into one saved model. --mixed_precision no: the config's bf16 is for GPUs."""
    stage = {**FULL_STAGE, "train": {**TRAIN, "max_steps": 2}}
    recipe = {"name": "offload", "output_dir": str(tmp_path / "runs"), **BASE, "stages": [stage]}
    recipe = write(tmp_path / "recipe.yaml", recipe)
    done = launch(recipe, "--config_file", str(accelerate_config("zero3_offload")), "--mixed_precision", "no")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    info = manifest(tmp_path / "runs" / "full")
    assert (info["world_size"], info["zero_stage"], info["distributed_type"]) == (2, 3, "DEEPSPEED")
    assert metrics(tmp_path / "runs" / "full")["train"]["steps"] == 2
    base = load_file(next((tmp_path / "runs" / "presets").glob("tiny-deepseek-v3-*")) / "model.safetensors")
    after = load_file(tmp_path / "runs" / "full" / "model" / "model.safetensors")
    assert after.keys() == base.keys() and all(after[k].shape == base[k].shape for k in base)  # gathered
    changed = {k for k in base if not torch.equal(base[k], after[k])}
    assert "model.layers.2.self_attn.o_proj.weight" in changed and "lm_head.weight" in changed


def test_a_failure_on_rank_0_stops_every_rank(tmp_path):
    """Rank 0 alone writes the run directory; when it cannot, rank 1 must not wait for it forever."""
    blocker = tmp_path / "runs"
    blocker.write_text("a file where the run directory should go")
    stage = {"name": "sft", "kind": "sft", "data": {"synthetic": "arithmetic", "n": 8}}
    recipe = write(
        tmp_path / "recipe.yaml", {"name": "broken", "output_dir": str(blocker), **BASE, "stages": [stage]}
    )
    started = time.time()
    done = launch(recipe, "--use_deepspeed", "--zero_stage", "2", timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "error (rank 0/2)" in output and "cannot write the run directory" in output
    assert "stopping (rank 1/2): rank 0 failed" in output
    assert "[rank1]: Traceback" not in output and "[rank0]: Traceback" not in output
    assert time.time() - started < 300
