"""Pull the final answer out of a completion (shared by rewards and evaluation).

One helper per format, and `extract_answer` / `final_answer` trying them in order:

- `answer_tag`: the last `<answer>...</answer>` (the R1 format this project trains),
- `last_boxed`: the last LaTeX `\\boxed{...}` (MATH; nested braces: `\\boxed{\\frac{1}{2}}`),
- `gsm8k_answer`: GSM8K's `#### 42` final line.

Every search here is linear in the text (`str.rfind`, no backtracking regex), so a 1 MB or
adversarial completion costs milliseconds, never minutes.
"""

from __future__ import annotations

import re

GSM8K_ANSWER = re.compile(r"####[ \t]*([^\n]*)")
BRACES = re.compile(r"[{}]")
BOXED_COMMANDS = ("\\boxed", "\\fbox")


def answer_tag(text: str) -> str | None:
    """The content of the last `<answer>...</answer>`, stripped; None when there is none."""
    end = text.rfind("</answer>")
    if end < 0:
        return None
    start = text.rfind("<answer>", 0, end)
    return text[start + len("<answer>") : end].strip() if start >= 0 else None


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced; None if absent
    or unclosed. `\\boxed 5` (no braces) gives `5`."""
    start = max(text.rfind(command) for command in BOXED_COMMANDS)
    if start < 0:
        return None
    i = start + len("\\boxed" if text.startswith("\\boxed", start) else "\\fbox")
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":
        word = re.match(r"[^\s$]+", text[i:])
        return word.group(0) if word else None
    depth = 0
    for brace in BRACES.finditer(text, i):
        depth += 1 if brace.group() == "{" else -1
        if depth == 0:
            return text[i + 1 : brace.start()].strip()
    return None


def gsm8k_answer(text: str) -> str | None:
    """The text after the last `#### ` marker (GSM8K's final-answer line), stripped."""
    start = text.rfind("####")
    if start < 0:
        return None
    match = GSM8K_ANSWER.match(text, start)
    value = match.group(1).strip() if match else ""
    return value or None


ANSWER_SOURCES = {"answer": answer_tag, "boxed": last_boxed, "gsm8k": gsm8k_answer}


def final_answer(
    text: str, sources: tuple[str, ...] | list[str] = ("answer", "boxed", "gsm8k")
) -> str | None:
    """The final answer of a completion: the last `<answer>` block, else the last `\\boxed{}`, else
    a GSM8K `#### N` line (the order of `sources`). A `\\boxed{}` inside the `<answer>` block wins
    over the prose around it."""
    for source in sources:
        found = ANSWER_SOURCES[source](text)
        if found is not None:
            if source == "answer":
                found = last_boxed(found) or found
            return found
    return None


def extract_answer(text: str) -> str | None:
    """The final answer of a completion or a worked solution: the last `<answer>` block, else the
    last `\\boxed{}`, else a GSM8K `#### N` line (`final_answer` with every source)."""
    return final_answer(text)
