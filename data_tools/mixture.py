"""Mixtures: several sources, each a share (`weight`) of the rows or a fixed `count`.

    data:
      mix:
        - {data: {path: gsm8k.jsonl, columns: {prompt: question}}, weight: 3}
        - {data: {synthetic: arithmetic, n: 5000}, weight: 1}
        - {data: {path: hard.parquet}, count: 200}
      n: 4000                                    # optional: default uses each weighted row once at most

Sources keep the columns they all share. Rows are drawn without repetition while a source has
enough (a `count` above its size repeats it, which the data report shows), then the whole
mixture is shuffled with the recipe seed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from posttrain.data_tools.hygiene import DataReport
from posttrain.errors import PosttrainError
from posttrain.recipe import MixtureData


def plan_counts(
    sizes: list[int], weights: list[float | None], counts: list[int | None], n: int | None
) -> list[int]:
    """Rows to draw from each source. Counted sources get their count; weighted ones share the
    rest of `n` by weight (default: as many as the scarcest weighted source allows unrepeated)."""
    weighted = [i for i, c in enumerate(counts) if c is None]
    plan = [c or 0 for c in counts]
    if not weighted:
        return plan
    w = {i: weights[i] if weights[i] is not None else 1.0 for i in weighted}
    total_w = sum(w.values())
    rest = n - sum(plan) if n is not None else min(int(sizes[i] * total_w / w[i]) for i in weighted)
    shares = {i: rest * w[i] / total_w for i in weighted}
    for i in weighted:
        plan[i] = int(shares[i])
    leftover = rest - sum(plan[i] for i in weighted)  # largest remainders get the rounding
    for i in sorted(weighted, key=lambda i: shares[i] - int(shares[i]), reverse=True)[:leftover]:
        plan[i] += 1
    return plan


def _draw(size: int, count: int, rng: Any) -> list[int]:
    """`count` indices of a source of `size` rows: a permutation, repeated when count > size."""
    indices: list[int] = []
    while len(indices) < count:
        indices.extend(rng.permutation(size)[: count - len(indices)].tolist())
    return indices


def common_columns(datasets: list[Any], label: str) -> list[str]:
    columns = [c for c in datasets[0].column_names if all(c in d.column_names for d in datasets[1:])]
    if not columns:
        raise PosttrainError(
            f"{label}: the sources share no column", fix="map them to the same names with `columns:`"
        )
    return columns


def concatenate(datasets: list[Any], label: str) -> Any:
    """One dataset from several with the columns they share; types that differ are one error."""
    from datasets import concatenate_datasets

    columns = common_columns(datasets, label)
    parts = [d.select_columns(columns) for d in datasets]
    try:
        parts = [parts[0], *(p.cast(parts[0].features) for p in parts[1:])]
        return concatenate_datasets(parts)
    except (ValueError, TypeError) as e:
        raise PosttrainError(
            f"{label}: the sources' columns have different types: {str(e).splitlines()[0]}",
            fix="map the sources to the same column formats",
        ) from None


def mix(
    spec: MixtureData,
    seed: int,
    load: Callable[[Any], Any],
    clean: Callable[[list[Any]], list[Any]],
    report: DataReport,
    label: str,
) -> Any:
    """The mixed rows: each source loaded, cleaned together (`clean`), drawn by plan, shuffled."""
    import numpy as np

    sources = clean([load(source.data) for source in spec.mix])
    sizes = [len(d) for d in sources]
    for i, size in enumerate(sizes):
        if size == 0:
            raise PosttrainError(f"{label}: source {i + 1} of the mixture has no rows")
    counts = plan_counts(sizes, [s.weight for s in spec.mix], [s.count for s in spec.mix], spec.n)
    seed = seed if spec.seed is None else spec.seed
    picked = []
    for i, (dataset, count) in enumerate(zip(sources, counts, strict=True)):
        picked.append(dataset.select(_draw(len(dataset), count, np.random.default_rng([seed, i]))))
        report.add(
            "mix", f"{label}[{i}]", len(dataset), 0, taken=count, repeated=max(0, count - len(dataset))
        )
    return concatenate(picked, label).shuffle(seed=seed).flatten_indices()
