"""Data for every stage: loading files and hub datasets, column mapping, chat shaping, mixtures,
dedup and decontamination, curricula, synthetic tasks, and answer extraction.

Installed as `posttrain.data_tools`.
"""

from posttrain.data_tools.answers import (
    extract_answer,
    extract_boxed,
    extract_gsm8k,
    extract_tag,
    normalize_answer,
    reference_answer,
)
from posttrain.data_tools.arithmetic import arithmetic_rows
from posttrain.data_tools.hygiene import DataReport
from posttrain.data_tools.loading import describe, load_rows, require_columns

__all__ = [
    "DataReport",
    "arithmetic_rows",
    "describe",
    "extract_answer",
    "extract_boxed",
    "extract_gsm8k",
    "extract_tag",
    "load_rows",
    "normalize_answer",
    "reference_answer",
    "require_columns",
]
