"""AI judges: compare two answers to a prompt and say, as a probability, which is better.

One small module per backend, each with `build(spec, ctx, judge_id) -> Judge`:

    hf          a local causal LM; next-token probabilities of the two labels after `Verdict:`
    openai      an OpenAI-compatible endpoint over plain HTTP; label logprobs, else the strict verdict line
    likelihood  a stronger model's mean token log-likelihood of each answer (pointwise)
    reward      any registered reward, e.g. `accuracy` against the row's `answer` (pointwise)

A judge is either pairwise (`compare`: P(first shown is better) for each query) or pointwise
(`score`: one number per answer, turned into a preference by `sigmoid((s_a - s_b) / temperature)`).
Its `id` hashes everything that changes its verdicts (config, model identity, prompt version),
and keys its on-disk cache; batch sizes, timeouts and concurrency do not change it.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from posttrain import artifacts
from posttrain.context import StageContext
from posttrain.judges.prompt import PROMPT_VERSION
from posttrain.models import load_causal_lm, load_tokenizer

BACKENDS = {
    "hf": "posttrain.judges.hf",
    "likelihood": "posttrain.judges.likelihood",
    "openai": "posttrain.judges.openai",
    "reward": "posttrain.judges.reward",
}


@dataclasses.dataclass(frozen=True)
class PairQuery:
    """Judge `first` (shown first, as labels[0]) against `second` for `prompt`."""

    prompt: Any
    first: str
    second: str


@dataclasses.dataclass
class Judge:
    """What a backend builds. Exactly one of `compare` / `score` is set.

    compare(queries) -> [{"p_first": float | None, "rationale": str | None, "mass": float | None}]
        p_first: P(the first answer is better); None when the judge gave no usable verdict;
        mass: the probability the judge put on the two labels together (low = off-format).
    score(items) -> [float | None]: one number per (prompt, answer, columns), higher is better;
        `columns` holds the row's values of the dataset columns the judge reads (`columns`)."""

    id: str
    batch_size: int
    compare: Callable[[list[PairQuery]], list[dict[str, Any]]] | None = None
    score: Callable[[list[tuple[Any, str, dict[str, Any]]]], list[float | None]] | None = None
    columns: tuple[str, ...] = ()
    temperature: float = 1.0
    principles: list[str] | None = None
    close: Callable[[], None] = lambda: None


def build_judge(spec: Any, ctx: StageContext) -> Judge:
    """The judge a recipe's `judge:` block describes, with its cache id."""
    module = importlib.import_module(BACKENDS[spec.backend])
    model = judge_model(spec)
    identity = {
        "config": spec.model_dump(mode="json", exclude=set(spec.runtime_keys)),
        "model": model_identity(model, ctx) if model is not None else None,
        "prompt_version": PROMPT_VERSION,
    }
    return module.build(spec, ctx, f"{spec.backend}-{artifacts.canonical_hash(identity)}")


def judge_model(spec: Any) -> Any:
    """The model slot a judge loads (None for a remote judge or a model-free reward)."""
    if spec.backend in ("hf", "likelihood"):
        return spec.model
    if spec.backend == "reward":
        return spec.reward.model
    return None


def model_identity(ref: Any, ctx: StageContext) -> str:
    """What makes a judge model this model: a stage's completion id, a local folder's content hash,
    or a hub id and revision."""
    if isinstance(ref, str) and ref in ctx.stage_dirs:
        manifest = artifacts.read_json(ctx.stage_dirs[ref] / artifacts.MANIFEST) or {}
        if manifest.get("completion_id"):
            return f"stage:{manifest['completion_id']}"
    source = ctx.model(ref)
    path = Path(source.path)
    if path.exists():
        return f"path:{artifacts.path_fingerprint(path)}"
    return f"hub:{source.path}@{source.revision or 'main'}"


def load_local_model(ref: Any, ctx: Any) -> tuple[Any, Any]:
    """A local judge's tokenizer and causal LM, in eval mode, on the GPU when there is one."""
    import torch

    source = ctx.model(ref)
    model = load_causal_lm(source).eval()
    return load_tokenizer(source), model.to("cuda") if torch.cuda.is_available() else model


def principles_hash(principles: list[str] | None) -> str | None:
    return artifacts.canonical_hash(principles) if principles else None
