"""Synthetic arithmetic: multi-digit addition and subtraction with a worked chain of thought.

The task every stage of the tiny demo learns offline. Each row holds

- `messages`: user prompt + assistant turn `<think>WORK</think><answer>N</answer>` (SFT),
- `prompt` (the user turn alone, conversational) and `answer` (RL and evaluation),
- `difficulty`: operand digits plus carries/borrows (curricula).

The chain of thought carries the whole computation, column by column from the units,
e.g. 28+35 -> `8+5=13;2+3+1=6` -> 63: a tiny model learns this far better than the bare
answer. Problems are split into train and test by a hash of the problem itself, so the
held-out split never overlaps train, whatever `n` and `seed`.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

TEST_FRACTION = 10  # one problem in TEST_FRACTION is held out
COUNTABLE = 200_000  # problem spaces up to this size are counted exactly (`split_size`)


def is_test_problem(a: int, op: str, b: int) -> bool:
    digest = hashlib.sha1(f"{a}{op}{b}".encode()).digest()
    return digest[0] % TEST_FRACTION == 0


def _digits(n: int) -> list[int]:
    return [int(c) for c in reversed(str(n))]


def add_steps(a: int, b: int) -> list[str]:
    """Column addition from the units: `8+5=13` then `2+3+1=6` (the +1 is the carry)."""
    da, db = _digits(a), _digits(b)
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x, y = (da[i] if i < len(da) else 0), (db[i] if i < len(db) else 0)
        total = x + y + carry
        steps.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={total}")
        carry = total // 10
    return steps


def sub_steps(a: int, b: int) -> list[str]:
    """Column subtraction of b from a >= b: `13-8=5` (borrowed) then `6-1-2=3` (paying it back)."""
    da, db = _digits(a), _digits(b)
    steps, borrow = [], 0
    for i in range(len(da)):
        x, y = da[i], (db[i] if i < len(db) else 0)
        need = x - borrow < y
        top = x + 10 if need else x
        steps.append(f"{top}" + (f"-{borrow}" if borrow else "") + f"-{y}={top - borrow - y}")
        borrow = 1 if need else 0
    return steps


def solve(a: int, op: str, b: int) -> tuple[str, int, int]:
    """The chain of thought, the answer, and the number of carries or borrows."""
    if op == "+":
        steps = add_steps(a, b)
        return ";".join(steps), a + b, sum("+1=" in s for s in steps)
    big, small = max(a, b), min(a, b)
    steps = sub_steps(big, small)
    prefix = [f"-({b}-{a})"] if a < b else []
    return ";".join(prefix + steps), a - b, sum(len(s.split("-")[0]) > 1 for s in steps)


def _operand(rng: random.Random, min_digits: int, digits: int) -> int:
    n = rng.randint(min_digits, digits)
    return rng.randint(0 if n == 1 else 10 ** (n - 1), 10**n - 1)


def make_row(a: int, op: str, b: int, cot: str = "columns") -> dict[str, Any]:
    work, answer, carries = solve(a, op, b)
    question = f"{a}{op}{b}="
    reply = f"<think>{work if cot == 'columns' else ''}</think><answer>{answer}</answer>"
    prompt = [{"role": "user", "content": question}]
    return {
        "prompt": prompt,
        "messages": [*prompt, {"role": "assistant", "content": reply}],
        "answer": str(answer),
        "difficulty": len(str(max(a, b))) + carries,
    }


def arithmetic_rows(
    n: int,
    split: str = "train",
    seed: int = 0,
    digits: int = 2,
    min_digits: int = 1,
    ops: tuple[str, ...] | list[str] = ("+", "-"),
    cot: str = "columns",
) -> list[dict[str, Any]]:
    """`n` problems of the given split; distinct while the problem space allows it."""
    rng = random.Random(f"arithmetic:{split}:{seed}")
    want_test = split == "test"
    rows, seen = [], set()
    tries = 0
    while len(rows) < n:
        tries += 1
        a, b = _operand(rng, min_digits, digits), _operand(rng, min_digits, digits)
        op = rng.choice(list(ops))
        if is_test_problem(a, op, b) != want_test:
            continue
        key = (a, op, b)
        if key in seen and tries < 50 * n:  # repeat only when the space is nearly exhausted
            continue
        seen.add(key)
        rows.append(make_row(a, op, b, cot))
    return rows


def split_size(
    split: str = "train",
    digits: int = 2,
    min_digits: int = 1,
    ops: tuple[str, ...] | list[str] = ("+", "-"),
) -> int | None:
    """How many distinct problems the split holds (asking `arithmetic_rows` for more repeats them),
    or None when the space is too large to count and holds more than anyone asks for."""
    operands = [
        x for n in range(min_digits, digits + 1) for x in range(0 if n == 1 else 10 ** (n - 1), 10**n)
    ]
    if len(operands) ** 2 * len(set(ops)) > COUNTABLE:
        return None
    want_test = split == "test"
    return sum(is_test_problem(a, op, b) == want_test for a in operands for b in operands for op in set(ops))
