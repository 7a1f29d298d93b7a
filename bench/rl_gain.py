"""Did RL help? Greedy accuracy and sampled pass@1 of each stage's model on held-out problems.

    posttrain run recipes/demo.yaml
    python bench/rl_gain.py runs/demo --stages sft grpo          # 200 test problems, k=4, T=0.6

pass@1 is DeepSeek-R1's: the mean accuracy of k samples per problem at temperature 0.6; RL
gains often show there before they show in greedy decoding. Problems come from the same
held-out split the recipe's `eval:` uses (never seen in training).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def evaluate(model_dir: Path, rows: list[dict], k: int, temperature: float, max_new_tokens: int) -> dict:
    import torch

    from posttrain.data_tools import extract_answer
    from posttrain.generation import generate, render_prompts
    from posttrain.models import load_causal_lm, load_tokenizer
    from posttrain.recipe import PathModel

    source = PathModel(path=str(model_dir))
    tokenizer, model = load_tokenizer(source), load_causal_lm(source).eval()
    prompts = render_prompts(tokenizer, [r["prompt"] for r in rows])
    answers = [str(r["answer"]) for r in rows]
    started = time.perf_counter()
    greedy, _ = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=64)
    torch.manual_seed(0)
    sampled, _ = generate(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=64,
        num_return_sequences=k, do_sample=True, temperature=temperature,
    )  # fmt: skip
    greedy_right = sum(extract_answer(g[0]) == a for g, a in zip(greedy, answers, strict=True))
    sampled_right = sum(
        extract_answer(s) == a for group, a in zip(sampled, answers, strict=True) for s in group
    )
    return {
        "greedy_accuracy": greedy_right / len(rows),
        f"pass@1 (k={k}, T={temperature})": sampled_right / (k * len(rows)),
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--stages", nargs="+", default=["sft", "grpo"])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--digits", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    from posttrain.data_tools import arithmetic_rows

    rows = arithmetic_rows(args.n, split="test", seed=0, digits=args.digits)
    results = {
        stage: evaluate(args.run_dir / stage / "model", rows, args.k, args.temperature, args.max_new_tokens)
        for stage in args.stages
    }
    text = json.dumps(results, indent=2)
    if args.json:
        args.json.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
