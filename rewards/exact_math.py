"""Exact verdicts for answers simple enough to need no LaTeX parser, decided in-process in microseconds.

math-verify parses LaTeX with an ANTLR grammar run in pure Python (5 to 30 ms an answer) before
sympy compares; most answers a model writes are far simpler. `verdict(gold, pred)` reads both
(already `clean`ed, see math_judge.py) with a small recursive-descent parser and answers only
when it can be sure:

- a constant is evaluated exactly as a Fraction, or as a 60-digit Decimal once a square root of
  a non-square appears;
- an expression in one-letter variables is compared at three fixed rational points: two rational
  functions that differ at a point differ, and two that agree at three unrelated points are equal
  (a nonzero rational function of small degree vanishes there only by coincidence);
- `(a, b]`-style brackets around two entries are an interval (or a point); `\\{a, b\\}` is a set.

Everything else returns None and math-verify decides in the worker pool: decimals (math-verify
rounds to the precision written), `=`, words, `e`, `i`, `\\pi`, a mixed number `1\\frac{1}{2}`,
`1/2x` (juxtaposition next to a division), a radical of a variable, an exponent over 12.
The test suite checks the property that matters: wherever this module answers, math-verify
gives the same answer. Work is bounded (tokens, nesting, exponent, number size): no input can
make it slow, which matters because it runs in the caller's thread, without a timeout.
"""

from __future__ import annotations

import re
from decimal import Context, Decimal, localcontext
from fractions import Fraction
from typing import Union

Value = Union[Fraction, Decimal]  # noqa: UP007  (a runtime alias; py3.10 lacks `type X = ...`)

MAX_TOKENS = 120
MAX_DEPTH = 30
MAX_EXPONENT = 12
MAX_BITS = 512  # numerator or denominator beyond this: not "simple", math-verify's call
DECIMALS = Context(prec=60)
EQUAL, DIFFERENT = Decimal("1e-40"), Decimal("1e-20")  # relative gaps for Decimal values
# The points at which expressions are compared: variable number i of point k gets
# ±PRIMES[...] / PRIMES[...], distinct and unrelated, so that no small polynomial with small
# coefficients vanishes at all of them by accident.
PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53)
POINTS = 4
TOKEN = re.compile(r"\s+|\\[,;:! ]|~|\d+\.\d*|\.\d+|\d+|\\[A-Za-z]+|\\[{}]|[A-Za-z]|[-+*/^()\[\]{},]|.")
SKIP = {"\\,", "\\;", "\\:", "\\!", "\\ ", "~"}
TIMES = {"*", "\\cdot", "\\times"}
DIVIDE = {"/", "\\div"}
RESERVED = set("eEiI")  # Euler's number and the imaginary unit to math-verify
INFINITY = "\\infty"


class Undecided(Exception):
    """The input is outside what this module decides: math-verify's call."""


def verdict(gold: str, pred: str) -> bool | None:
    """True / False when both answers are simple enough to decide exactly; None otherwise."""
    try:
        with localcontext(DECIMALS):  # every Decimal operation at 60 digits
            return _compare(read(gold), read(pred))
    except (Undecided, ZeroDivisionError, ArithmeticError, RecursionError):
        return None


# --------------------------------------------------------------------------- reading


def read(text: str) -> tuple:
    """("expr", node) | ("set", [node, ...]) | ("interval", "(", low, high, "]"); raises Undecided."""
    tokens = [t for t in TOKEN.findall(text) if not t.isspace() and t not in SKIP]
    tokens = [t for t in tokens if t not in ("\\left", "\\right")]
    if not tokens or len(tokens) > MAX_TOKENS:
        raise Undecided
    parser = _Parser(tokens)
    if tokens[0] == "\\{" and tokens[-1] == "\\}":
        parser.pos = 1
        items = parser.items("\\}")
        return ("set", [_constant(i) for i in items])
    if tokens[0] in "([" and tokens[-1] in ")]" and "," in tokens:
        parser.pos = 1
        items = parser.items(tokens[-1], endpoints=True)
        if len(items) != 2:
            raise Undecided  # a tuple of three or more: math-verify's call
        return ("interval", tokens[0], *items, tokens[-1])
    node = parser.expr()
    parser.done()
    return ("expr", node)


class _Parser:
    """expr := term (+|- term)*; term := unary ((*|/|juxtaposed) unary)*; unary := -unary | power;
    power := atom (^ exponent)?; atom := number | letter | (expr) | {expr} | \\frac{}{} | \\sqrt{}."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.pos = 0
        self.depth = 0

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        token = self.peek()
        if token is None or (expected is not None and token != expected):
            raise Undecided
        self.pos += 1
        return token

    def done(self) -> None:
        if self.pos != len(self.tokens):
            raise Undecided

    def items(self, closer: str, endpoints: bool = False) -> list:
        found = [self.endpoint() if endpoints else self.expr()]
        while self.peek() == ",":
            self.take()
            found.append(self.endpoint() if endpoints else self.expr())
        self.take(closer)
        self.done()
        return found

    def endpoint(self) -> tuple:
        """An interval's end: an expression, or `\\infty` / `-\\infty`."""
        sign = "+"
        if self.peek() in ("+", "-") and self.tokens[self.pos + 1 : self.pos + 2] == [INFINITY]:
            sign = self.take()
        if self.peek() == INFINITY:
            self.take()
            return ("inf", sign)
        return self.expr()

    def expr(self) -> tuple:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise Undecided
        node = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            node = ("add" if op == "+" else "sub", node, self.term())
        self.depth -= 1
        return node

    def term(self) -> tuple:
        node, previous = self.unary(), None
        divided = juxtaposed = False
        while True:
            token = self.peek()
            if token in TIMES or token in DIVIDE:
                self.take()
                divided |= token in DIVIDE
                node = ("div" if token in DIVIDE else "mul", node, self.unary())
            elif token is not None and self._juxtaposes(previous or node, token):
                juxtaposed = True
                node = ("mul", node, self.power())
            else:
                break
            previous = node[2]
            if divided and juxtaposed:
                raise Undecided  # `1/2x`: (1/2)x or 1/(2x)? graders differ
        return node

    def _juxtaposes(self, left: tuple, token: str) -> bool:
        """`2x`, `3\\sqrt{2}`, `x(x+1)`... no: a letter before `(` may be a function, a number
        before `\\frac` a mixed number (1 1/2), two numbers side by side a typo."""
        if token == "\\frac":
            if left[0] == "num":
                raise Undecided
            return True
        if token == "\\sqrt" or (len(token) == 1 and token.isalpha()):
            return True
        if token == "(":
            return left[0] != "var"
        return False

    def unary(self) -> tuple:
        if self.peek() in ("-", "+"):
            sign = self.take()
            operand = self.unary()
            return ("neg", operand) if sign == "-" else operand
        return self.power()

    def power(self) -> tuple:
        base = self.atom()
        if self.peek() != "^":
            return base
        self.take()
        token = self.peek()
        if token == "{":
            self.take()
            exponent = self.expr()
            self.take("}")
        elif token is not None and (token.isdigit() and len(token) == 1):
            exponent = ("num", Fraction(int(self.take())))
        else:
            raise Undecided  # `x^23` is x^2 * 3 in LaTeX; `x^-1`, `x^n`: math-verify's call
        return ("pow", base, _small_integer(exponent))

    def atom(self) -> tuple:
        token = self.take()
        if token.isdigit():
            if len(token) > 40:
                raise Undecided
            return ("num", Fraction(int(token)))
        if len(token) == 1 and token.isalpha():
            if token in RESERVED:
                raise Undecided
            return ("var", token)
        if token in ("(", "{"):
            inner = self.expr()
            self.take(")" if token == "(" else "}")
            return inner
        if token == "\\frac":
            return ("div", self.braced(), self.braced())
        if token == "\\sqrt":
            return ("sqrt", _constant(self.braced()))
        raise Undecided  # a decimal, a command, a symbol this module does not read

    def braced(self) -> tuple:
        self.take("{")
        inner = self.expr()
        self.take("}")
        return inner


def _small_integer(node: tuple) -> int:
    if _variables(node):
        raise Undecided
    value = _evaluate(node, {})
    if not isinstance(value, Fraction) or value.denominator != 1 or abs(value) > MAX_EXPONENT:
        raise Undecided
    return int(value)


def _constant(node: tuple) -> tuple:
    if _variables(node):
        raise Undecided  # a radical of a variable, a set of expressions: math-verify's call
    return node


def _variables(node: tuple) -> set[str]:
    if node[0] == "var":
        return {node[1]}
    return set().union(*(_variables(n) for n in node[1:] if isinstance(n, tuple)))


# --------------------------------------------------------------------------- evaluating


def _evaluate(node: tuple, env: dict[str, Fraction]) -> Value:
    kind = node[0]
    if kind == "num":
        return node[1]
    if kind == "var":
        return env[node[1]]
    if kind == "inf":
        raise Undecided
    if kind == "neg":
        return -_evaluate(node[1], env)
    if kind == "sqrt":
        return _sqrt(_evaluate(node[1], env))
    if kind == "pow":
        base = _evaluate(node[1], env)
        return _bounded(base ** node[2])
    left, right = _lift(_evaluate(node[1], env), _evaluate(node[2], env))
    if kind == "add":
        return _bounded(left + right)
    if kind == "sub":
        return _bounded(left - right)
    if kind == "mul":
        return _bounded(left * right)
    return _bounded(left / right)  # "div"; ZeroDivisionError (or Decimal's) ends the verdict


def _sqrt(value: Value) -> Value:
    if value < 0:
        raise Undecided  # complex: math-verify's call
    if isinstance(value, Fraction):
        num, den = _isqrt(value.numerator), _isqrt(value.denominator)
        if num is not None and den is not None:
            return Fraction(num, den)
        value = _decimal(value)
    return value.sqrt()


def _isqrt(n: int) -> int | None:
    import math

    root = math.isqrt(n)
    return root if root * root == n else None


def _decimal(value: Fraction) -> Decimal:
    return Decimal(value.numerator) / Decimal(value.denominator)


def _lift(a: Value, b: Value) -> tuple[Value, Value]:
    if isinstance(a, Decimal) or isinstance(b, Decimal):
        return (a if isinstance(a, Decimal) else _decimal(a)), (b if isinstance(b, Decimal) else _decimal(b))
    return a, b


def _bounded(value: Value) -> Value:
    if (
        isinstance(value, Fraction)
        and max(abs(value.numerator).bit_length(), value.denominator.bit_length()) > MAX_BITS
    ):
        raise Undecided
    if isinstance(value, Decimal) and not value.is_finite():
        raise Undecided
    return value


# --------------------------------------------------------------------------- comparing


def _compare(gold: tuple, pred: tuple) -> bool | None:
    if gold[0] != pred[0]:
        return None
    if gold[0] == "expr":
        return _same_expression(gold[1], pred[1])
    if gold[0] == "set":
        values = [[_evaluate(n, {}) for n in side[1]] for side in (gold, pred)]
        return _same_sets(*values)
    return _same_interval(gold, pred)


def _same_values(a: Value, b: Value) -> bool | None:
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        return a == b
    a, b = _lift(a, b)
    gap = abs(a - b) / max(Decimal(1), abs(a), abs(b))
    return True if gap <= EQUAL else False if gap > DIFFERENT else None


def _same_expression(gold: tuple, pred: tuple) -> bool | None:
    names = sorted(_variables(gold))
    if names != sorted(_variables(pred)):
        return None  # `x + 1` against `n + 1`: math-verify's call
    return _at_points(gold, pred, names)


def _point(k: int, names: list[str]) -> dict[str, Fraction]:
    n = len(PRIMES)
    return {
        name: (-1) ** (i + k) * Fraction(PRIMES[(7 * k + 3 * i + 4) % n], PRIMES[(5 * k + 2 * i + 1) % n])
        for i, name in enumerate(names)
    }


def _at_points(gold: tuple, pred: tuple, names: list[str]) -> bool | None:
    """Unequal at one point: different. Equal at three (a point that divides by zero is skipped):
    the same expression. A constant needs one evaluation."""
    agreed = 0
    for k in range(POINTS if names else 1):
        env = _point(k, names)
        try:
            same = _same_values(_evaluate(gold, env), _evaluate(pred, env))
        except ZeroDivisionError:
            continue
        if same is not True:
            return same
        agreed += 1
    return True if agreed >= (3 if names else 1) else None


def _same_sets(gold: list[Value], pred: list[Value]) -> bool | None:
    for left, right in ((gold, pred), (pred, gold)):
        for a in left:
            matches = [_same_values(a, b) for b in right]
            if True in matches:
                continue
            return None if None in matches else False
    return True


def _same_interval(gold: tuple, pred: tuple) -> bool | None:
    _, g_open, g_low, g_high, g_close = gold
    _, p_open, p_low, p_high, p_close = pred
    ends = []
    for g, p in ((g_low, p_low), (g_high, p_high)):
        if g[0] == "inf" or p[0] == "inf":
            ends.append(g == p)
        else:
            ends.append(_same_values(_evaluate(_constant(g), {}), _evaluate(_constant(p), {})))
    if False in ends:
        return False
    if None in ends:
        return None
    for g_bracket, p_bracket, end in ((g_open, p_open, g_low), (g_close, p_close, g_high)):
        if g_bracket != p_bracket and end[0] != "inf":
            return False  # `(1, 2]` against `[1, 2]`
    return True if (g_open, g_close) == (p_open, p_close) else None  # `[-\\infty, 3)`: math-verify's call
