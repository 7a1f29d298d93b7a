"""The synthetic arithmetic task: correct worked steps, disjoint splits, deterministic rows."""

from __future__ import annotations

import re

import pytest

from posttrain.data_tools import arithmetic_rows, extract_answer
from posttrain.data_tools.arithmetic import add_steps, is_test_problem, make_row, sub_steps


def test_column_addition_carries():
    assert add_steps(28, 35) == ["8+5=13", "2+3+1=6"]
    assert add_steps(95, 17) == ["5+7=12", "9+1+1=11"]
    assert add_steps(3, 17) == ["3+7=10", "0+1+1=2"]


def test_column_subtraction_borrows():
    assert sub_steps(63, 28) == ["13-8=5", "6-1-2=3"]
    assert sub_steps(100, 1) == ["10-1=9", "10-1-0=9", "1-1-0=0"]


@pytest.mark.parametrize("a, op, b", [(28, "+", 35), (31, "-", 69), (7, "-", 7), (99, "+", 99), (5, "-", 38)])
def test_rows_have_the_r1_format_and_the_true_answer(a, op, b):
    row = make_row(a, op, b)
    reply = row["messages"][-1]["content"]
    assert re.fullmatch(r"<think>[^<]+</think><answer>-?\d+</answer>", reply)
    assert extract_answer(reply) == row["answer"] == str(a + b if op == "+" else a - b)
    assert row["prompt"] == row["messages"][:1] and row["prompt"][0]["content"] == f"{a}{op}{b}="


def test_every_worked_step_is_true_arithmetic():
    for row in arithmetic_rows(300, digits=3, seed=3):
        work = extract_think(row["messages"][-1]["content"])
        for step in work.split(";"):
            if step.startswith("-("):
                continue
            lhs, rhs = step.split("=")
            assert eval(lhs) == int(rhs), step  # noqa: S307 (digits and +/- only)


def extract_think(text: str) -> str:
    return text.split("<think>")[1].split("</think>")[0]


def test_test_split_never_overlaps_train():
    train = {r["prompt"][0]["content"] for r in arithmetic_rows(5000, seed=1)}
    test = {r["prompt"][0]["content"] for r in arithmetic_rows(300, split="test", seed=2)}
    assert len(test) == 300 and not train & test
    assert all(is_test_problem(*parse(p)) for p in test)


def parse(prompt: str) -> tuple[int, str, int]:
    m = re.fullmatch(r"(\d+)([+-])(\d+)=", prompt)
    return int(m[1]), m[2], int(m[3])


def test_rows_are_deterministic_per_seed_and_distinct():
    assert arithmetic_rows(50, seed=4) == arithmetic_rows(50, seed=4)
    assert arithmetic_rows(50, seed=4) != arithmetic_rows(50, seed=5)
    prompts = [r["prompt"][0]["content"] for r in arithmetic_rows(1000, seed=4)]
    assert len(set(prompts)) == len(prompts)


def test_options_shape_the_problems():
    rows = arithmetic_rows(100, digits=3, min_digits=3, ops=["+"], cot="none")
    for row in rows:
        a, op, b = parse(row["prompt"][0]["content"])
        assert op == "+" and 100 <= a <= 999 and 100 <= b <= 999
        assert row["messages"][-1]["content"].startswith("<think></think>")
