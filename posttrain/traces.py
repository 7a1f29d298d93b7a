"""Teacher traces for distillation: batched sampling, rejection sampling, a resumable trace file.

DeepSeek-R1 distilled its dense students from ~800k samples written by the MoE model and
filtered by verifiers (rejection sampling). This module does that in three steps:

1. `sample_traces`: the teacher samples `samples_per_prompt` completions per prompt, a batch
   of prompts at a time, the batches split over every rank (vLLM when installed on a GPU,
   an OpenAI-compatible server with `generation.server`, transformers `generate` otherwise).
   Each batch is scored, then appended to `samples.jsonl` (one line per prompt: every sample,
   its verifier scores, whether it passed) and fsynced. A restarted stage reads the file back
   (a torn last line is ignored, then cut off) and continues with the prompts not yet done; each batch is
   sampled from a seed derived from its first prompt, so a resumed run draws what an
   uninterrupted one would have on the same hardware.
2. `rejection_sample`: the rule. A sample **passes when every verifier scores it at or above
   that verifier's `min_score`** (default 1.0, so binary rewards such as accuracy and format
   must both be 1); a verifier that returns None for a sample (it does not apply) fails it,
   so nothing unverified is kept. Up to `keep_per_prompt` *distinct* passing completions are
   kept per prompt, in sampling order. Without verifiers every sample passes (plain
   sequence-level distillation).
3. `kept_rows`: the kept traces as SFT rows (`prompt` + `completion`) with provenance
   (teacher, prompt and sample index, scores, the prompt's pass rate), written by the stage
   to `<stage>/data/traces.jsonl`.

A verifier is a reward with trl's signature, `fn(prompts, completions, **columns) -> list[float | None]`;
completions are conversational (`[{"role": "assistant", "content": ...}]`) when prompts are.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from posttrain import artifacts
from posttrain.console import progress
from posttrain.distributed import map_batches, on_main, state
from posttrain.generation import Sampling, open_engine
from posttrain.recipe import GenerationSpec, PathModel

RewardFn = Callable[..., list[float | None]]


@dataclasses.dataclass(frozen=True)
class Verifier:
    """A reward and the score a sample needs from it to pass."""

    name: str
    fn: RewardFn
    min_score: float = 1.0


# --------------------------------------------------------------------------- rejection sampling


def rejection_sample(
    rows: Sequence[dict[str, Any]],
    samples: Sequence[Sequence[str]],
    verifiers: Sequence[Verifier],
    keep_per_prompt: int,
) -> list[dict[str, Any]]:
    """Score every sample of every row and choose the kept ones; one record per row.

    `rows[i]` holds `prompt` and the columns the verifiers read; `samples[i]` its completions.
    A record is the row (without `messages`, the reference conversation) plus `samples`:
    [{completion, scores, passed}], `pass_rate` and `kept` (indices into samples)."""
    flat_rows = [row for row, group in zip(rows, samples, strict=True) for _ in group]
    flat = [text for group in samples for text in group]
    scores = {v.name: _score(v, flat_rows, flat) for v in verifiers}
    records, offset = [], 0
    for row, group in zip(rows, samples, strict=True):
        scored = []
        for j, text in enumerate(group):
            own = {name: s[offset + j] for name, s in scores.items()}
            passed = all(own[v.name] is not None and own[v.name] >= v.min_score for v in verifiers)
            scored.append({"completion": text, "scores": own, "passed": passed})
        offset += len(group)
        kept: list[int] = []
        for j, sample in enumerate(scored):
            distinct = all(scored[k]["completion"] != sample["completion"] for k in kept)
            if sample["passed"] and distinct and len(kept) < keep_per_prompt:
                kept.append(j)
        n_passed = sum(s["passed"] for s in scored)
        base = {k: v for k, v in row.items() if k != "messages"}
        records.append({**base, "samples": scored, "pass_rate": n_passed / max(len(scored), 1), "kept": kept})
    return records


def _score(verifier: Verifier, rows: list[dict[str, Any]], completions: list[str]) -> list[float | None]:
    prompts = [row["prompt"] for row in rows]
    conversational = bool(prompts) and isinstance(prompts[0], list)
    shaped = [[{"role": "assistant", "content": c}] for c in completions] if conversational else completions
    columns = (
        {k: [row[k] for row in rows] for k in rows[0] if k not in ("prompt", "completion")} if rows else {}
    )
    scores = list(verifier.fn(prompts=prompts, completions=shaped, **columns))
    if len(scores) != len(completions):
        raise ValueError(
            f"verifier '{verifier.name}' returned {len(scores)} scores for {len(completions)} samples"
        )
    return [None if s is None else float(s) for s in scores]


def kept_rows(records: Iterable[dict[str, Any]], teacher: str) -> Iterator[dict[str, Any]]:
    """The kept traces as SFT rows (`prompt` + `completion`, conversational when the prompt is),
    each with its provenance: teacher, prompt_index, sample_index, scores, pass_rate."""
    for record in records:
        prompt = record["prompt"]
        for j in record["kept"]:
            sample = record["samples"][j]
            text = sample["completion"]
            yield {
                "prompt": prompt,
                "completion": [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text,
                "teacher": teacher,
                "prompt_index": record["index"],
                "sample_index": j,
                "scores": sample["scores"],
                "pass_rate": record["pass_rate"],
            }


def trace_stats(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Pass rate over all samples, share of prompts with a pass, traces kept, mean score per verifier."""
    prompts = samples = passed = with_pass = kept = 0
    sums: dict[str, float] = {}
    for record in records:
        flags = [s["passed"] for s in record["samples"]]
        prompts, samples, kept = prompts + 1, samples + len(flags), kept + len(record["kept"])
        passed, with_pass = passed + sum(flags), with_pass + any(flags)
        for sample in record["samples"]:
            for name, score in sample["scores"].items():
                sums[name] = sums.get(name, 0.0) + (score or 0.0)
    return {
        "prompts": prompts,
        "samples": samples,
        "pass_rate": passed / max(samples, 1),
        "prompts_with_pass": with_pass / max(prompts, 1),
        "kept": kept,
        "verifier_means": {name: total / max(samples, 1) for name, total in sorted(sums.items())},
    }


# --------------------------------------------------------------------------- sampling


def sample_traces(
    teacher: PathModel | None,
    rows: Sequence[dict[str, Any]],
    verifiers: Sequence[Verifier],
    *,
    samples_per_prompt: int,
    keep_per_prompt: int,
    generation: GenerationSpec,
    path: Path,
    seed: int,
) -> dict[str, Any]:
    """Sample, verify and append every prompt not yet in `path` (records keep the row's `index`);
    returns the sampling throughput of this call. Read the records back with artifacts.iter_jsonl.

    The batches are split over the ranks (each rank samples and verifies its own); rank 0 appends
    each round's records in batch order, so the file is the same whatever the world size.
    `teacher` may be None when `generation.server` serves it."""
    done = on_main(lambda: {r["index"] for r in artifacts.iter_jsonl(path)})  # cuts a torn last line
    todo = [i for i in range(len(rows)) if i not in done]
    speed: dict[str, Any] = {"tokens": 0, "seconds": 0.0}
    if todo:
        sampling = Sampling(
            generation.max_new_tokens, samples_per_prompt, do_sample=True,
            temperature=generation.temperature, top_p=generation.top_p,
        )  # fmt: skip

        def one_batch(batch: list[int]) -> tuple[list[dict[str, Any]], int]:
            prompts = engine.render([rows[i]["prompt"] for i in batch], "distillation prompts")
            outputs, lengths = engine.complete(prompts, sampling, seed + batch[0])
            records = rejection_sample([rows[i] for i in batch], outputs, verifiers, keep_per_prompt)
            return [{"index": i, **r} for i, r in zip(batch, records, strict=True)], sum(map(sum, lengths))

        def append(finished: list[tuple[list[int], tuple[list[dict[str, Any]], int]]]) -> None:
            if state().is_main_process:
                artifacts.append_jsonl(path, [record for _, (records, _) in finished for record in records])
            speed["tokens"] += sum(tokens for _, (_, tokens) in finished)
            advance(sum(len(batch) for batch, _ in finished))

        started = time.perf_counter()
        bar = progress(f"teacher traces ({samples_per_prompt} per prompt)", len(todo))
        with open_engine(teacher, generation) as engine, bar as advance:
            map_batches(list(_chunks(todo, generation.batch_size)), one_batch, done=append)
        speed["seconds"] = time.perf_counter() - started
    speed["tokens_per_s"] = speed["tokens"] / speed["seconds"] if speed["seconds"] else None
    return speed


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
