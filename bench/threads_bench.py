"""CPU threads for a tiny model: the demo's own work on one thread against two (or more).

    python bench/threads_bench.py                 # tiny-deepseek-v3, 5 interleaved rounds
    python bench/threads_bench.py --threads 1 2 --rounds 7 --json out.json

posttrain gives torch one CPU thread per core that no other process is busy on (posttrain.cpu).
This times why, on the shapes the demo runs (run it once on a quiet machine and once beside a
busy process): `generate`, a GRPO step's sampling (256 completions of up to 40 tokens at T=0.8),
and one forward + backward of a GRPO batch (256 x 56 tokens) and of an SFT batch (64 x 48). The
thread counts take turns within each round. Figures: median wall seconds per round and their
ratio to the first count (`vs_first`, paired per round); CPU seconds too, since a second thread
that only waits at barriers burns CPU without cutting wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from common import machine, print_table, tiny_model


def workloads(model_dir: Path) -> dict[str, Any]:
    """name -> a function doing one round of that work on the tiny model."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    prompts = torch.randint(5, 60, (256, 16), generator=torch.Generator().manual_seed(0))
    sampling = GenerationConfig(
        max_new_tokens=40, do_sample=True, temperature=0.8, top_k=0, top_p=1.0, disable_compile=True
    )

    def generate() -> None:
        with torch.inference_mode():
            model.generate(prompts, attention_mask=torch.ones_like(prompts), generation_config=sampling)

    def train_step(rows: int, length: int) -> Any:
        ids = torch.randint(5, 60, (rows, length), generator=torch.Generator().manual_seed(1))
        return lambda: model(input_ids=ids, labels=ids).loss.backward()

    return {
        "generate 256 x 40": generate,
        "grpo step 256 x 56": train_step(256, 56),
        "sft step 64 x 48": train_step(64, 48),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    import torch

    work = workloads(tiny_model(Path(tempfile.mkdtemp(prefix="threads-bench-"))))
    runs: dict[str, dict[int, list[tuple[float, float]]]] = {
        name: {t: [] for t in args.threads} for name in work
    }
    for _ in range(args.rounds):
        for name, fn in work.items():
            for threads in args.threads:
                torch.set_num_threads(threads)
                torch.manual_seed(0)
                wall, cpu = time.perf_counter(), time.process_time()
                fn()
                runs[name][threads].append((time.perf_counter() - wall, time.process_time() - cpu))
    first = args.threads[0]
    figures = {
        name: {
            str(t): {
                "wall_s": statistics.median(w for w, _ in rows),
                "cpu_s": statistics.median(c for _, c in rows),
                "vs_first": statistics.median(
                    w / w0 for (w, _), (w0, _) in zip(rows, by_threads[first], strict=True)
                ),
            }
            for t, rows in by_threads.items()
        }
        for name, by_threads in runs.items()
    }
    if args.json:
        args.json.write_text(
            json.dumps({"machine": machine(), "threads": args.threads, "figures": figures}, indent=2)
        )
    print_table(
        f"tiny-deepseek-v3 on {', '.join(map(str, args.threads))} CPU threads, median of {args.rounds} rounds",
        ["work", "threads", "wall s", "cpu s", f"wall vs {first} thread(s)"],
        [
            [name, t, f"{f['wall_s']:.3f}", f"{f['cpu_s']:.3f}", f"{f['vs_first']:.2f}"]
            for name, by_threads in figures.items()
            for t, f in by_threads.items()
        ],
    )


if __name__ == "__main__":
    main()
