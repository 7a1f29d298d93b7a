"""The `openai` judge: any OpenAI-compatible chat endpoint (vLLM, SGLang, a hosted API) over plain
HTTP (urllib; the `openai` package is not needed).

The judge replies `Verdict: A` (after a rationale when asked). When the server returns logprobs,
p(first better) is read from the top logprobs of the label token after `Verdict:`, so it is a
probability; otherwise the strict verdict line gives 1 or 0, and a reply without one counts as
no verdict (the pair is dropped as `invalid`). Timeouts, connection errors, 408/409/429 and 5xx
are retried with exponential backoff (a server's Retry-After wins); `max_concurrency` requests
run at once. The API key comes from the environment variable the recipe names.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import random
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

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
    pool = ThreadPoolExecutor(max_workers=spec.max_concurrency)

    def one(query: PairQuery) -> dict[str, Any]:
        user = pairwise_prompt(
            render_question(query.prompt),
            query.first,
            query.second,
            spec.principles,
            spec.labels,
            spec.rationale,
        )
        reply = post(url, headers, request_body(spec, user), spec)
        return read_verdict(reply, spec.labels)

    def compare(queries: list[PairQuery]) -> list[dict[str, Any]]:
        return list(pool.map(one, queries))

    return Judge(
        id=judge_id,
        batch_size=4 * spec.max_concurrency,
        compare=compare,
        principles=spec.principles,
        close=lambda: pool.shutdown(wait=False, cancel_futures=True),
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


def post(url: str, headers: dict[str, str], body: dict[str, Any], spec: OpenAIJudgeSpec) -> dict[str, Any]:
    """POST with retries: transient failures back off and retry; a 4xx the server means is an error."""
    data = json.dumps(body).encode()
    problem = ""
    for attempt in range(spec.max_retries + 1):
        wait = None
        try:
            request = urllib.request.Request(url, data=data, headers=headers, method="POST")
            with urllib.request.urlopen(request, timeout=spec.timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode(errors="replace")
            if e.code not in RETRY_STATUS:
                raise PosttrainError(
                    f"judge endpoint {url} answered {e.code}: {detail}",
                    fix="check base_url, model and the API key",
                ) from None
            problem, wait = f"HTTP {e.code}", _retry_after(e.headers.get("Retry-After"))
        except (OSError, http.client.HTTPException, json.JSONDecodeError) as e:  # timeouts, refused, reset
            problem = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        if attempt < spec.max_retries:
            backoff = min(spec.backoff_s * 2**attempt, MAX_BACKOFF_S) * (1 + 0.25 * random.random())
            time.sleep(wait if wait is not None else backoff)
    raise PosttrainError(
        f"judge endpoint {url} failed {spec.max_retries + 1} times (last: {problem})",
        fix="is the server up? raise timeout_s / max_retries, or lower max_concurrency",
    )


def _retry_after(value: str | None) -> float | None:
    try:
        return min(float(value), MAX_BACKOFF_S) if value else None
    except ValueError:
        return None


def read_verdict(reply: dict[str, Any], labels: tuple[str, str]) -> dict[str, Any]:
    """{"p_first", "rationale", "mass"} from a chat completion: label logprobs when present,
    else the strict verdict line."""
    choice = (reply.get("choices") or [{}])[0]
    text = (choice.get("message") or {}).get("content") or ""
    rationale = split_rationale(text) or None
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
