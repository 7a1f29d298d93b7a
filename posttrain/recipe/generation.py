"""Where completions are written (`backend:`): by transformers in this process, by a vLLM engine
on each rank, or by an OpenAI-compatible server (`vllm serve`, SGLang, a hosted API). Shared by
the evaluation, the labelling policy's sampling and the distillation teacher's traces, and the
endpoint block the `openai` judge builds on."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, model_validator

from posttrain.recipe.base import Strict

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Endpoint(Strict):
    """An OpenAI-compatible HTTP endpoint, reached through one pooled client with retries."""

    base_url: str  # e.g. http://localhost:8000/v1
    model: str  # the served model's name
    api_key_env: str | None = "OPENAI_API_KEY"  # the environment variable holding the key (None: no key)
    extra_body: dict[str, Any] = {}  # sent as is, e.g. {chat_template_kwargs: {enable_thinking: false}}
    max_concurrency: int = Field(8, gt=0)
    timeout_s: float = Field(60.0, gt=0)  # per connection / read
    max_retries: int = Field(5, ge=0)  # on timeouts, connection errors, 408/409/429/5xx
    backoff_s: float = Field(1.0, ge=0)  # first retry delay; doubles each time (Retry-After wins)

    @model_validator(mode="after")
    def _endpoint(self) -> Endpoint:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url '{self.base_url}' must start with http:// or https://")
        if self.api_key_env is not None and not ENV_NAME.match(self.api_key_env):
            raise ValueError(
                "api_key_env names an environment variable (e.g. OPENAI_API_KEY); never put the key itself in a recipe"
            )
        return self


class ServerSpec(Endpoint):
    """The server that writes the completions: chat prompts go to /chat/completions (the server
    applies its chat template), text prompts to /completions. Each sample is its own request with
    its own seed, so sampled results do not depend on batching or on the number of ranks."""

    max_concurrency: int = Field(32, gt=0)
    timeout_s: float = Field(600.0, gt=0)  # a long chain of thought takes minutes


class Backend(Strict):
    """Which engine writes the completions. `auto`: `server` when one is given, else vLLM on a CUDA
    GPU with vllm installed, else transformers. Every rank runs its own engine on its share of the
    prompts (a `server` is shared by all)."""

    backend: Literal["auto", "transformers", "vllm", "server"] = "auto"
    vllm: dict[str, Any] = {}  # extra keyword arguments of vllm.LLM: gpu_memory_utilization, max_model_len...
    server: ServerSpec | None = None

    @model_validator(mode="after")
    def _server(self) -> Backend:
        if self.backend == "server" and self.server is None:
            raise ValueError("backend: server needs `server: {base_url: ..., model: ...}`")
        if self.server is not None and self.backend not in ("auto", "server"):
            raise ValueError(
                f"`server:` is set, but backend is {self.backend}: use backend: server (or auto)"
            )
        return self

    @property
    def served(self) -> bool:
        """Completions come from a server: no model is loaded to write them."""
        return self.server is not None
