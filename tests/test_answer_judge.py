"""The accuracy reward's judge: in-process fast paths agree with math-verify, ANTLR's two-stage parse,
adversarial LaTeX in bounded time, and the worker pool (lazy start, a spare after a kill)."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from posttrain.data_tools.answers import final_answer
from posttrain.rewards import build_reward
from posttrain.rewards.exact_math import verdict
from posttrain.rewards.math_judge import clean, equivalent, quick_verdict
from posttrain.rewards.pool import OK, TIMEOUT, WorkerPool

CASES = [json.loads(line) for line in (Path(__file__).parent / "data" / "answer_cases.jsonl").open()]
ADVERSARIAL = {
    "tower": "9^{9^{9^{9}}}",
    "power tower of tens": "10^{10^{10}}",
    "huge power": "(x+1)^{100000}",
    "unclosed fractions": "\\frac{1}{" * 300,
    "nested roots": "\\sqrt{" * 300 + "2" + "}" * 300,
    "nested parentheses": "(" * 300 + "1" + ")" * 300,
    "nested braces": "{" * 40 + "1" + "}" * 40,
    "left without right": "\\left(" * 300,
    "long sum": "x" + "+x" * 400,
    "wide matrix": "\\begin{matrix}" + "1&" * 300 + "\\end{matrix}",
    "integral": "\\int_0^\\infty e^{-x^2} dx",
    "huge sum": "\\sum_{n=1}^{10^{12}} n",
    "factorial": "100000!",
    "sine of a huge number": "\\sin(10^{100000})",
    "control characters": "\x00\udcff\u202e",
    "many digits": "9" * 900,
}


def random_expression(rng: random.Random, depth: int = 0):
    import sympy

    if depth >= 3 or rng.random() < 0.3:
        pick = rng.random()
        if pick < 0.5:
            return sympy.Integer(rng.randint(0, 12))
        return rng.choice(sympy.symbols("x n")) if pick < 0.8 else sympy.sqrt(rng.randint(2, 20))
    a, b = random_expression(rng, depth + 1), random_expression(rng, depth + 1)
    op = rng.randrange(5)
    if op == 3 and b != 0:
        return a / b
    return [a + b, a - b, a * b, a / 2, a ** rng.randint(0, 3)][op]


def notations(expr) -> list[str]:
    """The expression as sympy writes it in LaTeX and in plain text, expanded, factored, together."""
    import sympy

    forms = {sympy.latex(expr), str(expr).replace("**", "^")}
    forms |= {sympy.latex(f(expr)) for f in (sympy.expand, sympy.factor, sympy.together)}
    return sorted(f for f in forms if "zoo" not in f and "nan" not in f)


def test_the_fast_path_agrees_with_math_verify_wherever_it_answers() -> None:
    """Random expressions in several notations (same or different), intervals, sets and the labelled
    cases: where `exact_math` decides, math-verify decides the same."""
    rng = random.Random(0)
    pairs = []
    for _ in range(150):
        a = random_expression(rng)
        b = random_expression(rng) if rng.random() < 0.4 else a
        pairs.append((rng.choice(notations(a)), rng.choice(notations(b))))
    for _ in range(40):
        lo, hi = rng.randint(-9, 9), rng.randint(10, 20)
        brackets = [rng.choice("(["), rng.choice(")]")]
        gold = f"{brackets[0]}{lo}, {hi}{brackets[1]}"
        pairs.append((gold, f"{rng.choice('([')}{lo},{hi + rng.randint(0, 1)}{rng.choice(')]')}"))
        pairs.append((f"\\{{{lo}, {hi}\\}}", f"\\{{{hi},{lo + rng.randint(0, 1)}\\}}"))
    pairs += [(c["gold"], final_answer(c["completion"]) or "") for c in CASES]
    decided = [(g, p, v) for g, p in pairs if p and (v := verdict(clean(g), clean(p))) is not None]
    wrong = [(g, p, v) for g, p, v in decided if v != equivalent(g, p)]
    assert not wrong
    assert len(decided) > 0.5 * len(pairs) and {v for _, _, v in decided} == {True, False}


@pytest.mark.parametrize(
    ("gold", "pred"),
    [
        ("1/2x", "0.5x"),  # (1/2)x or 1/(2x): graders differ
        ("1.5", "1\\frac{1}{2}"),  # a mixed number, not 1 * 1/2
        ("e^{2}", "e^2"),  # Euler's number
        ("x^23", "x^{23}"),  # LaTeX reads x^2 * 3
        ("f(x)", "f(x)"),  # a letter before a parenthesis may be a function
        ("0.333", "1/3"),  # decimals: math-verify rounds to the precision written
        ("\\sqrt{x^2}", "x"),  # a radical of a variable
        ("x + 1", "n + 1"),  # different variables
        ("(-\\infty, 3)", "[-\\infty, 3)"),  # only an infinite end's bracket differs
        ("1, 2", "2, 1"),  # a bare list
    ],
)
def test_the_fast_path_leaves_ambiguous_forms_to_math_verify(gold: str, pred: str) -> None:
    assert verdict(clean(gold), clean(pred)) is None


def test_quick_verdicts_cover_identity_currency_radicals_intervals_and_sets() -> None:
    assert quick_verdict("20276", "\\$20276") is True and quick_verdict("e^{2}", " e^{2} ") is True
    assert quick_verdict("3\\sqrt{2}", "\\sqrt{18}") is True
    assert quick_verdict("x^2+2x+1", "(x+1)^2") is True and quick_verdict("x^2+2x+1", "(x-1)^2") is False
    assert quick_verdict("(1, 2]", "(1,2]") is True and quick_verdict("(1, 2]", "[1,2]") is False
    assert (
        quick_verdict("\\{1, 2\\}", "\\{2,1\\}") is True and quick_verdict("\\{1,2\\}", "\\{1,3\\}") is False
    )


def test_two_stage_parsing_tries_sll_and_falls_back_to_ll(monkeypatch) -> None:
    """latex2sympy parses with ANTLR's SLL prediction first; an input SLL cannot parse is parsed again
    with LL, and the result is the same expression either way."""
    import sympy
    from antlr4.atn.PredictionMode import PredictionMode
    from latex2sympy2_extended import latex2sympy2
    from latex2sympy2_extended.latex2sympy2 import latex2sympy

    from posttrain.rewards.math_judge import _two_stage_parsing

    _two_stage_parsing()
    modes: list = []
    create = latex2sympy2._Latex2Sympy.create_parser

    def recording(self, latex):
        parser = create(self, latex)
        modes.append(parser._interp.predictionMode)
        return parser

    monkeypatch.setattr(latex2sympy2._Latex2Sympy, "create_parser", recording)
    assert latex2sympy("\\frac{1}{2}") == sympy.Rational(1, 2) and modes == [PredictionMode.SLL]
    modes.clear()
    x = sympy.Symbol("x", real=True)
    assert sympy.simplify(latex2sympy("x^2 + 2x + 1", is_real=True) - (x + 1) ** 2) == 0
    assert modes == [PredictionMode.SLL, PredictionMode.LL]  # SLL reports an error here; LL parses


def test_adversarial_latex_is_scored_in_bounded_time() -> None:
    """Every adversarial answer gets 0.0 or None (a timeout), never an exception or a hang; the ones
    built to choke the parser are rejected unparsed; the in-process fast path stays fast on all."""
    for text in ADVERSARIAL.values():
        started = time.perf_counter()
        assert verdict(clean(text), "4") is None
        assert time.perf_counter() - started < 0.05
    reward = build_reward({"name": "accuracy", "timeout": 2.0})
    logged: dict[str, float] = {}
    completions = [f"<think>x</think><answer>{t}</answer>" for t in ADVERSARIAL.values() for _ in range(2)]
    golds = ["4", "x+1"] * len(ADVERSARIAL)
    started = time.perf_counter()
    scores = reward(completions=completions, answer=golds, log_metric=lambda k, v: logged.__setitem__(k, v))
    assert time.perf_counter() - started < 30
    assert set(scores) <= {0.0, None}
    assert logged["rewards/accuracy/rejected"] >= 12  # towers, huge exponents, deep nesting
    assert logged["rewards/accuracy/timeouts"] <= 4


def test_no_none_for_a_parseable_gold_answer() -> None:
    """Answers only math-verify reads (constants, `=`, shorthand, degrees, complex numbers, matrices,
    inequalities), right and wrong: each gets 1.0 or 0.0, never None."""
    pairs = [
        ("7\\pi", "\\pi 7", 1.0), ("7\\pi", "8\\pi", 0.0), ("e^{3}", "e^3", 1.0), ("e^{3}", "3e", 0.0),
        ("12", "x = 12", 1.0), ("\\frac{1}{4}", "\\frac14", 1.0), ("3.5", "3\\frac{1}{2}", 1.0),
        ("40^\\circ", "40", 1.0), ("3 + 4i", "4i + 3", 1.0), ("3 + 4i", "3 - 4i", 0.0),
        ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}2\\\\1\\end{pmatrix}", 0.0),
        ("x > 5", "(5, \\infty)", 1.0), ("\\{-3, 3\\}", "\\pm 3", 1.0),
    ]  # fmt: skip
    reward = build_reward({"name": "accuracy"})
    scores = reward(
        completions=[f"<answer>{p}</answer>" for _, p, _ in pairs], answer=[g for g, _, _ in pairs]
    )
    assert scores == [expected for _, _, expected in pairs]


def test_the_pool_starts_only_when_an_answer_needs_math_verify(monkeypatch) -> None:
    """A run whose answers are all numbers never starts the workers (they would compete with
    training for the CPU while they import)."""
    import posttrain.rewards.accuracy as accuracy
    import posttrain.rewards.pool as pools
    from posttrain.rewards.pool import shared_pool

    monkeypatch.setattr(accuracy, "JUDGE", "slow_judge:equivalent")  # a pool of its own
    monkeypatch.setattr(pools, "_POOLS", {})  # not one an earlier test of this process started
    reward = build_reward({"name": "accuracy"})
    assert reward(completions=["<answer>4</answer>", "<answer>5</answer>"], answer=["4", "4"]) == [1.0, 0.0]
    assert shared_pool("slow_judge:equivalent")._workers == []
    assert reward(completions=["<answer>y</answer>"], answer=["x"]) == [0.0]  # for the pool to judge
    assert len(shared_pool("slow_judge:equivalent")._workers) > 0
    shared_pool("slow_judge:equivalent").close()  # this test's own pool: atexit sees the real dict


def test_a_pool_that_killed_a_worker_keeps_a_spare_for_the_next() -> None:
    pool = WorkerPool("time:sleep", processes=1)
    try:
        assert [o.status for o in pool.map([(60,)], timeout=1.0)] == [TIMEOUT]
        spare = pool._spare
        assert spare is not None
        deadline = time.monotonic() + 60
        while not spare.conn.poll(0.1) and time.monotonic() < deadline:
            pass  # the spare has imported and said so
        started = time.perf_counter()
        assert [o.status for o in pool.map([(60,), (0,)], timeout=1.0)] == [TIMEOUT, OK]
        assert pool._workers == [spare] or spare in pool._workers
        assert time.perf_counter() - started < 5  # the spare took over at once
        assert pool.restarts == 2
    finally:
        pool.close()
