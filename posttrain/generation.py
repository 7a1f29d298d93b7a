"""Generation for evaluation, labelling and distillation, split over every rank.

`open_engine` gives the engine a recipe's `backend:` asks for (posttrain/recipe/generation.py):
transformers `generate` in this process, a vLLM engine on this rank, or an OpenAI-compatible
server. `generate_all` cuts the prompts into batches of `batch_size` and hands them out over the
ranks (`distributed.map_batches`); each batch is sampled from a seed derived from its first
prompt (vLLM and servers: from each prompt). The batches do not depend on the world size, so
greedy and sampled completions are the same on 1 process and on 8, and so are the files written
from them. `generate` is the plain single-process loop (judges, chat) the engines build on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from posttrain import endpoint
from posttrain.console import progress
from posttrain.data_tools.chat_template import render_prompt
from posttrain.distributed import has_accelerator, map_batches, state, unsharded_loading
from posttrain.errors import PosttrainError
from posttrain.models import load_causal_lm, load_tokenizer
from posttrain.recipe import Backend, PathModel, ServerSpec


def render_prompts(tokenizer: Any, prompts: list[Any], label: str = "prompts") -> list[str]:
    """Conversational prompts go through the chat template (with the assistant header); text stays.
    A prompt the template refuses (a system turn Gemma has no place for) is one line naming its
    row of `label`."""
    return [render_prompt(tokenizer, p, label, row) for row, p in enumerate(prompts, 1)]


def model_device(model: Any) -> Any:
    return next(model.parameters()).device


def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int = 32,
    num_return_sequences: int = 1,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    description: str | None = None,
) -> tuple[list[list[str]], dict[str, float]]:
    """Completions for rendered `prompts` (k per prompt), decoded without special tokens, and
    throughput stats. Greedy unless `do_sample`; prompts are left-padded in batches. With a
    `description`, a progress bar counts the prompts done."""
    sampling = Sampling(max_new_tokens, num_return_sequences, do_sample, temperature, top_p)
    outputs: list[list[str]] = []
    new_tokens = 0
    started = time.perf_counter()
    with progress(description, len(prompts)) as advance:
        for i in range(0, len(prompts), batch_size):
            texts, lengths = _generate_batch(model, tokenizer, prompts[i : i + batch_size], sampling)
            outputs.extend(_grouped(texts, sampling.k))
            new_tokens += sum(lengths)
            advance(len(texts) // sampling.k)
    seconds = time.perf_counter() - started
    return outputs, {
        "tokens": new_tokens,
        "seconds": seconds,
        "tokens_per_s": new_tokens / max(seconds, 1e-9),
    }


def _generate_batch(
    model: Any, tokenizer: Any, prompts: list[str], sampling: Sampling
) -> tuple[list[str], list[int]]:
    """k decoded completions per prompt of one left-padded batch, and each one's length in tokens
    (without padding and the end-of-sequence token)."""
    import torch

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    batch = batch.to(model_device(model))
    temperature, top_p = sampling.temperature_top_p()
    options = {"temperature": temperature, "top_p": top_p} if sampling.do_sample else {}
    with torch.no_grad():
        out = model.generate(
            **batch,
            max_new_tokens=sampling.max_new_tokens,
            num_return_sequences=sampling.k,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            top_k=None,
            do_sample=sampling.do_sample,
            synced_gpus=False,  # each rank writes its own batch: no rank waits for another's tokens
            **options,
        )
    completion_ids = out[:, batch["input_ids"].shape[1] :]
    real = (completion_ids != tokenizer.pad_token_id) & (completion_ids != tokenizer.eos_token_id)
    lengths = [int(n) for n in real.sum(dim=1)]
    return tokenizer.batch_decode(completion_ids, skip_special_tokens=True), lengths


# --------------------------------------------------------------------------- engines, split over ranks


@dataclasses.dataclass(frozen=True)
class Sampling:
    """What to write for each prompt: `k` completions, greedy unless `do_sample`."""

    max_new_tokens: int
    k: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0

    def temperature_top_p(self) -> tuple[float, float]:
        """The temperature and top-p an engine is asked for: (0, 1) when greedy."""
        return (self.temperature, self.top_p) if self.do_sample else (0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class Generated:
    outputs: list[list[str]]  # k completions per prompt, in prompt order
    lengths: list[list[int]]  # their lengths in tokens
    stats: dict[str, float]  # tokens, seconds, tokens_per_s, prompts_per_s (over all ranks)


Completions = tuple[list[list[str]], list[list[int]]]


class Engine(Protocol):
    """Writes k completions for each prompt of a batch, from the batch's `seed` (prompt j of the
    batch, where an engine seeds each prompt: `seed + j`)."""

    def render(self, prompts: list[Any], label: str) -> list[Any]: ...

    def complete(self, prompts: list[Any], sampling: Sampling, seed: int) -> Completions: ...

    def close(self) -> None: ...


def backend_of(spec: Backend) -> str:
    """The engine `backend:` resolves to: `auto` is a server when one is given, else vLLM on a
    CUDA GPU with vllm installed, else transformers. An explicit vllm without either fails."""
    if spec.backend == "server" or (spec.backend == "auto" and spec.server is not None):
        return "server"
    if spec.backend == "vllm" and not vllm_usable():
        raise PosttrainError(
            "generation backend is vllm, but vLLM is not installed or no CUDA GPU is visible",
            fix="pip install 'posttrain[vllm]' on a GPU machine, or use backend: auto",
        )
    if spec.backend == "vllm" or (spec.backend == "auto" and vllm_usable()):
        return "vllm"
    return "transformers"


@contextlib.contextmanager
def open_engine(source: PathModel | None, spec: Backend) -> Iterator[Engine]:
    """The engine for `spec` (on this rank), closed and its memory freed on exit. Local engines
    load the tokenizer now and the weights at the first batch; a server loads nothing here."""
    kind = backend_of(spec)
    if kind != "server" and source is None:
        raise PosttrainError("a local generation backend needs a model", fix="name the model, or a `server:`")
    engine: Engine
    if kind == "server":
        assert spec.server is not None  # the schema pairs backend server with `server:`
        engine = ServerEngine(spec.server)
    elif kind == "vllm":
        engine = VLLMEngine(source, spec.vllm)
    else:
        engine = TransformersEngine(source)
    try:
        with unsharded_loading():  # each rank holds the whole model for its share, even under ZeRO-3
            yield engine
    finally:
        engine.close()


def generate_all(
    engine: Engine,
    prompts: list[Any],
    sampling: Sampling,
    *,
    batch_size: int,
    seed: int,
    description: str | None = None,
) -> Generated:
    """Completions for every (rendered) prompt, the batches split over the ranks; every rank gets
    all of them. Batch b is sampled from `seed + b.start`, whatever the number of ranks."""
    batches = [range(i, min(i + batch_size, len(prompts))) for i in range(0, len(prompts), batch_size)]
    started = time.perf_counter()
    with progress(description, len(prompts)) as advance:  # in rounds: measured faster than one share each
        results = map_batches(
            batches,
            lambda b: engine.complete([prompts[i] for i in b], sampling, seed + b.start),
            done=lambda finished: advance(sum(len(b) for b, _ in finished)),
        )
    seconds = time.perf_counter() - started
    outputs = [group for texts, _ in results for group in texts]
    lengths = [group for _, counts in results for group in counts]
    tokens = sum(sum(group) for group in lengths)
    stats = {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / max(seconds, 1e-9),
        "prompts_per_s": len(prompts) / max(seconds, 1e-9),
    }
    return Generated(outputs, lengths, stats)


def _grouped(flat: list[Any], k: int) -> list[list[Any]]:
    return [flat[j : j + k] for j in range(0, len(flat), k)]


class TransformersEngine:
    """transformers `generate` on this rank's device (its own GPU under `accelerate launch`)."""

    def __init__(self, source: PathModel) -> None:
        self.source = source
        self.tokenizer = load_tokenizer(source)
        self.model: Any = None

    def render(self, prompts: list[Any], label: str) -> list[Any]:
        return render_prompts(self.tokenizer, prompts, label)

    def complete(self, prompts: list[Any], sampling: Sampling, seed: int) -> Completions:
        import torch

        if self.model is None:
            self.model = load_causal_lm(self.source).eval()
            if has_accelerator():
                self.model = self.model.to(state().device)
        devices = [self.model.device] if self.model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            texts, lengths = _generate_batch(self.model, self.tokenizer, prompts, sampling)
        return _grouped(texts, sampling.k), _grouped(lengths, sampling.k)

    def close(self) -> None:
        self.model = None
        _free_memory()


class VLLMEngine:
    """An offline vLLM engine on this rank, colocated with the rest of the stage. Under
    `accelerate launch` each rank runs its own engine on its own GPU, launched the way trl's
    colocate mode does it (`distributed_executor_backend="external_launcher"`)."""

    def __init__(self, source: PathModel, options: dict[str, Any]) -> None:
        self.source, self.options = source, options
        self.tokenizer = load_tokenizer(source)
        self.llm: Any = None

    def render(self, prompts: list[Any], label: str) -> list[Any]:
        return render_prompts(self.tokenizer, prompts, label)

    def complete(self, prompts: list[Any], sampling: Sampling, seed: int) -> Completions:
        from vllm import SamplingParams

        if self.llm is None:
            self.llm = self._load()
        temperature, top_p = sampling.temperature_top_p()
        params = [
            SamplingParams(
                n=sampling.k,
                max_tokens=sampling.max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed + j,  # per prompt
                skip_special_tokens=True,
            )
            for j in range(len(prompts))
        ]
        ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]  # no second BOS
        results = self.llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
        texts = [[o.text for o in r.outputs] for r in results]
        return texts, [[len(o.token_ids) for o in r.outputs] for r in results]

    def _load(self) -> Any:
        from vllm import LLM

        pinned = {
            "dtype": self.source.dtype,
            "revision": self.source.revision,
            "hf_overrides": self.source.config or None,  # vLLM's name for config overrides
        }
        if state().num_processes > 1:
            pinned["distributed_executor_backend"] = "external_launcher"
        return LLM(
            model=self.source.path,
            trust_remote_code=self.source.trust_remote_code,
            **{k: v for k, v in pinned.items() if v is not None},
            **self.options,
        )

    def close(self) -> None:
        self.llm = None
        _free_memory()


class ServerEngine:
    """An OpenAI-compatible server (`vllm serve`, SGLang, a hosted API): chat prompts go to
    /chat/completions, text prompts to /completions. Each sample is one request with its own
    seed, `max_concurrency` at a time; nothing is loaded in this process."""

    def __init__(self, spec: ServerSpec) -> None:
        self.spec = spec
        self.client = endpoint.client(spec, "the generation server")
        self.pool = ThreadPoolExecutor(max_workers=spec.max_concurrency)
        self.base = spec.base_url.rstrip("/")

    def render(self, prompts: list[Any], label: str) -> list[Any]:
        return list(prompts)  # the server applies its own chat template

    def complete(self, prompts: list[Any], sampling: Sampling, seed: int) -> Completions:
        requests = [
            (p, (seed + j) * sampling.k + s) for j, p in enumerate(prompts) for s in range(sampling.k)
        ]
        replies = list(self.pool.map(lambda r: self._one(r[0], sampling, r[1]), requests))
        return _grouped([t for t, _ in replies], sampling.k), _grouped([n for _, n in replies], sampling.k)

    def _one(self, prompt: Any, sampling: Sampling, seed: int) -> tuple[str, int]:
        chat = isinstance(prompt, list)
        temperature, top_p = sampling.temperature_top_p()
        body: dict[str, Any] = {
            "model": self.spec.model,
            ("messages" if chat else "prompt"): prompt,
            "max_tokens": sampling.max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
            **self.spec.extra_body,
        }
        url = f"{self.base}/{'chat/completions' if chat else 'completions'}"
        reply = endpoint.post(self.client, url, body, self.spec, "generation server")
        choice = (reply.get("choices") or [{}])[0]
        text = (choice.get("message") or {}).get("content") if chat else choice.get("text")
        if text is None:
            raise PosttrainError(
                f"generation server {url} sent a reply without a completion: {str(reply)[:200]}",
                fix="check that `server.model` names a model the server serves",
            )
        return text, int((reply.get("usage") or {}).get("completion_tokens") or 0)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()


def _free_memory() -> None:
    """After an engine drops its model: collect it now and hand its GPU memory back."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def vllm_usable() -> bool:
    """vLLM is an optional extra (`pip install posttrain[vllm]`), used only with a CUDA GPU."""
    import torch

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
