"""Curriculum: order rows by difficulty (a column) or by length, easy first by default.

    data: {synthetic: arithmetic, n: 4000, digits: 3, curriculum: {by: difficulty, buckets: 3}}

Without `buckets` the order is a stable sort (ties keep a seeded shuffle's order). With
`buckets: k` the rows are cut into k bands of equal size by difficulty, each band shuffled
with the seed: easy-to-hard between bands, varied within. The trainer must not reshuffle
(recipe validation asks for `train_sampling_strategy: sequential` or `shuffle_dataset: false`).
"""

from __future__ import annotations

from typing import Any

from posttrain.data_tools.hygiene import row_text
from posttrain.errors import PosttrainError
from posttrain.recipe import CurriculumSpec


def difficulties(dataset: Any, by: str, label: str) -> list[float]:
    if by in dataset.column_names:
        values = dataset[by]
        try:
            return [float(v) for v in values]
        except (TypeError, ValueError):
            raise PosttrainError(f"{label}: curriculum column '{by}' is not numeric") from None
    if by == "length":
        return [float(len(row_text(row))) for row in dataset]
    raise PosttrainError(
        f"{label}: curriculum by '{by}', but the data has: {', '.join(dataset.column_names)}",
        fix="use a numeric column, or `by: length`",
    )


def curriculum_order(scores: list[float], spec: CurriculumSpec, seed: int) -> list[int]:
    """Row indices in curriculum order."""
    import numpy as np

    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(len(scores)).tolist()
    sign = -1.0 if spec.order == "descending" else 1.0
    ordered = sorted(shuffled, key=lambda i: sign * scores[i])  # stable: ties stay shuffled
    if not spec.buckets:
        return ordered
    bands = np.array_split(np.array(ordered, dtype=int), min(spec.buckets, max(len(ordered), 1)))
    return [int(i) for band in bands for i in rng.permutation(band)]


def apply_curriculum(dataset: Any, spec: CurriculumSpec, seed: int, label: str) -> Any:
    order = curriculum_order(difficulties(dataset, spec.by, label), spec, seed)
    return dataset.select(order).flatten_indices()
