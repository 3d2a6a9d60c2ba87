"""Problems in one schema: benchmark loaders, a generic JSONL / Parquet loader, generated tasks."""

from selfdistill.data.benchmarks import (
    BENCHMARKS,
    DATA_ROOT_ENV,
    DataFormatError,
    Problem,
    load_benchmark,
    load_problems,
    resolve_data_root,
)
from selfdistill.data.generated import SYNTHETIC_TASKS, make_splits
from selfdistill.data.search import search_checks
from selfdistill.data.synthetic import arithmetic_word_problems, number_sums, operation_chains

__all__ = [
    "BENCHMARKS",
    "DATA_ROOT_ENV",
    "SYNTHETIC_TASKS",
    "DataFormatError",
    "Problem",
    "arithmetic_word_problems",
    "load_benchmark",
    "load_problems",
    "make_splits",
    "number_sums",
    "operation_chains",
    "resolve_data_root",
    "search_checks",
]
