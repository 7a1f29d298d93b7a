"""GRPO step time: posttrain's grpo stage against a plain trl GRPOTrainer script.

    python bench/grpo_bench.py                 # tiny DeepSeek-V3 MoE, 20 steps, 3 repeats
    python bench/grpo_bench.py --steps 40 --repeats 5

All variants start from the same cold-start policy (a short SFT of the tiny MoE, so that
completions have the R1 shape and realistic lengths) and run the same GRPOConfig on the same
prompts. Figures are medians over interleaved repeats of seconds per optimizer step
(`train_runtime / steps`: generation, reward scoring and the update):
- trl: a plain GRPOTrainer with two small reward functions written in the script
  (exact match of the <answer>, and the R1 format by regex);
- posttrain (same rewards): the grpo stage with those same two functions by import path,
  i.e. the cost of posttrain's own layer (samples.jsonl, metrics, guards);
- posttrain (accuracy+format): the grpo stage with its verified `accuracy` (math-verify in
  a worker pool) and `format` rewards, what a recipe normally uses.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path
from typing import Any

from common import CPU_ARGS, alternate, median, print_table, tiny_model

SETTINGS = {
    "learning_rate": 1.0e-5,
    "per_device_train_batch_size": 16,
    "num_generations": 8,
    "max_completion_length": 32,
    "temperature": 0.8,
    "beta": 0.0,
    "logging_steps": 5,
    "seed": 0,
}
ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
R1 = re.compile(r"^<think>.*?</think><answer>.*?</answer>$", re.DOTALL)


def _text(completion: Any) -> str:
    return completion[0]["content"] if isinstance(completion, list) else completion


def exact(completions: list, answer: list[str], **kwargs: Any) -> list[float]:
    """1.0 when the last <answer> equals the gold answer."""
    found = [ANSWER.findall(_text(c)) for c in completions]
    return [float(bool(f) and f[-1].strip() == a) for f, a in zip(found, answer, strict=True)]


def r1_format(completions: list, **kwargs: Any) -> list[float]:
    """1.0 for <think>...</think><answer>...</answer>."""
    return [float(bool(R1.match(_text(c).strip()))) for c in completions]


def cold_start(model_dir: Path, out: Path) -> Path:
    """A few hundred SFT steps so the policy writes R1-shaped answers of realistic length."""
    from posttrain import loading
    from posttrain.runner import run

    out.mkdir(parents=True, exist_ok=True)
    recipe = out / "sft.yaml"
    recipe.write_text(
        json.dumps(
            {
                "name": "grpo-bench-sft",
                "output_dir": str(out / "runs"),
                "base_model": {"path": str(model_dir)},
                "stages": [
                    {
                        "name": "sft",
                        "kind": "sft",
                        "data": {"synthetic": "arithmetic", "n": 3000},
                        "train": {
                            "num_train_epochs": 2,
                            "learning_rate": 3.0e-3,
                            "per_device_train_batch_size": 64,
                        },
                    }
                ],
            }
        )
    )
    run(loading.load(recipe))
    return out / "runs" / "sft" / "model"


def plain_trl(policy: Path, prompts: list[dict], steps: int, out: Path) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForCausalLM.from_pretrained(policy)
    args = GRPOConfig(output_dir=str(out), max_steps=steps, reward_weights=[1.0, 0.2], **SETTINGS, **CPU_ARGS)
    dataset = Dataset.from_list(prompts)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[exact, r1_format],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    result = trainer.train()
    trainer.save_model(str(out / "model"))
    return {"step_s": result.metrics["train_runtime"] / steps}


def posttrain_grpo(policy: Path, rewards: list[dict], steps: int, out: Path) -> dict[str, Any]:
    from posttrain import loading
    from posttrain.runner import run

    out.mkdir(parents=True, exist_ok=True)
    recipe = out / "recipe.yaml"
    stage = {
        "name": "grpo",
        "kind": "grpo",
        "model": {"path": str(policy)},
        "data": {"synthetic": "arithmetic", "n": 2000, "seed": 1},
        "rewards": rewards,
        "train": {**SETTINGS, "max_steps": steps, "save_strategy": "no"},
    }
    recipe.write_text(
        json.dumps(
            {
                "name": "grpo-bench",
                "output_dir": str(out / "runs"),
                "base_model": {"path": str(policy)},
                "stages": [stage],
            }
        )
    )
    train = run(loading.load(recipe), force=("grpo",))["grpo"]["train"]
    return {"step_s": train["runtime_s"] / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()

    from posttrain.cli import _quiet_libraries
    from posttrain.data_tools import arithmetic_rows

    _quiet_libraries()
    tmp = Path(tempfile.mkdtemp(prefix="grpo-bench-"))
    policy = cold_start(tiny_model(tmp), tmp / "cold")
    prompts = [{"prompt": r["prompt"], "answer": r["answer"]} for r in arithmetic_rows(2000, seed=1)]
    same = [{"name": "grpo_bench:exact", "weight": 1.0}, {"name": "grpo_bench:r1_format", "weight": 0.2}]
    verified = [{"name": "accuracy", "weight": 1.0}, {"name": "format", "weight": 0.2}]
    results = alternate(
        {
            "trl": lambda: plain_trl(policy, prompts, args.steps, tmp / "trl"),
            "posttrain (same rewards)": lambda: posttrain_grpo(policy, same, args.steps, tmp / "same"),
            "posttrain (accuracy+format)": lambda: posttrain_grpo(
                policy, verified, args.steps, tmp / "verified"
            ),
        },
        args.repeats,
    )
    figures = {
        name: {"step_s": median(runs, "step_s"), "wall_s": median(runs, "wall_s")}
        for name, runs in results.items()
    }
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    base = figures["trl"]
    print_table(
        f"GRPO, tiny-deepseek-v3 after a short SFT, {args.steps} steps x 16 completions (2 prompts x 8), median of {args.repeats}",
        ["variant", "s/step", "vs trl", "wall s", "wall vs trl"],
        [
            [
                name,
                f"{f['step_s']:.3f}",
                f"{f['step_s'] / base['step_s']:.3f}",
                f"{f['wall_s']:.1f}",
                f"{f['wall_s'] / base['wall_s']:.3f}",
            ]
            for name, f in figures.items()
        ],
    )


if __name__ == "__main__":
    main()
