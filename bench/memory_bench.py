"""Measured vs estimated training memory, under DDP / ZeRO-2 / ZeRO-3 with 2 processes.

    python bench/memory_bench.py                         # the tiny presets, on this CPU (gloo)
    python bench/memory_bench.py --scale 4 --steps 3     # the same architectures, 4x wider
    python bench/memory_bench.py --settings zero3 --preset tiny-deepseek-v3

For each preset and setting it runs `accelerate launch --num_processes 2 [--use_deepspeed
--zero_stage N] bench/memory_bench.py --worker ...`. Each worker builds the model from the
preset config, trains a few steps of random tokens with transformers' Trainer (fp32, as on a
CPU) and writes its peak memory above a baseline taken just before the model is built: on a
GPU `torch.cuda.max_memory_allocated`, on a CPU the bytes glibc's malloc has handed out
(`mallinfo2`, sampled every millisecond; PyTorch's CPU allocator does not cache, so this is
live tensors plus Python objects). The estimate is posttrain.memory's, without its fixed GPU
runtime term. The ratio is estimate / measured, for the rank that used more.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

SETTINGS = {
    "ddp": ["--multi_gpu"],  # on a CPU-only machine: 2 processes, gloo
    "zero2": ["--use_deepspeed", "--zero_stage", "2"],
    "zero3": ["--use_deepspeed", "--zero_stage", "3"],
}


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


class PeakHeap:
    """Samples the bytes malloc has handed out (small blocks + mmapped blocks) in a thread."""

    def __init__(self) -> None:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        self._mallinfo = libc.mallinfo2
        self.baseline = self.now()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def now(self) -> int:
        info = self._mallinfo()
        return int(info.uordblks + info.hblkhd)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(0.001)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.now()) - self.baseline


def model_config(preset: str, scale: int):
    """The preset's config with hidden and intermediate sizes (and MLA ranks) times `scale`."""
    from posttrain.architecture import preset_model_config

    config = preset_model_config(preset)
    derived_head_dim = getattr(config, "head_dim", None) == config.hidden_size // config.num_attention_heads
    for key in ("hidden_size", "intermediate_size", "moe_intermediate_size", "q_lora_rank", "kv_lora_rank"):
        if getattr(config, key, None):
            setattr(config, key, getattr(config, key) * scale)
    if derived_head_dim:
        config.head_dim = config.hidden_size // config.num_attention_heads
    return config


def worker(args: argparse.Namespace) -> None:
    """One rank: train `steps` steps of random tokens, print its peak memory as a JSON line."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from posttrain.distributed import state

    os.environ.setdefault("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "true")
    state()
    cuda = torch.cuda.is_available()
    config = model_config(args.preset, args.scale)
    rows = [
        {"input_ids": ids, "labels": ids}
        for ids in torch.randint(3, config.vocab_size, (64, args.seq)).tolist()
    ]
    training = TrainingArguments(
        output_dir=args.out,
        per_device_train_batch_size=args.batch,
        max_steps=args.steps,
        learning_rate=1e-4,
        report_to="none",
        save_strategy="no",
        use_cpu=not cuda,
        bf16=False,
        gradient_checkpointing=False,
        logging_strategy="no",
        disable_tqdm=True,
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    heap = None if cuda else PeakHeap()
    model = AutoModelForCausalLM.from_config(config)
    Trainer(model=model, args=training, train_dataset=rows).train()
    peak = torch.cuda.max_memory_allocated() - baseline if cuda else heap.stop()
    Path(args.out, f"peak-{os.environ.get('RANK', '0')}.json").write_text(json.dumps({"bytes": peak}))


def estimate(preset: str, scale: int, setting: str, batch: int, seq: int) -> int:
    from posttrain import memory
    from posttrain.architecture import shape

    model = shape(model_config(preset, scale))
    work = memory.Workload(
        model=model,
        trainable=model.total,
        lora=False,
        batch=batch,
        seq=seq,
        gradient_checkpointing=False,
        bf16=False,
    )
    sharding = next(s for s in memory.SHARDINGS if s.name == setting)
    return memory.estimate(work, sharding, 2)["total"] - memory.RUNTIME_OVERHEAD


def measure(preset: str, scale: int, setting: str, args: argparse.Namespace, out: Path) -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--main_process_port",
        str(port),
        *SETTINGS[setting],
        __file__,
        "--worker",
        "--preset",
        preset,
        "--scale",
        str(scale),
        "--steps",
        str(args.steps),
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
        "--out",
        str(out),
    ]
    for old in out.glob("peak-*.json"):
        old.unlink()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    peaks = [json.loads(f.read_text())["bytes"] for f in out.glob("peak-*.json")]
    if done.returncode != 0 or len(peaks) != 2:
        raise SystemExit(f"{setting} failed:\n{done.stderr[-3000:]}")
    return max(peaks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="/tmp/posttrain-memory-bench", help=argparse.SUPPRESS)
    parser.add_argument("--preset", action="append", help="tiny-deepseek-v3 and tiny-dense by default")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--scale", type=int, default=1, help="multiply hidden and intermediate sizes")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument(
        "--json", nargs="?", const="-", help="write the figures as JSON (to a file, or stdout)"
    )
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.worker:
        args.preset = args.preset[0]
        worker(args)
        return
    mib = 1024**2
    print(
        f"{'preset':<18} {'scale':>5} {'setting':<7} {'estimate MiB':>12} {'measured MiB':>12} {'ratio':>6}"
    )
    rows = []
    for preset in args.preset or ["tiny-deepseek-v3", "tiny-dense"]:
        for setting in args.settings:
            guess = estimate(preset, args.scale, setting, args.batch, args.seq)
            peak = measure(preset, args.scale, setting, args, Path(args.out))
            rows.append({"preset": preset, "scale": args.scale, "setting": setting, "estimate_bytes": guess,
                         "measured_bytes": peak, "estimate_vs_measured": guess / peak})  # fmt: skip
            print(
                f"{preset:<18} {args.scale:>5} {setting:<7} {guess / mib:>12.1f} {peak / mib:>12.1f} {guess / peak:>6.2f}",
                flush=True,
            )
    if args.json:
        text = json.dumps(rows, indent=2)
        print(text) if args.json == "-" else Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
