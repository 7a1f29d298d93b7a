"""`format` and `tag_count`: does the completion follow DeepSeek-R1's template?

    <think> reasoning </think> <answer> final answer </answer>

Both read the tags as plain text with linear scans (no backtracking regex), so a huge or
adversarial completion costs what its length costs. With `think_prefilled: true` the chat
template has already opened `<think>` in the prompt (as R1-distill templates do), so the
completion is read as if it began with it.
"""

from __future__ import annotations

from typing import Any, Literal

from posttrain.rewards.registry import RewardFunc, register
from posttrain.rewards.text import completion_text

THINK, END_THINK, ANSWER, END_ANSWER = "<think>", "</think>", "<answer>", "</answer>"
TAGS = (THINK, END_THINK, ANSWER, END_ANSWER)


@register("format")
def format_reward(mode: Literal["strict", "lenient"] = "strict", think_prefilled: bool = False) -> RewardFunc:
    """1.0 when the completion follows the R1 template, else 0.0.

    `strict`: exactly `<think>...</think><answer>...</answer>`, each tag once, nothing but
    whitespace around or between the blocks, a non-empty answer. `lenient`: a think block,
    then later an answer block with a non-empty answer; other text and repeats allowed."""
    check = strict_format if mode == "strict" else lenient_format

    def format_reward(completions: list[Any], **kwargs: Any) -> list[float | None]:
        return [float(check(_text(c, think_prefilled))) for c in completions]

    return format_reward


@register("tag_count")
def tag_count(think_prefilled: bool = False) -> RewardFunc:
    """0.25 for each of `<think>`, `</think>`, `<answer>`, `</answer>` that appears exactly once:
    partial credit on the way to the format, none for repeating a tag."""

    def tag_count_reward(completions: list[Any], **kwargs: Any) -> list[float | None]:
        texts = [_text(c, think_prefilled) for c in completions]
        return [sum(0.25 for tag in TAGS if text.count(tag) == 1) for text in texts]

    return tag_count_reward


def strict_format(text: str) -> bool:
    text = text.strip()
    if not (text.startswith(THINK) and text.endswith(END_ANSWER)):
        return False
    if any(text.count(tag) != 1 for tag in TAGS):
        return False
    end_think, answer = text.index(END_THINK), text.index(ANSWER)
    if answer < end_think or text[end_think + len(END_THINK) : answer].strip():
        return False
    return bool(text[answer + len(ANSWER) : -len(END_ANSWER)].strip())


def lenient_format(text: str) -> bool:
    think = text.find(THINK)
    end_think = text.find(END_THINK, think + len(THINK)) if think >= 0 else -1
    answer = text.find(ANSWER, end_think + len(END_THINK)) if end_think >= 0 else -1
    end_answer = text.find(END_ANSWER, answer + len(ANSWER)) if answer >= 0 else -1
    return end_answer >= 0 and bool(text[answer + len(ANSWER) : end_answer].strip())


def _text(completion: Any, think_prefilled: bool) -> str:
    text = completion_text(completion)
    return THINK + text if think_prefilled and not text.lstrip().startswith(THINK) else text
