"""`accuracy`: is the completion's final answer the row's `answer`? Symbolic, timed out, cached.

The final answer is the last `<answer>...</answer>` block, else the last `\\boxed{}`, else a
GSM8K `#### N` line; the gold `answer` may itself be a GSM8K solution (`... #### 72`) or hold
a `\\boxed{}`. Equivalence is math-verify's, fed whole answers (`math_judge.py`), so `1/2`
matches `0.5`, `50%` matches `50`, `\\frac{1}{n+1}` matches `1/(n+1)`, `1,000` matches `1000`.

Throughput: simple answers on both sides (`72`, `1,200`, `3/4`, `\\frac{3}{4}`, `50%`,
`3\\sqrt{2}`, `(x+1)^2`, `(1, 2]`, `\\{1, 2\\}`) are compared in-process, exactly, with no
LaTeX parser (`math_judge.quick_verdict`); verdicts are cached by (gold, answer), which pays
off because a GRPO group repeats answers; the rest go to a pool of worker processes with a
hard per-sample timeout (`pool.py`), which works from any thread and starts on the first
answer that needs it (a run whose answers are all numbers never starts it). A timeout or a
crash scores None (not judged) and is counted; an answer built to choke the parser (braces
nested far deeper than the gold's, a four-digit exponent, an exponent tower) scores 0 unparsed
and is counted as `rejected`.
"""

from __future__ import annotations

import threading
from typing import Annotated, Any, Literal

from pydantic import Field

from posttrain.data_tools.answers import final_answer, gsm8k_answer, last_boxed
from posttrain.rewards.math_judge import pathological, quick_verdict
from posttrain.rewards.pool import OK, TIMEOUT, WorkerPool, shared_pool
from posttrain.rewards.registry import RewardFunc, register
from posttrain.rewards.text import completion_text

JUDGE = "posttrain.rewards.math_judge:equivalent"
PRELOAD = ("math_verify", "sympy")
Source = Literal["answer", "boxed", "gsm8k"]


@register("accuracy", columns=("answer",))
def accuracy(
    timeout: Annotated[float, Field(gt=0)] = 5.0,
    sources: tuple[Source, ...] = ("answer", "boxed", "gsm8k"),
    max_answer_chars: Annotated[int, Field(gt=0)] = 1000,
    workers: Annotated[int, Field(ge=1)] | None = None,
) -> RewardFunc:
    """1.0 when the final answer is equivalent to the row's `answer`, 0.0 when not or absent; None
    when the row has no gold answer or verification timed out / failed.

    Options: `timeout` seconds per sample; `sources`, where the final answer is looked for, in
    order; `max_answer_chars`, longer "answers" score 0 unjudged; `workers`, verification
    processes (default min(4, CPUs))."""
    judge = AnswerJudge(timeout=timeout, workers=workers)

    def accuracy_reward(
        completions: list[Any], answer: list[Any], log_metric: Any = None, **kwargs: Any
    ) -> list[float | None]:
        preds = [final_answer(completion_text(c), sources) for c in completions]
        preds = [p if p is None or len(p) <= max_answer_chars else "" for p in preds]
        scores, counts = judge.score([gold_answer(a) for a in answer], preds)
        if log_metric is not None:
            for key in ("timeouts", "errors", "rejected"):
                log_metric(key, counts[key])
        return scores

    return accuracy_reward


def gold_answer(raw: Any) -> str | None:
    """The gold final answer of a row: a GSM8K solution's `#### N`, a `\\boxed{}`, or the text itself."""
    if raw is None:
        return None
    text = str(raw).strip()
    if "####" in text:
        return gsm8k_answer(text)
    if "\\boxed" in text or "\\fbox" in text:
        return last_boxed(text) or text
    return text or None


class AnswerJudge:
    """Verdicts for (gold, predicted) answer pairs: in-process for numbers, cached, else in the pool."""

    CACHE_SIZE = 100_000

    def __init__(self, timeout: float = 5.0, workers: int | None = None) -> None:
        self.timeout = timeout
        self.workers = workers
        self._cache: dict[tuple[str, str], bool] = {}
        self._lock = threading.Lock()

    def pool(self) -> WorkerPool:
        return shared_pool(JUDGE, self.workers, PRELOAD)

    def score(
        self, golds: list[str | None], preds: list[str | None]
    ) -> tuple[list[float | None], dict[str, int]]:
        scores: list[float | None] = [None] * len(golds)
        todo: dict[tuple[str, str], list[int]] = {}
        counts = {"timeouts": 0, "errors": 0, "rejected": 0}
        for i, (gold, pred) in enumerate(zip(golds, preds, strict=True)):
            if not gold:
                continue  # no gold answer: nothing to judge against
            if not pred:
                scores[i] = 0.0
                continue
            verdict = self._quick(gold, pred)
            if verdict is None and pathological(gold, pred):
                counts["rejected"] += 1  # built to choke the parser: wrong, and never sent
                verdict = False
            if verdict is None:
                todo.setdefault((gold, pred), []).append(i)
            else:
                scores[i] = float(verdict)
        if todo:
            pairs = list(todo)
            outcomes = self.pool().map(pairs, self.timeout)
            for pair, outcome in zip(pairs, outcomes, strict=True):
                if outcome.status == OK:
                    self._remember(pair, bool(outcome.value))
                    for i in todo[pair]:
                        scores[i] = float(bool(outcome.value))
                else:
                    counts["timeouts" if outcome.status == TIMEOUT else "errors"] += len(todo[pair])
        return scores, counts

    def _quick(self, gold: str, pred: str) -> bool | None:
        """A verdict without math-verify: cached, or both sides simple (math_judge.quick_verdict)."""
        cached = self._cache.get((gold, pred))
        return cached if cached is not None else quick_verdict(gold, pred)

    def _remember(self, pair: tuple[str, str], verdict: bool) -> None:
        with self._lock:
            if len(self._cache) >= self.CACHE_SIZE:
                self._cache.clear()
            self._cache[pair] = verdict
