"""The one pairwise judge prompt every text judge uses (hf, openai). The principles it cites
are read when the recipe loads (`posttrain.recipe.load_principles`: a list, a file, or a
constitution that ships in recipes/principles/).

The prompt follows the RLAIF labelling setup (Lee et al. 2023): a preamble with the principles,
the request, the two answers labelled by position, then an instruction to end with a strict
`Verdict: <label>` line, optionally after a short rationale (chain of thought). A local model is
then read at the token right after `Verdict:`; a remote one writes the line itself.
"""

from __future__ import annotations

import re
from typing import Any

from posttrain.errors import PosttrainError

VERDICT = "Verdict:"
RATIONALE = "Rationale:"
PROMPT_VERSION = 1  # bump when the wording below changes: it is part of every judge's cache key


def render_question(prompt: Any) -> str:
    """A conversational prompt as a transcript (`User: ...`); a text prompt as it is."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        if len(prompt) == 1 and prompt[0]["role"] == "user":
            return prompt[0]["content"]
        return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in prompt)
    raise PosttrainError(f"a prompt is text or a list of messages, not {type(prompt).__name__}")


def pairwise_prompt(
    question: str,
    first: str,
    second: str,
    principles: list[str],
    labels: tuple[str, str] = ("A", "B"),
    rationale: bool = False,
) -> str:
    """The judge's user turn for `first` (shown as labels[0]) against `second` (labels[1])."""
    a, b = labels
    rules = "\n".join(f"{i}. {p}" for i, p in enumerate(principles, 1))
    if rationale:
        ask = (
            f'First explain briefly which answer is better and why, starting with "{RATIONALE}". '
            f'Then end with a last line "{VERDICT} {a}" or "{VERDICT} {b}".'
        )
    else:
        ask = f'Reply with "{VERDICT} {a}" or "{VERDICT} {b}" and nothing else.'
    return (
        "Compare two answers to the same request and decide which one is better, "
        f"following these principles:\n{rules}\n\n"
        f"Request:\n{question}\n\n"
        f"Answer {a}:\n{first}\n\n"
        f"Answer {b}:\n{second}\n\n"
        f"Which answer is better? {ask}"
    )


def parse_verdict(text: str, labels: tuple[str, str]) -> float | None:
    """P(first is better) from a reply's strict last line `Verdict: <label>`: 1.0, 0.0, or None."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return None
    pattern = rf"^(?:{re.escape(VERDICT)}\s*)?(.+?)\.?$"
    match = re.match(pattern, lines[-1].replace("*", ""))
    label = match.group(1).strip() if match else None
    if label == labels[0].strip():
        return 1.0
    if label == labels[1].strip():
        return 0.0
    return None


def split_rationale(text: str) -> str:
    """The rationale a judge wrote, without a verdict line it may have added itself."""
    return text.split(VERDICT)[0].strip()
