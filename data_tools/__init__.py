"""Data for every stage: loading files and hub datasets, column mapping, synthetic tasks.

Installed as `posttrain.data_tools`.
"""

from posttrain.data_tools.answers import extract_answer
from posttrain.data_tools.arithmetic import arithmetic_rows
from posttrain.data_tools.loading import load_rows, require_columns

__all__ = ["arithmetic_rows", "extract_answer", "load_rows", "require_columns"]
