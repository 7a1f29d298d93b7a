"""Evaluation throughput on 1 and on 2 processes: the prompts split over the ranks.

    python bench/eval_ranks.py [--n 128] [--max-new-tokens 32] [--k 2] [--repeats 3] [--json out.json]

Each repeat runs the same `kind: evaluate` stage (the tiny MoE preset, arithmetic prompts) with
`posttrain run` in one process and with `accelerate launch --num_processes 2 --multi_gpu` (gloo
on a CPU), interleaved. The figures are the stage's own: `eval.seconds` (generation and scoring,
over every rank) and prompts/s = n / seconds. Both runs must give the same eval_samples.jsonl;
the bench says so, and stops when they do not. The ratio is 2-process seconds / 1-process
seconds, paired within a repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from common import alternate, machine, median, paired_ratio, print_table

from posttrain import artifacts


def recipe(folder: Path, world: int, args: argparse.Namespace) -> Path:
    spec = {"data": {"synthetic": "arithmetic", "n": args.n, "seed": 7}, "max_new_tokens": args.max_new_tokens,
            "batch_size": args.batch_size, "k": args.k}  # fmt: skip
    body = {"name": f"w{world}", "output_dir": str(folder / f"w{world}"), "seed": 0,
            "base_model": {"preset": "tiny-deepseek-v3"}, "stages": [{"name": "eval", "kind": "evaluate", **spec}]}  # fmt: skip
    path = folder / f"w{world}.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def run(folder: Path, world: int, args: argparse.Namespace) -> dict:
    path = recipe(folder, world, args)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
              "--main_process_port", str(29600 + world), "--multi_gpu"]  # fmt: skip
    command = [
        *(launch if world == 2 else [sys.executable]),
        "-m",
        "posttrain",
        "run",
        str(path),
        "--force",
        "eval",
    ]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise SystemExit(f"{world} process(es) failed:\n{done.stderr[-3000:]}")
    stage = folder / f"w{world}" / "eval"
    result = json.loads((stage / artifacts.METRICS).read_text())["eval"]
    samples = (stage / artifacts.EVAL_SAMPLES).read_text()
    return {
        "seconds": result["seconds"],
        "prompts_per_s": result["n"] / result["seconds"],
        "samples": samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        results = alternate({"1 process": lambda: run(folder, 1, args), "2 processes": lambda: run(folder, 2, args)},
                            args.repeats)  # fmt: skip
    one, two = results["1 process"], results["2 processes"]
    same = all(a["samples"] == b["samples"] for a, b in zip(one, two, strict=True))
    ratio = paired_ratio(two, one, "seconds")
    rows = [
        [name, f"{median(r, 'seconds'):.2f}", f"{median(r, 'prompts_per_s'):.1f}"]
        for name, r in results.items()
    ]
    print_table(f"evaluate: n={args.n}, {args.max_new_tokens} new tokens, k={args.k}, {args.repeats} repeats",
                ["processes", "eval seconds (median)", "prompts/s"], rows)  # fmt: skip
    print(f"2 processes / 1 process, eval seconds: {ratio:.2f} (paired median); same completions: {same}")
    if args.json:
        figures = {
            name: [{k: v for k, v in r.items() if k != "samples"} for r in rs] for name, rs in results.items()
        }
        out = {"machine": machine(), "args": vars(args) | {"json": str(args.json)}, "runs": figures,
               "ratio_seconds_2_vs_1": ratio, "same_completions": same}  # fmt: skip
        args.json.write_text(json.dumps(out, indent=2))
    if not same:
        raise SystemExit("the 1- and 2-process evaluations differ")


if __name__ == "__main__":
    main()
