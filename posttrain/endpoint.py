"""One OpenAI-compatible endpoint (vLLM, SGLang, TGI, a hosted API): a pooled httpx client
(keep-alive connections, `max_concurrency` at once) and POSTs with tenacity retries.

Timeouts, connection errors, 408/409/429 and 5xx are retried with exponential backoff and
jitter (a server's Retry-After wins); any other status fails at once with the server's reply.
The API key comes from the environment variable the recipe names, never from the recipe.
Used by the `openai` judge and the `server` generation backend."""

from __future__ import annotations

import json
import os
from typing import Any

import httpx2
import tenacity

from posttrain.errors import PosttrainError
from posttrain.recipe import Endpoint

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
MAX_BACKOFF_S = 60.0


def client(spec: Endpoint, what: str) -> httpx2.Client:
    """A pooled client for `spec`, with its API key; `what` names it in errors ("the judge")."""
    headers = {"Content-Type": "application/json"}
    if spec.api_key_env is not None:
        key = os.environ.get(spec.api_key_env)
        if not key:
            raise PosttrainError(
                f"{what}'s API key variable {spec.api_key_env} is not set",
                fix=f"export {spec.api_key_env}=..., or set `api_key_env: null` for a server without keys",
            )
        headers["Authorization"] = f"Bearer {key}"
    limits = httpx2.Limits(
        max_connections=spec.max_concurrency, max_keepalive_connections=spec.max_concurrency
    )
    return httpx2.Client(headers=headers, timeout=spec.timeout_s, limits=limits)


def post(
    client: httpx2.Client, url: str, body: dict[str, Any], spec: Endpoint, what: str = "endpoint"
) -> dict[str, Any]:
    """POST with retries: transient failures back off and retry; a 4xx the server means is an error.
    `what` names the endpoint in errors ("judge endpoint")."""

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
                f"{what} {url} answered {e.response.status_code}: {e.response.text[:300]}",
                fix="check base_url, model and the API key",
            ) from None
        problem = f"HTTP {e.response.status_code}"
    except (httpx2.TransportError, json.JSONDecodeError) as e:  # timeouts, refused, reset, a torn reply
        problem = f"{type(e).__name__}: {e}"
    raise PosttrainError(
        f"{what} {url} failed {spec.max_retries + 1} times (last: {problem})",
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
