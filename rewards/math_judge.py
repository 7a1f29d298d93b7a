"""Is a predicted final answer equivalent to the gold one? math-verify, fed the way a grader reads.

`equivalent(gold, pred)` runs inside the verification worker processes (`pool.py`), which
enforce the timeout: math-verify is called with its own signal-based timeouts off, so it
works from any thread. Both sides are already isolated final answers (see
`posttrain.data_tools.answers.final_answer`), so they are parsed as one whole expression
(wrapped in `\\boxed{}`) rather than searched for anchors the way math-verify's default
`parse` does; that search is what turns a plain gold `1/(n+1)` into `1` and `(1, 2]` into `2`.

What it adds around math-verify, each case a grader accepts:
- plain-text answers (`Tuesday`, `yes`) compare as normalised text, not as a product of symbols;
- a trailing unit word (`5 dollars`, `12 apples`) or `\\text{}` unit is dropped;
- `50%` matches `50` and `0.5`, whichever side has the percent sign;
- thousands separators (`1,000`, `1{,}000`, `1\\,000`) are removed from plain numbers;
- `x = 5` matches `5`, multiple-choice `(B)` matches `B`, `two` matches `2`.
"""

from __future__ import annotations

import logging
import re
from decimal import Decimal
from fractions import Fraction
from functools import lru_cache
from typing import Any

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
LONG_DECIMAL = re.compile(r"\.\d{4,}")  # 0.3333: possibly a rounded 1/3, math-verify's call
SCIENTIFIC = re.compile(r"^[-+]?(?:\d+(?:\.\d*)?|\.\d+)[eE][-+]?\d{1,4}$")
NUMBER_WITH_UNIT = re.compile(r"^\\?\$?\s*([-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+))\s*([A-Za-z][A-Za-z .]*)$")
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
    text = text.rstrip(".").strip()
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
    """The exact rational values an answer may mean (`50%` is 1/2 or 50), for `quick_verdict`;
    None unless it is a plain number, a fraction `a/b` or `\\frac{a}{b}`, or one of those with %."""
    text, percent = _split_percent(clean(answer))
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
    """A verdict without math-verify when both answers are exact rationals: True when they share a
    value; False unless a long decimal might be a rounding (then None: math-verify decides)."""
    gold_values, pred_values = exact_values(gold), exact_values(pred)
    if gold_values is None or pred_values is None:
        return None
    if gold_values & pred_values:
        return True
    if LONG_DECIMAL.search(gold) or LONG_DECIMAL.search(pred):
        return None
    return False


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


def _quiet() -> None:
    """math-verify warns once that its timeouts are off: the worker pool enforces them instead."""
    for name in ("math_verify", "math_verify.parser", "math_verify.grader", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.ERROR)


_quiet()
