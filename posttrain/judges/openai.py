"""The `openai` judge: any OpenAI-compatible chat endpoint (vLLM, SGLang, a hosted API), through
one pooled httpx client (keep-alive connections, `max_concurrency` at once) with tenacity retries.

The judge replies `Verdict: A` (after a rationale when asked). When the server returns logprobs,
p(first better) is read from the top logprobs of the label token after `Verdict:`, so it is a
probability; a server that ignores `logprobs` is named once on the console and its strict
verdict line gives 1 or 0; a reply without one counts as no verdict (the pair is dropped as
`invalid`). Timeouts, connection errors, 408/409/429 and 5xx are retried with exponential
backoff and jitter (a server's Retry-After wins); any other status fails at once. The API key
comes from the environment variable the recipe names.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from posttrain import endpoint
from posttrain.console import console
from posttrain.context import StageContext
from posttrain.judges import Judge, PairQuery
from posttrain.judges.prompt import VERDICT, pairwise_prompt, parse_verdict, render_question, split_rationale
from posttrain.recipe import OpenAIJudgeSpec


def build(spec: OpenAIJudgeSpec, ctx: StageContext | None, judge_id: str) -> Judge:
    url = spec.base_url.rstrip("/") + "/chat/completions"
    client = endpoint.client(spec, "the judge")
    pool = ThreadPoolExecutor(max_workers=spec.max_concurrency)
    no_logprobs = threading.Event()  # said once per judge

    def one(query: PairQuery) -> dict[str, Any]:
        user = pairwise_prompt(
            render_question(query.prompt),
            query.first,
            query.second,
            spec.principles,
            spec.labels,
            spec.rationale,
        )
        reply = endpoint.post(client, url, request_body(spec, user), spec, "judge endpoint")
        if spec.logprobs and not _has_logprobs(reply) and not no_logprobs.is_set():
            no_logprobs.set()
            console.print(
                f"[yellow]warning:[/] the judge server at {spec.base_url} returns no logprobs: reading the "
                "`Verdict:` line instead, so each label is 0 or 1, not a probability (`logprobs: false` asks for none)",
                soft_wrap=True,
            )
        return read_verdict(reply, spec.labels, keep_rationale=spec.rationale)

    def compare(queries: list[PairQuery]) -> list[dict[str, Any]]:
        return list(pool.map(one, queries))

    def close() -> None:
        pool.shutdown(wait=False, cancel_futures=True)
        client.close()

    return Judge(
        id=judge_id,
        batch_size=4 * spec.max_concurrency,
        compare=compare,
        principles=spec.principles,
        close=close,
    )


def request_body(spec: OpenAIJudgeSpec, user: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": spec.model,
        "messages": [{"role": "user", "content": user}],
        "max_tokens": spec.max_tokens if spec.rationale else 16,
        "temperature": spec.temperature,
    }
    if spec.logprobs:
        body.update(logprobs=True, top_logprobs=spec.top_logprobs)
    return {**body, **spec.extra_body}


def _has_logprobs(reply: dict[str, Any]) -> bool:
    choice = (reply.get("choices") or [{}])[0]
    return bool((choice.get("logprobs") or {}).get("content"))


def read_verdict(
    reply: dict[str, Any], labels: tuple[str, str], keep_rationale: bool = False
) -> dict[str, Any]:
    """{"p_first", "rationale", "mass"} from a chat completion: label logprobs when present,
    else the strict verdict line. The rationale is kept only when one was asked for (a chatty
    judge's preamble is not a rationale)."""
    choice = (reply.get("choices") or [{}])[0]
    text = (choice.get("message") or {}).get("content") or ""
    rationale = (split_rationale(text) or None) if keep_rationale else None
    tokens = ((choice.get("logprobs") or {}).get("content")) or []
    from_logprobs = label_logprobs(tokens, labels)
    if from_logprobs is not None:
        p_first, mass = from_logprobs
        return {"p_first": p_first, "rationale": rationale, "mass": mass}
    return {"p_first": parse_verdict(text, labels), "rationale": rationale, "mass": None}


def label_logprobs(tokens: list[dict[str, Any]], labels: tuple[str, str]) -> tuple[float, float] | None:
    """(P(label 0) / P(either label), P(either label)) at the first token after the last
    `Verdict:`; None when the reply has no such token or neither label is among its top logprobs."""
    text = ""
    after = None
    for i, token in enumerate(tokens):
        text += token.get("token", "")
        if text.rstrip().endswith(VERDICT.rstrip(":")) or text.rstrip().endswith(VERDICT):
            after = i + 1
    if after is None:
        after = 0  # a bare label reply
    while after < len(tokens) and tokens[after].get("token", "").strip() in ("", ":"):
        after += 1
    if after >= len(tokens):
        return None
    probs = {labels[0].strip(): 0.0, labels[1].strip(): 0.0}
    for candidate in tokens[after].get("top_logprobs") or [tokens[after]]:
        label = candidate.get("token", "").strip()
        if label in probs:
            probs[label] += math.exp(candidate.get("logprob", -math.inf))  # "A" and " A" both say A
    a, b = probs[labels[0].strip()], probs[labels[1].strip()]
    if a + b == 0.0:
        return None
    return a / (a + b), a + b
