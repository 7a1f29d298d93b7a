"""GRPO step time: posttrain's grpo stage against a plain trl GRPOTrainer script (and, with
`--baseline`, against the grpo stage as it was at an older commit).

    python bench/grpo_bench.py                          # tiny DeepSeek-V3 MoE, 20 steps, 5 repeats
    python bench/grpo_bench.py --steps 40 --repeats 7 --baseline f25f7a2 --json out.json

All variants start from the same cold-start policy (a short SFT of the tiny MoE, so that
completions have the R1 shape and realistic lengths) and run the same GRPOConfig on the same
prompts. Every run is a fresh interpreter (nothing carries over from one variant to the next),
and the variants take turns (A B C A B C ...). The figures:
- step_s: `train_runtime / steps` (generation, reward scoring and the update), wall clock;
- cpu_step_s: CPU seconds of the training process per step (all its threads), which other jobs
  on a shared machine disturb far less than wall time;
- startup_s: the rest of the run's wall time (model load, data, reward set-up, save, report);
- the ratios against trl pair each run with the trl run of the same round, median over rounds;
  `min cpu vs trl` is the ratio of the fastest runs (the ones other jobs disturbed least);
- layer %: CPU time inside posttrain's own per-step code (its callbacks, the router-metric
  hooks, the completions table its `log_completions` makes trl write, the reward wrapper) as a
  share of the training run's CPU time, clocked inside the run: a direct measure of the layer's
  cost that other jobs on the machine hardly move; rewards % - trl: the reward functions' share
  of the run, less plain trl's (what the verified `accuracy` costs over an exact-match regex).
The variants:
- trl: a plain GRPOTrainer with two small reward functions written in the script
  (exact match of the <answer>, and the R1 format by regex);
- posttrain (same rewards): the grpo stage with those same two functions by import path,
  i.e. the cost of posttrain's own layer (samples.jsonl, metrics, guards, router metrics);
- posttrain (accuracy+format): the grpo stage with its verified `accuracy` (math-verify in
  a worker pool) and `format` rewards, what a recipe normally uses;
- `<variant>@<commit>`: the same, with posttrain imported from that commit (`--baseline`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    CPU_ARGS,
    TrainClock,
    baseline_tree,
    in_subprocess,
    load_recipe,
    median,
    paired_ratio,
    print_table,
    tiny_model,
)

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
SAME = [{"name": "grpo_bench:exact", "weight": 1.0}, {"name": "grpo_bench:r1_format", "weight": 0.2}]
VERIFIED = [{"name": "accuracy", "weight": 1.0}, {"name": "format", "weight": 0.2}]
VARIANTS = {"trl": None, "posttrain (same rewards)": SAME, "posttrain (accuracy+format)": VERIFIED}


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


def plain_trl(policy: Path, steps: int, out: Path) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.data_tools import arithmetic_rows

    prompts = [{"prompt": r["prompt"], "answer": r["answer"]} for r in arithmetic_rows(2000, seed=1)]
    tokenizer = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForCausalLM.from_pretrained(policy)
    args = GRPOConfig(output_dir=str(out), max_steps=steps, reward_weights=[1.0, 0.2], **SETTINGS, **CPU_ARGS)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[exact, r1_format],
        args=args,
        train_dataset=Dataset.from_list(prompts),
        processing_class=tokenizer,
    )
    result = trainer.train()
    trainer.save_model(str(out / "model"))
    return {"step_s": result.metrics["train_runtime"] / steps}


def posttrain_grpo(policy: Path, rewards: list[dict], steps: int, out: Path) -> dict[str, Any]:
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
    train = run(load_recipe(recipe), force=("grpo",))["grpo"]["train"]
    return {"step_s": train["runtime_s"] / steps}


# Where posttrain's own per-step work runs, and trl work that only posttrain's settings cause
# (the completions table that `log_completions` writes); timed in CPU seconds inside each run.
LEDGER = {
    "callbacks": [
        ("posttrain.samples", "SamplesLog", "on_log"),
        ("posttrain.guards", "TrainingGuard", "on_log"),
        ("posttrain.guards", "GracefulStop", "on_step_end"),
        ("posttrain.moe", "RouterMetrics", "on_step_end"),
        ("posttrain.moe", "RouterMetrics", "on_log"),
        ("transformers.integrations", "TensorBoardCallback", "on_log"),
        ("posttrain.step_log", "StepLog", "on_step_end"),
        ("posttrain.step_log", "StepLog", "on_log"),
    ],
    "router_hooks": [
        ("posttrain.moe", "RouterLoad", "_count"),
        ("posttrain.moe", "RouterLoad", "_on_model_call"),
    ],
    "completions_table": [("pandas", "DataFrame", "to_parquet")],
    "rewards": [("posttrain.rewards.guard", "Reward", "__call__")],
    "reward_functions": [("grpo_bench", None, "exact"), ("grpo_bench", None, "r1_format")],
}


class Ledger:
    """CPU seconds spent in each LEDGER category during this process's training run."""

    def __init__(self) -> None:
        import importlib

        self.seconds = dict.fromkeys(LEDGER, 0.0)
        for category, places in LEDGER.items():
            for module, owner, name in places:
                try:  # a place an older (--baseline) commit lacks is left out
                    target = importlib.import_module(module)
                    target = getattr(target, owner) if owner else target
                    setattr(target, name, self._timed(category, getattr(target, name)))
                except (ImportError, AttributeError):
                    continue
        main = sys.modules["__main__"]  # plain_trl hands trl this script's own reward functions
        for name in ("exact", "r1_format"):
            setattr(main, name, self._timed("reward_functions", getattr(main, name)))

    def _timed(self, category: str, fn: Any) -> Any:
        import functools

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[category] += time.process_time() - started

        return timed

    def layer_s(self) -> float:
        """posttrain's own per-step work: callbacks, router hooks, the completions table, and the
        reward wrapper around the reward functions (Reward.__call__ less the functions it calls)."""
        wrapper = (
            max(0.0, self.seconds["rewards"] - self.seconds["reward_functions"])
            if self.seconds["rewards"]
            else 0.0
        )
        return (
            self.seconds["callbacks"]
            + self.seconds["router_hooks"]
            + self.seconds["completions_table"]
            + wrapper
        )


def one_run(variant: str, policy: Path, steps: int, out: Path) -> dict[str, Any]:
    """One run of `variant` in this process (the parent starts a fresh interpreter for each)."""
    from posttrain.cli import _quiet_libraries

    _quiet_libraries()
    from trl import GRPOConfig, GRPOTrainer  # noqa: F401  (imports paid before the clock, for both)

    clock, ledger = TrainClock(), Ledger()
    started = time.perf_counter()
    rewards = VARIANTS[variant.partition("@")[0]]
    figures = (
        plain_trl(policy, steps, out) if rewards is None else posttrain_grpo(policy, rewards, steps, out)
    )
    wall = time.perf_counter() - started
    train = clock.last()
    reward_s = ledger.seconds["rewards"] or ledger.seconds["reward_functions"]
    return {
        **figures,
        "cpu_step_s": train["cpu_s"] / steps,
        "wall_s": wall,
        "startup_s": wall - train["wall_s"],
        "layer_cpu_frac": ledger.layer_s() / train["cpu_s"],
        "reward_cpu_frac": reward_s / train["cpu_s"],
        "ledger_cpu_s": ledger.seconds,
    }


def summarise(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    base = results["trl"]
    figures = {}
    keys = ("step_s", "cpu_step_s", "wall_s", "startup_s", "layer_cpu_frac", "reward_cpu_frac")
    for name, runs in results.items():
        figures[name] = {key: median(runs, key) for key in keys}
        figures[name].update(
            step_vs_trl=paired_ratio(runs, base, "step_s"),
            cpu_step_vs_trl=paired_ratio(runs, base, "cpu_step_s"),
            min_cpu_step_vs_trl=min(r["cpu_step_s"] for r in runs) / min(b["cpu_step_s"] for b in base),
            wall_vs_trl=paired_ratio(runs, base, "wall_s"),
            startup_minus_trl_s=median(runs, "startup_s") - median(base, "startup_s"),
            rewards_minus_trl_cpu_frac=median(runs, "reward_cpu_frac") - median(base, "reward_cpu_frac"),
        )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline", help="also time the posttrain variants at this commit (e.g. f25f7a2)")
    parser.add_argument(
        "--json", nargs="?", const="-", help="write the figures as JSON (to a file, or stdout)"
    )
    parser.add_argument("--workdir", type=Path, help="keep the cold-start policy here and reuse it")
    parser.add_argument("--one", nargs=3, metavar=("VARIANT", "POLICY", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        variant, policy, out = args.one
        print(json.dumps(one_run(variant, Path(policy), args.steps, Path(out))))
        return

    from posttrain.cli import _quiet_libraries

    _quiet_libraries()
    tmp = args.workdir or Path(tempfile.mkdtemp(prefix="grpo-bench-"))
    policy = tmp / "cold" / "runs" / "sft" / "model"
    if not (policy / "config.json").exists():
        policy = cold_start(tiny_model(tmp), tmp / "cold")
    variants = {name: None for name in VARIANTS}
    if args.baseline:
        old = baseline_tree(args.baseline, tmp)
        variants.update({f"{name}@{args.baseline}": old for name in VARIANTS if name != "trl"})
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for round_ in range(args.repeats):
        for i, (name, pythonpath) in enumerate(variants.items()):
            out = tmp / f"run-{round_}-{i}"
            run_args = ["--steps", str(args.steps), "--one", name, str(policy), str(out)]
            results[name].append(in_subprocess(Path(__file__), run_args, pythonpath))
            print(f"round {round_ + 1}/{args.repeats} {name}: {results[name][-1]}", file=sys.stderr)
    figures = summarise(results)
    if args.json:
        text = json.dumps({"figures": figures, "runs": results}, indent=2)
        print(text) if args.json == "-" else Path(args.json).write_text(text)
    print_table(
        f"GRPO, tiny-deepseek-v3 after a short SFT, {args.steps} steps x 16 completions (2 prompts x 8), "
        f"median of {args.repeats} interleaved rounds",
        [
            "variant",
            "s/step",
            "vs trl",
            "cpu s/step",
            "cpu vs trl",
            "min cpu vs trl",
            "layer %",
            "rewards % - trl",
            "start-up s",
            "wall vs trl",
        ],
        [
            [
                name,
                f"{f['step_s']:.3f}",
                f"{f['step_vs_trl']:.3f}",
                f"{f['cpu_step_s']:.3f}",
                f"{f['cpu_step_vs_trl']:.3f}",
                f"{f['min_cpu_step_vs_trl']:.3f}",
                f"{100 * f['layer_cpu_frac']:.2f}",
                f"{100 * f['rewards_minus_trl_cpu_frac']:.2f}",
                f"{f['startup_s']:.1f}",
                f"{f['wall_vs_trl']:.3f}",
            ]
            for name, f in figures.items()
        ],
    )


if __name__ == "__main__":
    main()
