"""Does using the judge's soft labels help DPO? filter / smooth / ignore on labels with known noise.

    OMP_NUM_THREADS=1 python bench/dpo_soft_labels.py [--seeds 0 1] [--pairs 192] [--steps 12]

Pairs on arithmetic prompts: the right answer is a worked solution, the wrong one a bare wrong
answer. Each training pair gets a soft label p_chosen the way a calibrated judge would give it,
and its label is flipped with probability 1 - p: 40 % of the pairs are near coin flips (p in
0.5-0.6, about 45 % of them flipped), 60 % are clear (p in 0.9-1.0, about 5 % flipped). The
held-out pairs are clean. Each mode trains the same tiny dense model (random weights, seed)
for the same number of steps; the figure is the implicit reward's held-out pairwise accuracy
and mean margin (dpo's `held_out`), per seed.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

from posttrain.cli import main
from posttrain.data_tools import arithmetic_rows
from posttrain.models import materialize_preset

MODES = {
    "ignore": "soft_labels: ignore",
    "filter": "soft_labels: filter",  # p_chosen >= 0.75
    "smooth (robust)": "soft_labels: smooth",
}


def noisy_pairs(path: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    rows = []
    for row in arithmetic_rows(n, seed=seed + 100):
        right, wrong = row["messages"][-1]["content"], f"<answer>{int(row['answer']) + 1}</answer>"
        p = rng.uniform(0.5, 0.6) if rng.random() < 0.4 else rng.uniform(0.9, 1.0)
        chosen, rejected = (right, wrong) if rng.random() < p else (wrong, right)
        rows.append({"prompt": row["prompt"], "chosen": chosen, "rejected": rejected, "p_chosen": p,
                     "answer": row["answer"]})  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def clean_held_out(rows_file: Path, fraction: float, seed: int) -> None:
    """Held-out prompts (the stage's split) get their true labels back."""
    from datasets import Dataset

    from posttrain.stages.reward_model import split_by_prompt

    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    _, held = split_by_prompt(Dataset.from_list(rows), fraction, seed)
    held_prompts = {json.dumps(p) for p in held["prompt"]}
    for r in rows:
        if json.dumps(r["prompt"]) in held_prompts and r["chosen"].startswith("<answer>"):
            r["chosen"], r["rejected"] = r["rejected"], r["chosen"]
    rows_file.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run(mode: str, option: str, seed: int, pairs: int, steps: int, work: Path) -> dict:
    data = work / f"pairs-{seed}.jsonl"
    if not data.exists():
        noisy_pairs(data, pairs, seed)
        clean_held_out(data, 0.25, seed)
    model = materialize_preset("tiny-dense", seed, work / f"model-{seed}")
    loss = "\n    train: {loss_type: robust, " if "smooth" in mode else "\n    train: {"
    recipe = work / f"{mode.split()[0]}-{seed}.yaml"
    recipe.write_text(
        f"name: b\nseed: {seed}\noutput_dir: {work / recipe.stem}\nbase_model: {{path: {model}}}\nstages:\n"
        f"  - name: dpo\n    kind: dpo\n    data: {{path: {data}}}\n    eval_fraction: 0.25\n    {option}"
        f"{loss}max_steps: {steps}, per_device_train_batch_size: 8, learning_rate: 5.0e-3, beta: 0.1,"
        " gradient_checkpointing: false, logging_steps: 1, save_strategy: 'no'}\n"
    )
    try:
        main(["run", str(recipe)])
    except SystemExit as e:
        if e.code:
            raise
    metrics = json.loads((work / recipe.stem / "dpo" / "metrics.json").read_text())
    return {"held_out": metrics["held_out"], "pairs": metrics["pairs"], "soft_labels": metrics["soft_labels"]}


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--pairs", type=int, default=192)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for mode, option in MODES.items():
                results[(mode, seed)] = run(mode, option, seed, args.pairs, args.steps, Path(tmp))
    print(
        "| soft labels | seed | pairs trained | label smoothing | held-out pairwise accuracy | mean margin |"
    )
    print("|---|---|---|---|---|---|")
    for (mode, seed), r in results.items():
        smoothing = r["soft_labels"].get("label_smoothing")
        print(f"| {mode} | {seed} | {r['pairs']['train']} | {'' if smoothing is None else f'{smoothing:.3f}'} | "
              f"{r['held_out']['pairwise_accuracy']:.3f} | {r['held_out']['mean_margin']:.3f} |")  # fmt: skip


if __name__ == "__main__":
    cli()
