"""Pull the final answer out of a completion or a reference solution (shared by rewards and evaluation).

Three formats, each with its own helper, and `extract_answer` trying them in order:

- `<answer>...</answer>` tags (the R1 format this project trains),
- LaTeX `\\boxed{...}` (MATH, with nested braces: `\\boxed{\\frac{1}{2}}`),
- GSM8K's `#### 42` final line.

    >>> extract_answer("<think>6*7</think><answer>42</answer>")
    '42'
    >>> extract_answer("so the area is $\\\\boxed{\\\\frac{1}{2}}$.")
    '\\\\frac{1}{2}'
"""

from __future__ import annotations

import re

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
GSM8K_FINAL = re.compile(r"^\s*####\s*(.+?)\s*$", re.MULTILINE)
BOXED = re.compile(r"\\(?:boxed|fbox)\s*(\{)?")


def extract_tag(text: str) -> str | None:
    """The content of the last `<answer>...</answer>`, stripped; None when there is none."""
    matches = ANSWER_TAG.findall(text)
    return matches[-1].strip() if matches else None


def extract_boxed(text: str) -> str | None:
    """The content of the last complete `\\boxed{...}` (braces balanced), or `\\boxed 5`; else None."""
    found = None
    for match in BOXED.finditer(text):
        if match.group(1) is None:  # `\boxed 5`: up to the next space or `$`
            rest = re.match(r"([^\s$]+)", text[match.end() :])
            found = rest.group(1) if rest else found
            continue
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                found = text[start:i].strip()
                break
    return found


def extract_gsm8k(text: str) -> str | None:
    """The number after the last `#### ` line of a GSM8K solution, or None."""
    matches = GSM8K_FINAL.findall(text)
    return matches[-1].strip() if matches else None


def extract_answer(text: str) -> str | None:
    """The final answer of `text`: the last `<answer>` tag, else the last `\\boxed{}`, else `#### N`."""
    for extract in (extract_tag, extract_boxed, extract_gsm8k):
        found = extract(text)
        if found is not None:
            return found
    return None


def reference_answer(gold: str) -> str:
    """A dataset's `answer` column as the bare answer: GSM8K and MATH store whole solutions."""
    text = str(gold)
    found = extract_answer(text)
    return (found if found is not None else text).strip()


def normalize_answer(answer: str | None) -> str | None:
    """A canonical spelling for exact match: no surrounding `$` or spaces, no thousands commas,
    no trailing period, `\\text{..}` unwrapped, and `5.0` written `5`."""
    if answer is None:
        return None
    text = answer.strip().strip("$").strip()
    text = re.sub(r"\\text\{([^{}]*)\}", r"\1", text)
    text = text.rstrip(".").strip()
    if re.fullmatch(r"[-+]?[\d,]*\.?\d+", text):
        text = text.replace(",", "")
        if "." in text:
            text = text.rstrip("0").rstrip(".") or "0"
        text = text.lstrip("+")
    return text
