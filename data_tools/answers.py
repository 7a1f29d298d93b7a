"""Pull the final answer out of a completion (shared by rewards and evaluation)."""

from __future__ import annotations

import re

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer(text: str) -> str | None:
    """The content of the last `<answer>...</answer>`, stripped; None when there is none."""
    matches = ANSWER_TAG.findall(text)
    return matches[-1].strip() if matches else None
