"""Is a predicted final answer equivalent to the gold one? math-verify, fed the way a grader reads.

`equivalent(gold, pred)` runs inside the verification worker processes (`pool.py`), which
enforce the timeout: math-verify is called with its own signal-based timeouts off, so it
works from any thread. `quick_verdict` decides the simple cases in the caller's process
first: exact rationals here, simple expressions, intervals and sets in `exact_math.py`.

Parsing is most of math-verify's cost, and most of that is ANTLR's full-context (LL)
prediction in latex2sympy's generated parser; `_two_stage_parsing` makes it try ANTLR's SLL
mode first and fall back to LL on an error, ANTLR's documented two-stage strategy: SLL
either returns the parse tree LL would or reports an error, so verdicts do not change and
parsing takes half the time. Both sides are already isolated final answers (see
`posttrain.data_tools.answers.final_answer`), so they are parsed as one whole expression
(wrapped in `\\boxed{}`) rather than searched for anchors the way math-verify's default
`parse` does; that search is what turns a plain gold `1/(n+1)` into `1` and `(1, 2]` into `2`.

What it adds around math-verify, each case a grader accepts:
- plain-text answers (`Tuesday`, `yes`) compare as normalised text, not as a product of symbols;
- a trailing unit word (`5 dollars`, `12 apples`) or `\\text{}` unit is dropped, and so is a
  dollar sign before a number (`\\$20`);
- `50%` matches `50` and `0.5`, whichever side has the percent sign;
- thousands separators (`1,000`, `1{,}000`, `1\\,000`) are removed from plain numbers;
- `x = 5` matches `5`, multiple-choice `(B)` matches `B`, `two` matches `2`.
"""

from __future__ import annotations

import logging
import re
from decimal import Decimal
from fractions import Fraction
from functools import cache, lru_cache
from typing import Any

from posttrain.rewards import exact_math

# Words that are mathematics, not prose, when they appear in an answer.
MATH_WORDS = {
    "sqrt", "frac", "dfrac", "tfrac", "pi", "sin", "cos", "tan", "cot", "sec", "csc", "log", "ln", "exp",
    "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh", "infty", "inf", "cdot", "times", "div", "pm",
    "mp", "le", "ge", "leq", "geq", "neq", "cup", "cap", "emptyset", "varnothing", "left", "right",
    "circ", "degree", "degrees", "text", "mathrm", "mathbf", "boxed", "binom", "choose", "mod", "pmod",
    "and", "or", "max", "min", "det", "gcd", "lcm", "abs", "operatorname", "overline", "vec", "hat",
}  # fmt: skip
THOUSANDS = re.compile(r"^[-+]?\d{1,3}(?:(?:,|\{,\}|\\,|\\!| )\d{3})+(?:\.\d+)?$")
THOUSANDS_SEPARATOR = re.compile(r"\{,\}|\\,|\\!|,| ")
RATIONAL = re.compile(
    r"^(?P<sign>[-+]?)(?:(?P<number>\d+(?:\.\d*)?|\.\d+)"
    r"|\\frac\{(?P<fnum>\d+)\}\{(?P<fden>\d+)\}|(?P<num2>\d+)/(?P<den2>\d+))$"
)
MAX_NESTING = 8  # math-verify's parse of nested braces: 0.2 s at 5 levels, 0.5 s at 10, 200 s at 20
HUGE_EXPONENT = re.compile(r"\^\s*\{?\s*[-+]?\d{4,}")  # x^{1000} and more
TOWER = re.compile(r"\^\s*\{[^{}]*\^")  # an exponent with an exponent in it
LONG_DECIMAL = re.compile(r"\.\d{4,}")  # 0.3333: possibly a rounded 1/3, math-verify's call
SCIENTIFIC = re.compile(r"^[-+]?(?:\d+(?:\.\d*)?|\.\d+)[eE][-+]?\d{1,4}$")
NUMBER_WITH_UNIT = re.compile(r"^\\?\$?\s*([-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+))\s*([A-Za-z][A-Za-z .]*)$")
CURRENCY = re.compile(r"^\\?\$\s*(?=[-+]?\.?\d)")  # `\$20` or `$20`, a dollar sign before a number
PERCENT = re.compile(r"\s*(?:\\%|%|\\text\{\s*\\?%\s*\}|\s[Pp]ercent)\s*$")
CHOICE = re.compile(r"^\(?\s*([A-Ha-h])\s*\)?[.:]?$")
WORD = re.compile(r"(?<!\\)\b[A-Za-z]{2,}\b")
LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")
TEXT_COMMAND = re.compile(r"\\(?:text|mathrm|textbf|mathbf|operatorname)\s*\{([^{}]*)\}")
WRAPPED_TEXT = re.compile(r"^\\(?:text|textbf|textrm|mathrm|mbox)\s*\{([^{}]*)\}$")
NUMBER_WORDS = {
    word: str(value)
    for value, word in [*enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                                    "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
                                    "seventeen", "eighteen", "nineteen", "twenty")),
                        (30, "thirty"), (40, "forty"), (50, "fifty"), (60, "sixty"), (70, "seventy"), (80, "eighty"),
                        (90, "ninety"), (100, "hundred"), (1000, "thousand"), (10**6, "million")]
}  # fmt: skip
DELIMITERS = (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$"))
UNICODE = str.maketrans(
    {"−": "-", "–": "-", "×": "*", "÷": "/", "·": "*", "π": "\\pi", "√": "\\sqrt", "∞": "\\infty"}
)


def equivalent(gold: str, pred: str) -> bool:
    """True when `pred` states the same answer as `gold` (both already isolated final answers)."""
    gold, pred = clean(gold), clean(pred)
    if not gold or not pred:
        return False
    if gold == pred:
        return True
    choice = CHOICE.match(gold)
    if choice and choice.group(1).lower() != "e":  # a lone `e` is more likely Euler's number
        picked = CHOICE.match(pred)
        return bool(picked) and picked.group(1).lower() == choice.group(1).lower()
    if is_prose(gold):
        return normal_text(gold) == normal_text(pred)
    gold_forms = _parsed_forms(gold)
    if not gold_forms:
        return normal_text(gold) == normal_text(pred)
    pred_forms = _parsed_forms(pred) if not is_prose(pred) else []
    if not pred_forms:
        pred_forms = _search_forms(pred)
    return _verify(gold_forms, pred_forms)


def clean(answer: Any) -> str:
    """Strip math delimiters, a trailing full stop, unicode operators, thousands separators and
    `\\text{}` units from a bare number: the forms a grader ignores."""
    text = str(answer if answer is not None else "").strip().translate(UNICODE)
    for left, right in DELIMITERS:
        if len(text) > len(left) + len(right) and text.startswith(left) and text.endswith(right):
            text = text[len(left) : -len(right)].strip()
            break
    text = CURRENCY.sub("", text.rstrip(".").strip())
    if text.startswith("\\boxed{") and text.endswith("}"):
        text = text[len("\\boxed{") : -1].strip()
    wrapped = WRAPPED_TEXT.match(text)
    if wrapped:
        text = wrapped.group(1).strip()
    text = NUMBER_WORDS.get(text.lower(), text)
    text = re.sub(r"\\[dt]frac", r"\\frac", text)
    if THOUSANDS.match(text):
        text = THOUSANDS_SEPARATOR.sub("", text)
    if SCIENTIFIC.match(text):
        text = format(Decimal(text), "f")
    unit = NUMBER_WITH_UNIT.match(text)
    if unit and not is_math_word(unit.group(2)):
        text = unit.group(1).replace(",", "") if THOUSANDS.match(unit.group(1)) else unit.group(1)
    return text


def exact_values(answer: str) -> set[Fraction] | None:
    """The exact rational values a `clean`ed answer may mean (`50%` is 1/2 or 50), for
    `quick_verdict`; None unless it is a plain number, a fraction `a/b` or `\\frac{a}{b}`, or one of
    those with %."""
    text, percent = _split_percent(answer)
    match = RATIONAL.match(text.replace(" ", ""))
    if match is None:
        return None
    sign = -1 if match.group("sign") == "-" else 1
    numerator, denominator = (
        match.group("fnum") or match.group("num2"),
        match.group("fden") or match.group("den2"),
    )
    try:
        value = sign * (
            Fraction(int(numerator), int(denominator)) if numerator else Fraction(match.group("number"))
        )
    except (ValueError, ZeroDivisionError):
        return None
    return {value, value / 100} if percent else {value}


def quick_verdict(gold: str, pred: str) -> bool | None:
    """A verdict without math-verify, or None (math-verify decides). Both exact rationals: True
    when they share a value, False unless a long decimal might be a rounding. Otherwise simple
    expressions, intervals and sets, exactly (`exact_math.verdict`)."""
    gold, pred = clean(gold), clean(pred)
    if gold and gold == pred:
        return True
    gold_values, pred_values = exact_values(gold), exact_values(pred)
    if gold_values is None or pred_values is None:
        return exact_math.verdict(gold, pred)
    if gold_values & pred_values:
        return True
    if LONG_DECIMAL.search(gold) or LONG_DECIMAL.search(pred):
        return None
    return False


def pathological(gold: str, pred: str) -> bool:
    """A predicted answer built to choke a parser or a CAS where the gold answer is nothing of the
    kind: brackets nested deeper than math-verify's ANTLR parser copes with (its time doubles with
    each level of braces: 0.5 s at 10, over 200 s at 20), a four-digit exponent, an exponent
    tower (`9^{9^{9}}`). Scored 0 without parsing: no reasonable answer to that gold looks like it,
    and each would otherwise cost a timeout and a worker."""
    if _nesting(pred) > max(MAX_NESTING, _nesting(gold) + 3):
        return True
    return any(pattern.search(pred) and not pattern.search(gold) for pattern in (HUGE_EXPONENT, TOWER))


def _nesting(text: str) -> int:
    """How deep brackets of any kind nest in `text` (a linear scan)."""
    depth, deepest = 0, 0
    for char in text:
        depth += (char in "{([") - (char in "})]")
        deepest = max(deepest, depth)
    return deepest


def is_math_word(words: str) -> bool:
    return all(w.lower() in MATH_WORDS or len(w) == 1 for w in re.findall(r"[A-Za-z]+", words))


def is_prose(text: str) -> bool:
    """Words that are not mathematics (outside LaTeX commands): an answer in words, or a sentence."""
    bare = LATEX_COMMAND.sub(" ", TEXT_COMMAND.sub(" ", text))
    return any(word.lower() not in MATH_WORDS for word in WORD.findall(bare))


def normal_text(text: str) -> str:
    text = TEXT_COMMAND.sub(r"\1", text)
    return re.sub(r"[\s.,;:!'\"`*_{}()\[\]\\$]+", " ", text).strip().lower()


def _split_percent(text: str) -> tuple[str, bool]:
    stripped = PERCENT.sub("", text)
    return stripped, stripped != text


def _parsed_forms(answer: str) -> list[Any]:
    """The answer parsed as one expression; a percentage also as its bare number."""
    bare, percent = _split_percent(answer)
    forms = list(_parse_whole(answer))
    if percent and bare:
        forms += _parse_whole(bare)
    return forms


@lru_cache(maxsize=4096)
def _parse_whole(answer: str) -> tuple[Any, ...]:
    from math_verify import LatexExtractionConfig, parse

    _two_stage_parsing()
    parsed = parse(
        "\\boxed{" + answer + "}",
        extraction_config=[LatexExtractionConfig(boxed_match_priority=0)],
        fallback_mode="no_fallback",
        parsing_timeout=None,
    )
    return tuple(parsed)


def _search_forms(text: str) -> list[Any]:
    """An answer written as a sentence (`the answer is 5`): math-verify's own anchored search."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    _two_stage_parsing()
    return parse(
        text,
        extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
        fallback_mode="no_fallback",
        parsing_timeout=None,
    )


def _verify(gold_forms: list[Any], pred_forms: list[Any]) -> bool:
    from math_verify import verify

    if not pred_forms:
        return False
    return bool(verify(gold_forms, pred_forms, timeout_seconds=None))


@cache
def _two_stage_parsing() -> None:
    """latex2sympy parses with SLL prediction first and again with LL if that fails (see the module
    docstring). latex2sympy builds its ANTLR parser in `_Latex2Sympy.create_parser` with no way to
    choose the mode, so both methods are wrapped here, once per process."""
    from antlr4.atn.PredictionMode import PredictionMode
    from latex2sympy2_extended.latex2sympy2 import _Latex2Sympy

    create_parser, parse = _Latex2Sympy.create_parser, _Latex2Sympy.parse

    def create_in_mode(self: Any, latex: str) -> Any:
        parser = create_parser(self, latex)
        parser._interp.predictionMode = getattr(self, "prediction_mode", PredictionMode.LL)
        return parser

    def parse_in_two_stages(self: Any, latex: str) -> Any:
        self.prediction_mode = PredictionMode.SLL
        try:
            return parse(self, latex)
        except Exception:  # a syntax error under SLL may need LL; a real one raises again
            self.prediction_mode = PredictionMode.LL
            return parse(self, latex)

    _Latex2Sympy.create_parser = create_in_mode
    _Latex2Sympy.parse = parse_in_two_stages


def _quiet() -> None:
    """math-verify warns once that its timeouts are off: the worker pool enforces them instead."""
    for name in ("math_verify", "math_verify.parser", "math_verify.grader", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.ERROR)


_quiet()
