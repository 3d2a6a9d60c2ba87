"""Evaluation: accuracy over samples (Avg@k, pass@k, maj@k), reasoning-health metrics, and the runner
that samples, grades and summarizes benchmarks (`evaluate_problems`, `summarize`)."""

from selfdistill.evaluation.metrics import (
    EPISTEMIC_MARKERS,
    avg_at_k,
    entropy_stats,
    epistemic_density,
    epistemic_markers,
    macro_average,
    maj_at_k,
    majority_vote,
    pass_at_k,
    pass_at_k_table,
    repetition_rate,
    response_length,
    truncation_rate,
)

# The runner pulls in torch and transformers; its names (and the store's record type) are imported on first use,
# so that `selfdistill --help` and code that only needs the metrics stay fast.
_LAZY_EXPORTS = {"evaluate_problems": "runner", "problem_seed": "runner", "summarize": "runner",
                 "SampleRecord": "store"}


def __getattr__(name: str) -> object:
    if name in _LAZY_EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"selfdistill.evaluation.{_LAZY_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "EPISTEMIC_MARKERS",
    "SampleRecord",
    "avg_at_k",
    "entropy_stats",
    "epistemic_density",
    "epistemic_markers",
    "evaluate_problems",
    "macro_average",
    "maj_at_k",
    "majority_vote",
    "pass_at_k",
    "pass_at_k_table",
    "problem_seed",
    "repetition_rate",
    "response_length",
    "summarize",
    "truncation_rate",
]
