"""Evaluation: accuracy over samples (Avg@k, pass@k, maj@k) and reasoning-health metrics."""

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

__all__ = [
    "EPISTEMIC_MARKERS",
    "avg_at_k",
    "entropy_stats",
    "epistemic_density",
    "epistemic_markers",
    "macro_average",
    "maj_at_k",
    "majority_vote",
    "pass_at_k",
    "pass_at_k_table",
    "repetition_rate",
    "response_length",
    "truncation_rate",
]
