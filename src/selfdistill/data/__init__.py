"""Problems in one schema: benchmark loaders and a generic JSONL / Parquet loader."""

from selfdistill.data.benchmarks import (
    BENCHMARKS,
    DATA_ROOT_ENV,
    DataFormatError,
    Problem,
    load_benchmark,
    load_problems,
    resolve_data_root,
)

__all__ = [
    "BENCHMARKS",
    "DATA_ROOT_ENV",
    "DataFormatError",
    "Problem",
    "load_benchmark",
    "load_problems",
    "resolve_data_root",
]
