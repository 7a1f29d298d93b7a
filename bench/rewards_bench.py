"""Benchmark posttrain's `accuracy` reward against trl's stock `accuracy_reward`.

    python bench/rewards_bench.py            # ~3000 completions; prints a table
    python bench/rewards_bench.py --n 500 --json

Two figures for each reward:
- agreement with hand-labelled cases (tests/data/answer_cases.jsonl: gold answer, completion,
  is it correct?) over many answer formats; a None verdict counts as a disagreement;
- throughput, in completions per second, on a few thousand realistic completions (reasoning
  prose, then the final answer in `<answer>` tags or `\\boxed{}`, right or wrong, in several
  notations, nearly all distinct so the verdict cache never helps), scored in GRPO-sized
  batches of 64; posttrain's worker start-up (once per process) is reported apart.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

CASES = Path(__file__).resolve().parent.parent / "tests" / "data" / "answer_cases.jsonl"
BATCH = 64

PROSE = (
    "Let me work through this carefully. First, restate the problem and the quantities involved. "
    "Next, set up the equation, simplify both sides, and check each step for arithmetic errors. "
)


def answer_forms(rng: random.Random) -> tuple[str, list[str], list[str]]:
    """A random gold answer with equivalent and wrong forms, in the notations models write."""
    a, b = rng.randint(2, 999), rng.randint(2, 99)
    kind = rng.randrange(8)
    if kind == 0:
        k = a * 37
        return str(k), [f"{k:,}", f"{k}.0", f"\\${k}", f"{k} dollars"], [str(k + 1), f"{k * 10:,}"]
    if kind == 1:
        return (
            f"\\frac{{{a}}}{{{b}}}",
            [f"{a}/{b}", f"\\dfrac{{{2 * a}}}{{{2 * b}}}"],
            [f"{b}/{a}", f"\\frac{{{a + 1}}}{{{b}}}"],
        )
    if kind == 2:
        return f"{a}\\%", [str(a), f"{a / 100:g}", f"{a}\\%"], [f"{a + 5}\\%", str(a * 2)]
    if kind == 3:
        return (
            f"{b}\\sqrt{{2}}",
            [f"\\sqrt{{{2 * b * b}}}", f"{b}\\cdot\\sqrt{{2}}"],
            [f"{b}\\sqrt{{3}}", f"\\sqrt{{{b}}}"],
        )
    if kind == 4:
        return f"({a}, {a + b}]", [f"({a},{a + b}]"], [f"[{a},{a + b}]", f"({a},{a + b})"]
    if kind == 5:
        return f"\\{{{a}, {b}\\}}", [f"\\{{{b},{a}\\}}"], [f"\\{{{a}\\}}", f"\\{{{a},{b + 1}\\}}"]
    if kind == 6:
        return f"x^2 + {2 * b}x + {b * b}", [f"(x+{b})^2"], [f"(x-{b})^2", f"x^2+{b * b}"]
    return f"\\frac{{1}}{{n+{b}}}", [f"1/(n+{b})"], [f"1/n+{b}", "\\frac{1}{n}"]


def realistic_completions(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """`n` completions, half right; nearly every (gold, answer) pair is distinct (no cache hits)."""
    rng = random.Random(seed)
    completions, golds = [], []
    for i in range(n):
        gold, right, wrong = answer_forms(rng)
        pred = rng.choice(right if rng.random() < 0.5 else wrong)
        prose = PROSE * rng.randint(1, 6) + f"(attempt {i})"
        if rng.random() < 0.5:
            completions.append(f"<think>{prose}</think><answer>\\boxed{{{pred}}}</answer>")
        else:
            completions.append(f"{prose} So the final answer is $\\boxed{{{pred}}}$.")
        golds.append(gold)
    return completions, golds


def ours():
    from posttrain.rewards import build_reward

    return build_reward({"name": "accuracy"})


def score_ours(reward, completions: list[str], golds: list[str]) -> list:
    out: list = []
    for i in range(0, len(completions), BATCH):
        out += reward(completions=completions[i : i + BATCH], answer=golds[i : i + BATCH])
    return out


def score_trl(completions: list[str], golds: list[str]) -> list:
    from trl.rewards import accuracy_reward

    out: list = []
    for i in range(0, len(completions), BATCH):
        chats = [[{"role": "assistant", "content": c}] for c in completions[i : i + BATCH]]
        out += accuracy_reward(chats, golds[i : i + BATCH])
    return out


def agreement(scores: list, labels: list[bool]) -> dict[str, float]:
    agree = sum(s is not None and bool(s) == label for s, label in zip(scores, labels, strict=True))
    return {
        "agree": agree / len(labels),
        "none": sum(s is None for s in scores) / len(labels),
        "n": len(labels),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=3000, help="realistic completions for the throughput figure")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import logging

    logging.getLogger("math_verify").setLevel(logging.ERROR)

    cases = [json.loads(line) for line in CASES.open()]
    completions = [c["completion"] for c in cases]
    golds = [c["gold"] for c in cases]
    labels = [c["correct"] for c in cases]

    started = time.perf_counter()
    warm = ours()
    warm(completions=["\\boxed{x+1}"], answer=["1+x"])  # starts the worker processes
    startup = time.perf_counter() - started
    results = {
        "labelled": {
            "posttrain": agreement(score_ours(ours(), completions, golds), labels),
            "trl": agreement(score_trl(completions, golds), labels),
        },  # fmt: skip
        "throughput": {},
        "worker_startup_s": startup,
    }
    texts, answers = realistic_completions(args.n)
    for name, run in (
        ("posttrain", lambda: score_ours(ours(), texts, answers)),
        ("trl", lambda: score_trl(texts, answers)),
    ):
        started = time.perf_counter()
        scores = run()
        seconds = time.perf_counter() - started
        results["throughput"][name] = {
            "samples_per_s": len(texts) / seconds,
            "seconds": seconds,
            "mean_reward": sum(s or 0 for s in scores) / len(scores),
            "none": sum(s is None for s in scores) / len(scores),
        }
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"labelled cases ({len(cases)}, {sum(labels)} correct): agreement with the human label")
    for name, r in results["labelled"].items():
        print(f"  {name:10s} agree {r['agree']:6.1%}   None {r['none']:6.1%}")
    print(f"throughput on {len(texts)} realistic completions (batches of {BATCH}; half are right)")
    for name, r in results["throughput"].items():
        print(
            f"  {name:10s} {r['samples_per_s']:8.1f} samples/s   mean reward {r['mean_reward']:.3f}   None {r['none']:.1%}"
        )
    print(f"posttrain worker start-up (once per process): {startup:.1f}s")


if __name__ == "__main__":
    sys.exit(main())
