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

import json
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx2
import tenacity

from posttrain.console import console
from posttrain.context import StageContext
from posttrain.errors import PosttrainError
from posttrain.judges import Judge, PairQuery
from posttrain.judges.prompt import VERDICT, pairwise_prompt, parse_verdict, render_question, split_rationale
from posttrain.recipe import OpenAIJudgeSpec

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
MAX_BACKOFF_S = 60.0


def build(spec: OpenAIJudgeSpec, ctx: StageContext | None, judge_id: str) -> Judge:
    url = spec.base_url.rstrip("/") + "/chat/completions"
    headers = {"Content-Type": "application/json"}
    if spec.api_key_env is not None:
        key = os.environ.get(spec.api_key_env)
        if not key:
            raise PosttrainError(
                f"the judge's API key variable {spec.api_key_env} is not set",
                fix=f"export {spec.api_key_env}=..., or set `api_key_env: null` for a server without keys",
            )
        headers["Authorization"] = f"Bearer {key}"
    limits = httpx2.Limits(
        max_connections=spec.max_concurrency, max_keepalive_connections=spec.max_concurrency
    )
    client = httpx2.Client(headers=headers, timeout=spec.timeout_s, limits=limits)
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
        reply = post(client, url, request_body(spec, user), spec)
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


def post(client: httpx2.Client, url: str, body: dict[str, Any], spec: OpenAIJudgeSpec) -> dict[str, Any]:
    """POST with retries: transient failures back off and retry; a 4xx the server means is an error."""

    def send() -> dict[str, Any]:
        response = client.post(url, json=body)
        response.raise_for_status()
        return response.json()

    backoff = tenacity.wait_exponential(multiplier=spec.backoff_s, max=MAX_BACKOFF_S)
    jitter = tenacity.wait_random(0, spec.backoff_s / 4)
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(spec.max_retries + 1),
        wait=lambda state: (
            _retry_after(state) if _retry_after(state) is not None else (backoff + jitter)(state)
        ),
        retry=tenacity.retry_if_exception(_transient),
        reraise=True,
    )
    try:
        return retrying(send)
    except httpx2.HTTPStatusError as e:
        if e.response.status_code not in RETRY_STATUS:
            raise PosttrainError(
                f"judge endpoint {url} answered {e.response.status_code}: {e.response.text[:300]}",
                fix="check base_url, model and the API key",
            ) from None
        problem = f"HTTP {e.response.status_code}"
    except (httpx2.TransportError, json.JSONDecodeError) as e:  # timeouts, refused, reset, a torn reply
        problem = f"{type(e).__name__}: {e}"
    raise PosttrainError(
        f"judge endpoint {url} failed {spec.max_retries + 1} times (last: {problem})",
        fix="is the server up? raise timeout_s / max_retries, or lower max_concurrency",
    )


def _transient(error: BaseException) -> bool:
    if isinstance(error, httpx2.HTTPStatusError):
        return error.response.status_code in RETRY_STATUS
    return isinstance(error, httpx2.TransportError | json.JSONDecodeError)


def _retry_after(state: tenacity.RetryCallState) -> float | None:
    """The seconds a 429/503's Retry-After asks for (capped), else None."""
    error = state.outcome.exception() if state.outcome else None
    value = error.response.headers.get("Retry-After") if isinstance(error, httpx2.HTTPStatusError) else None
    try:
        return min(float(value), MAX_BACKOFF_S) if value else None
    except ValueError:
        return None


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
