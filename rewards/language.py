"""`language_consistency`: DeepSeek-R1's language-mixing reward, by Unicode script.

R1 rewards "the proportion of target language words in the CoT" so that a chain of thought
started in the prompt's language does not drift into another. Script detection is enough to
catch the drift R1 saw (Chinese reasoning for English questions): each word (a run of
letters of one script; every CJK character is a word of its own) is assigned a script from
its Unicode name (Latin, Cyrillic, CJK, Hangul, Arabic, ...), the prompt's script is its
most common one, and the reward is the share of the chain of thought's words in that
script. Digits, punctuation and mathematics count for no language.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from functools import lru_cache
from typing import Annotated, Any

from pydantic import Field

from posttrain.rewards.registry import RewardFunc, register
from posttrain.rewards.text import completion_text, prompt_text

# Unicode name prefixes that share one writing system for this purpose (kana and hanzi: "cjk").
SCRIPT_ALIASES = {
    "HIRAGANA": "CJK",
    "KATAKANA": "CJK",
    "BOPOMOFO": "CJK",
    "IDEOGRAPHIC": "CJK",
    "HALFWIDTH": "CJK",
}
THINK, END_THINK = "<think>", "</think>"
LETTERS = re.compile(r"[^\W\d_]+")


@register("language_consistency")
def language_consistency(
    script: str | None = None, max_chars: Annotated[int, Field(gt=0)] = 20_000, whole_completion: bool = False
) -> RewardFunc:
    """The fraction of the chain of thought's words written in the prompt's script (0..1); 1.0
    when the reasoning has no words, None when the prompt has none and `script` is unset.

    `script` fixes the target (a Unicode script name such as `latin`, `cjk`, `cyrillic`) instead
    of reading it from the prompt; the chain of thought is the `<think>` block, or the whole
    completion with `whole_completion` (or when there is no block); `max_chars` bounds the work."""
    fixed = script.upper() if script else None

    def language_consistency_reward(
        prompts: list[Any], completions: list[Any], **kwargs: Any
    ) -> list[float | None]:
        scores: list[float | None] = []
        for prompt, completion in zip(prompts or [None] * len(completions), completions, strict=True):
            target = fixed or dominant_script(prompt_text(prompt)[:max_chars])
            if target is None:
                scores.append(None)
                continue
            counts = script_counts(reasoning(completion_text(completion), whole_completion)[:max_chars])
            total = sum(counts.values())
            scores.append(counts.get(target, 0) / total if total else 1.0)
        return scores

    return language_consistency_reward


def reasoning(text: str, whole_completion: bool = False) -> str:
    """The chain of thought: the `<think>` block (to its end, or to the end of text if unclosed)."""
    if whole_completion:
        return text
    start = text.find(THINK)
    end = text.find(END_THINK, start + 1 if start >= 0 else 0)
    if start < 0 and end < 0:
        return text
    return text[(start + len(THINK) if start >= 0 else 0) : (end if end >= 0 else len(text))]


def dominant_script(text: str) -> str | None:
    counts = script_counts(text)
    return counts.most_common(1)[0][0] if counts else None


def script_counts(text: str) -> Counter:
    """Words per script: runs of letters of one script, each CJK character a word of its own."""
    counts: Counter = Counter()
    for run in LETTERS.findall(text):
        if run.isascii():
            counts["LATIN"] += 1
            continue
        previous = None
        for ch in run:
            script = char_script(ch)
            if script == "CJK" or script != previous:
                counts[script] += 1
            previous = script
    return counts


@lru_cache(maxsize=65536)
def char_script(ch: str) -> str:
    name = unicodedata.name(ch, "")
    if name.startswith("CJK") or "IDEOGRAPH" in name:
        return "CJK"
    first = name.split(" ", 1)[0] if name else "UNKNOWN"
    return SCRIPT_ALIASES.get(first, first)
