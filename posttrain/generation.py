"""Batched generation with transformers, shared by evaluation, labelling and distillation."""

from __future__ import annotations

import importlib.util
import time
from typing import Any

from posttrain.data_tools.chat_template import render_prompt


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
    from posttrain.console import progress

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs: list[list[str]] = []
    new_tokens = 0
    started = time.perf_counter()
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {"do_sample": False}
    )
    k = num_return_sequences
    try:
        with progress(description, len(prompts)) as advance:
            for i in range(0, len(prompts), batch_size):
                texts, tokens = _generate_batch(
                    model, tokenizer, prompts[i : i + batch_size], max_new_tokens, k, sampling
                )
                outputs.extend(texts[j : j + k] for j in range(0, len(texts), k))
                new_tokens += tokens
                advance(len(texts) // k)
    finally:
        tokenizer.padding_side = side
    seconds = time.perf_counter() - started
    return outputs, {
        "tokens": new_tokens,
        "seconds": seconds,
        "tokens_per_s": new_tokens / max(seconds, 1e-9),
    }


def _generate_batch(
    model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, k: int, sampling: dict[str, Any]
) -> tuple[list[str], int]:
    """k decoded completions per prompt of one left-padded batch, and the tokens generated."""
    import torch

    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    batch = batch.to(model_device(model))
    with torch.no_grad():
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            num_return_sequences=k,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            top_k=None,
            **sampling,
        )
    completion_ids = out[:, batch["input_ids"].shape[1] :]
    tokens = int((completion_ids != tokenizer.pad_token_id).sum())
    return tokenizer.batch_decode(completion_ids, skip_special_tokens=True), tokens


# --------------------------------------------------------------------------- vLLM (optional extra)


def vllm_usable() -> bool:
    """vLLM is an optional extra (`pip install posttrain[vllm]`), used only with a CUDA GPU."""
    import torch

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def generate_vllm(
    llm: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    max_new_tokens: int,
    num_return_sequences: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> tuple[list[list[str]], dict[str, float]]:
    """`generate` with a `vllm.LLM`: same inputs (rendered prompts), same outputs. Prompts are passed
    as token ids tokenised like `generate` does, so vLLM adds no second BOS."""
    from vllm import SamplingParams

    params = SamplingParams(
        n=num_return_sequences,
        max_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        skip_special_tokens=True,
    )
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    started = time.perf_counter()
    results = llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
    seconds = time.perf_counter() - started
    tokens = sum(len(o.token_ids) for r in results for o in r.outputs)
    outputs = [[o.text for o in r.outputs] for r in results]
    return outputs, {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / max(seconds, 1e-9)}
