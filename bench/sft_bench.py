"""SFT throughput: `posttrain run` against a plain trl SFTTrainer script, and packing vs padding.

    python bench/sft_bench.py                  # tiny DeepSeek-V3 MoE, 4000 arithmetic rows, 3 repeats
    python bench/sft_bench.py --rows 8000 --repeats 5

Both sides train the same model from the same weights on the same rows with the same trl
settings. Figures are medians over interleaved repeats:
- tokens/s: non-padding tokens trained per second of `trainer.train()`;
- wall: the whole job, model load and final save included (posttrain adds its run
  directory, manifest and fingerprinting; that is the overhead a user pays);
- packing vs padding: the same plain trl script with `packing: true` (trl's best-fit
  decreasing packing, padding-free), counting the same non-padding tokens;
- why packing is slow on a CPU (`layouts`): one forward and backward of the same 64 rows of 40
  tokens, laid out three ways: padded [64, 40]; trl's padding-free layout, every row of the batch
  flattened into one [1, 2560] with position_ids restarting per row (the varlen kernels of
  flash-attention keep the rows apart; sdpa instead builds a block-diagonal mask over the whole
  flattened row and attends across all 2560 tokens); and packed rows kept apart, [16, 160].
  CPU seconds, median of 5, ratios against padded.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from common import CPU_ARGS, alternate, machine, median, paired_ratio, print_table, tiny_model

SETTINGS = {
    "num_train_epochs": 1,
    "learning_rate": 3.0e-3,
    "per_device_train_batch_size": 64,
    "gradient_checkpointing": False,
    "logging_steps": 10,
    "max_length": 128,
    "assistant_only_loss": True,
    "seed": 0,
}


def plain_trl(model_dir: Path, rows: list[dict], out: Path, packing: bool) -> dict[str, Any]:
    """What a user would write with trl alone."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    args = SFTConfig(output_dir=str(out), packing=packing, **SETTINGS, **CPU_ARGS)
    dataset = Dataset.from_list([{"messages": r["messages"]} for r in rows])
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    result = trainer.train()
    trainer.save_model(str(out / "model"))
    tokens = next(h["num_tokens"] for h in reversed(trainer.state.log_history) if "num_tokens" in h)
    return {"tokens": tokens, "train_s": result.metrics["train_runtime"]}


def posttrain_run(model_dir: Path, rows: int, out: Path) -> dict[str, Any]:
    """The same job as a one-stage recipe, through the runner (fresh each time: --force)."""
    from posttrain import loading
    from posttrain.runner import run

    out.mkdir(parents=True, exist_ok=True)
    recipe = out / "recipe.yaml"
    train = {**SETTINGS, "save_strategy": "no"}
    recipe.write_text(
        json.dumps(
            {
                "name": "sft-bench",
                "output_dir": str(out / "runs"),
                "base_model": {"path": str(model_dir)},
                "stages": [
                    {
                        "name": "sft",
                        "kind": "sft",
                        "data": {"synthetic": "arithmetic", "n": rows},
                        "train": train,
                    }
                ],
            }
        )
    )
    metrics = run(loading.load(recipe), force=("sft",))["sft"]["train"]
    return {"tokens": metrics["tokens"], "train_s": metrics["runtime_s"]}


def layouts(model_dir: Path, repeats: int = 5) -> dict[str, dict[str, float]]:
    """CPU seconds of one forward+backward of the same tokens, padded against packed layouts."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    rows, length = 64, 40
    ids = torch.randint(5, 60, (rows, length), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(length).repeat(rows)
    shapes = {
        "padded [64, 40]": {"input_ids": ids},
        "padding-free [1, 2560]": {"input_ids": ids.reshape(1, -1), "position_ids": positions.reshape(1, -1)},
        "packed rows [16, 160]": {
            "input_ids": ids.reshape(16, -1),
            "position_ids": positions.reshape(16, -1),
        },
    }
    seconds: dict[str, list[dict[str, float]]] = {name: [] for name in shapes}
    for _ in range(repeats):
        for name, batch in shapes.items():
            started = time.process_time()
            model(**batch, labels=batch["input_ids"]).loss.backward()
            seconds[name].append({"s": time.process_time() - started})
    base = seconds["padded [64, 40]"]
    return {
        name: {"cpu_s": median(runs, "s"), "vs_padded": paired_ratio(runs, base, "s")}
        for name, runs in seconds.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--json", nargs="?", const="-", help="write the figures as JSON (to a file, or stdout)"
    )
    args = parser.parse_args()

    from posttrain.cli import _quiet_libraries
    from posttrain.data_tools import arithmetic_rows

    _quiet_libraries()
    tmp = Path(tempfile.mkdtemp(prefix="sft-bench-"))
    model_dir = tiny_model(tmp)
    rows = arithmetic_rows(args.rows, seed=0)
    results = alternate(
        {
            "trl (padding)": lambda: plain_trl(model_dir, rows, tmp / "trl", packing=False),
            "posttrain run": lambda: posttrain_run(model_dir, args.rows, tmp / "posttrain"),
            "trl (packing)": lambda: plain_trl(model_dir, rows, tmp / "trl-packed", packing=True),
        },
        args.repeats,
    )
    figures = {
        name: {
            "tokens_per_s": median([{**r, "tps": r["tokens"] / r["train_s"]} for r in runs], "tps"),
            "wall_s": median(runs, "wall_s"),
        }
        for name, runs in results.items()
    }
    base_tps = [{"tps": r["tokens"] / r["train_s"]} for r in results["trl (padding)"]]
    for name, runs in results.items():
        tps = [{"tps": r["tokens"] / r["train_s"]} for r in runs]
        figures[name]["tokens_per_s_vs_trl"] = paired_ratio(tps, base_tps, "tps")
        figures[name]["wall_vs_trl"] = paired_ratio(runs, results["trl (padding)"], "wall_s")
    shapes = layouts(model_dir)
    if args.json:
        report = {"machine": machine(), "figures": figures, "layouts": shapes, "runs": results}
        text = json.dumps(report, indent=2)
        print(text) if args.json == "-" else Path(args.json).write_text(text)
    print_table(
        f"SFT, tiny-deepseek-v3, {args.rows} rows x 1 epoch, median of {args.repeats}",
        ["variant", "tokens/s", "vs trl", "wall s", "wall vs trl"],
        [
            [
                name,
                f"{f['tokens_per_s']:.0f}",
                f"{f['tokens_per_s_vs_trl']:.3f}",
                f"{f['wall_s']:.1f}",
                f"{f['wall_vs_trl']:.3f}",
            ]
            for name, f in figures.items()
        ],
    )
    print_table(
        "Why packing is slow here: one forward+backward of 64 rows x 40 tokens, CPU s, median of 5",
        ["layout", "cpu s", "vs padded"],
        [[name, f"{f['cpu_s']:.3f}", f"{f['vs_padded']:.2f}"] for name, f in shapes.items()],
    )


if __name__ == "__main__":
    main()
