"""Benchmark posttrain's `accuracy` reward against its own older version and trl's stock `accuracy_reward`.

    python bench/rewards_bench.py                      # 3 rounds x 3000 completions; prints a table
    python bench/rewards_bench.py --n 1000 --rounds 5 --json out.json

Three rewards, side by side in one run: posttrain's `accuracy` now, the same reward as it was at
`--baseline` (default f25f7a2: its accuracy.py, math_judge.py and pool.py loaded from git into a
temporary package, so the old code path lives only here), and trl's `accuracy_reward`. For each:
- agreement with hand-labelled cases (tests/data/answer_cases.jsonl: gold answer, completion,
  is it correct?) over many answer formats; a None verdict counts as a disagreement;
- throughput, in completions per second, on realistic completions (reasoning prose, then the
  final answer in `<answer>` tags or `\\boxed{}`, right or wrong, in several notations, nearly
  all distinct so the verdict cache never helps), scored in GRPO-sized batches of 64. The
  rewards take turns, and each round draws fresh completions (seed = round), so no worker's
  parse cache helps either. Ratios pair the runs of one round; the table gives their median;
- the same on the subset that no in-process fast path decides (what reaches math-verify);
- start-up: building the reward and getting the first verdict that needs math-verify.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import BASELINE, in_subprocess, machine, old_modules

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


def hard_forms(rng: random.Random) -> tuple[str, list[str], list[str]]:
    """Answers that need math-verify's parser (no in-process fast path reads them): constants, `=`,
    shorthand and mixed numbers, degrees, complex numbers, matrices, inequalities, `\\pm`."""
    a, b = rng.randint(2, 99), rng.randint(2, 9)
    kind = rng.randrange(10)
    forms = [
        (f"{a}\\pi", [f"\\pi {a}", f"{a} \\pi"], [f"{a + 1}\\pi", f"\\frac{{\\pi}}{{{a}}}"]),
        (f"e^{{{b}}}", [f"e^{b}"], [f"e^{{{b + 1}}}", f"{b}e"]),
        (str(a), [f"x = {a}", f"k={a}"], [f"x = {a + 1}"]),
        (f"\\frac{{1}}{{{b}}}", [f"\\frac1{b}"], [f"\\frac{b}1"]),
        (f"{a}.5", [f"{a}\\frac{{1}}{{2}}"], [f"{a}\\frac{{1}}{{4}}"]),
        (f"{a}^\\circ", [str(a), f"{a}^{{\\circ}}"], [str(a + 5)]),
        (f"{a} + {b}i", [f"{b}i + {a}"], [f"{a} - {b}i", f"{b} + {a}i"]),
        (
            f"\\begin{{pmatrix}} {a} \\\\ {b} \\end{{pmatrix}}",
            [f"\\begin{{pmatrix}}{a}\\\\{b}\\end{{pmatrix}}"],
            [f"\\begin{{pmatrix}}{b}\\\\{a}\\end{{pmatrix}}"],
        ),
        (f"x > {a}", [f"({a}, \\infty)"], [f"[{a}, \\infty)", f"({a + 1}, \\infty)"]),
        (f"\\{{-{a}, {a}\\}}", [f"\\pm {a}"], [f"\\pm {a + 1}", str(a)]),
    ]
    return forms[kind]


def realistic_completions(n: int, seed: int = 0, hard: bool = False) -> tuple[list[str], list[str]]:
    """`n` completions, half right; nearly every (gold, answer) pair is distinct (no cache hits).
    With `hard`, the answers are `hard_forms`, all of which go to math-verify."""
    rng = random.Random(seed)
    completions, golds = [], []
    for i in range(n):
        gold, right, wrong = hard_forms(rng) if hard else answer_forms(rng)
        pred = rng.choice(right if rng.random() < 0.5 else wrong)
        prose = PROSE * rng.randint(1, 6) + f"(attempt {i})"
        if rng.random() < 0.5:
            completions.append(f"<think>{prose}</think><answer>\\boxed{{{pred}}}</answer>")
        else:
            completions.append(f"{prose} So the final answer is $\\boxed{{{pred}}}$.")
        golds.append(gold)
    return completions, golds


OLD_FILES = ["rewards/accuracy.py", "rewards/math_judge.py", "rewards/pool.py", "rewards/pool_worker.py"]


def rewards(baseline: str) -> dict[str, Any]:
    """name -> a factory of fresh reward functions (a fresh verdict cache each call)."""
    from trl.rewards import accuracy_reward

    from posttrain.rewards import accuracy

    package = old_modules(
        baseline,
        OLD_FILES,
        f"accuracy_{baseline}",
        Path(tempfile.mkdtemp(prefix="rewards-bench-")),
        replace={'@register("accuracy"': f'@register("accuracy@{baseline}"'},
    )
    old = __import__(f"{package}.accuracy", fromlist=["accuracy"])
    return {
        "posttrain": accuracy.accuracy,
        f"posttrain@{baseline}": old.accuracy,
        "trl": lambda: _trl(accuracy_reward),
    }


def _trl(accuracy_reward: Any) -> Any:
    def reward(completions: list[str], answer: list[str]) -> list:
        return accuracy_reward([[{"role": "assistant", "content": c}] for c in completions], answer)

    return reward


def score(reward: Any, completions: list[str], golds: list[str]) -> list:
    out: list = []
    for i in range(0, len(completions), BATCH):
        out += reward(completions=completions[i : i + BATCH], answer=golds[i : i + BATCH])
    return out


def agreement(scores: list, labels: list[bool]) -> dict[str, float]:
    agree = sum(s is not None and bool(s) == label for s, label in zip(scores, labels, strict=True))
    return {
        "agree": agree / len(labels),
        "none": sum(s is None for s in scores) / len(labels),
        "n": len(labels),
    }


def startup(name: str, baseline: str) -> float:
    """Seconds from building the reward to its first verdict that needs math-verify, in this fresh
    process (libraries imported first, as in a trainer that has loaded its model)."""
    import trl.rewards  # noqa: F401

    make = rewards(baseline)[name]
    started = time.perf_counter()
    make()(completions=["<answer>e^{2}</answer>"], answer=["e^2"])
    return time.perf_counter() - started


def fast_path_share(completions: list[str], golds: list[str]) -> float:
    """The share of completions today's code decides in-process, without math-verify."""
    from posttrain.data_tools.answers import final_answer
    from posttrain.rewards.accuracy import gold_answer
    from posttrain.rewards.math_judge import quick_verdict

    preds = [final_answer(c) for c in completions]
    decided = [
        not p or quick_verdict(gold_answer(g), p) is not None for p, g in zip(preds, golds, strict=True)
    ]
    return sum(decided) / len(decided)


def throughput(makers: dict[str, Any], n: int, rounds: int, hard: bool) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {name: [] for name in makers}
    for round_ in range(rounds):
        texts, answers = realistic_completions(n, seed=100 * round_ + hard, hard=hard)
        for name, make in makers.items():
            reward = make()
            reward(completions=["<answer>e^{2}</answer>"], answer=["e^2"])  # workers up before the clock
            started = time.perf_counter()
            scores = score(reward, texts, answers)
            seconds = time.perf_counter() - started
            runs[name].append(
                {
                    "samples_per_s": len(texts) / seconds,
                    "n": len(texts),
                    "mean_reward": sum(s or 0 for s in scores) / len(scores),
                    "none": sum(s is None for s in scores) / len(scores),
                    "fast_path_share": fast_path_share(texts, answers),
                }
            )
    return runs


def summary(runs: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    first = next(iter(runs.values()))
    out = {}
    for name, rows in runs.items():
        out[name] = {
            "samples_per_s": statistics.median(r["samples_per_s"] for r in rows),
            "vs_posttrain": statistics.median(
                r["samples_per_s"] / b["samples_per_s"] for r, b in zip(rows, first, strict=True)
            ),
            "none": statistics.median(r["none"] for r in rows),
            "mean_reward": statistics.median(r["mean_reward"] for r in rows),
            "n": rows[0]["n"],
            "fast_path_share": rows[0]["fast_path_share"],
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=3000, help="realistic completions per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", default=BASELINE, help="the commit whose accuracy reward is 'before'")
    parser.add_argument(
        "--json", nargs="?", const="-", help="write the figures as JSON (to a file, or stdout)"
    )
    parser.add_argument("--startup", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import logging

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    if args.startup:
        print(json.dumps({"startup_s": startup(args.startup, args.baseline)}))
        return
    started: dict[str, list[float]] = {name: [] for name in ("posttrain", f"posttrain@{args.baseline}")}
    for _ in range(args.rounds):
        for name in started:
            run = in_subprocess(Path(__file__), ["--startup", name, "--baseline", args.baseline])
            started[name].append(run["startup_s"])
    makers = rewards(args.baseline)
    cases = [json.loads(line) for line in CASES.open()]
    labels = [c["correct"] for c in cases]
    labelled = {
        name: agreement(score(make(), [c["completion"] for c in cases], [c["gold"] for c in cases]), labels)
        for name, make in makers.items()
    }
    all_runs = throughput(makers, args.n, args.rounds, hard=False)
    hard_runs = throughput(makers, args.n // 3, args.rounds, hard=True)
    results = {
        "machine": machine(),
        "labelled": labelled,
        "throughput": summary(all_runs),
        "needs_math_verify": summary(hard_runs),
        "startup_s": {name: statistics.median(s) for name, s in started.items()},
        "runs": {"all": all_runs, "needs_math_verify": hard_runs, "startup_s": started},
    }
    if args.json:
        text = json.dumps(results, indent=2)
        print(text) if args.json == "-" else Path(args.json).write_text(text)
    print(f"machine: {results['machine']}")
    print(f"labelled cases ({len(cases)}, {sum(labels)} correct): agreement with the human label")
    for name, r in labelled.items():
        print(f"  {name:18s} agree {r['agree']:6.1%}   None {r['none']:6.1%}")
    for key, title in (("throughput", "realistic"), ("needs_math_verify", "forms only math-verify reads")):
        table = results[key]
        n = next(iter(table.values()))["n"]
        share = next(iter(table.values()))["fast_path_share"]
        print(
            f"throughput, {title} ({n} completions a round, {args.rounds} rounds, batches of {BATCH}; "
            f"{share:.0%} decided without math-verify)"
        )
        for name, r in table.items():
            print(
                f"  {name:18s} {r['samples_per_s']:8.1f} samples/s  ({r['vs_posttrain']:.3f} x posttrain)"
                f"   mean reward {r['mean_reward']:.3f}   None {r['none']:.1%}"
            )
    for name, seconds in results["startup_s"].items():
        print(f"start-up to the first math-verify verdict, {name}: {seconds:.2f}s")


if __name__ == "__main__":
    sys.exit(main())
