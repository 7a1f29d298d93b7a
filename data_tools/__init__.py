"""Data for every stage: loading files and hub datasets, column mapping, chat shaping, mixtures,
dedup and decontamination, curricula, synthetic tasks, and answer extraction.

Installed as `posttrain.data_tools`.
"""

from posttrain.data_tools.answers import answer_tag, extract_answer, final_answer, gsm8k_answer, last_boxed
from posttrain.data_tools.arithmetic import arithmetic_rows
from posttrain.data_tools.hygiene import DataReport
from posttrain.data_tools.loading import HubUnreachable, describe, load_rows, require_columns

__all__ = [
    "DataReport",
    "HubUnreachable",
    "answer_tag",
    "arithmetic_rows",
    "describe",
    "extract_answer",
    "final_answer",
    "gsm8k_answer",
    "last_boxed",
    "load_rows",
    "require_columns",
]
