"""Objectives as pure functions over token statistics, selected by name through `OBJECTIVES`.

`register_objective` adds a method (ours in `registry` and `family`, a user's from their own package).
A per-token loss is reduced in its aggregation mode by `token_weights` (per-token weights from the counts
of the whole update; the trainer sums `loss · weights` over micro-batches) or, in one call on one batch,
by `aggregate`, which is `(loss · token_weights(...)).sum()`.
"""

from selfdistill.objectives.advantages import (
    antisd_advantages,
    dasd_advantages,
    dasd_direction,
    egrsd_advantages,
    gap_scale,
    jsd_ascent_signal,
    lookahead_mean,
    masked_quantile,
    rlrt_advantages,
    rlsd_advantages,
)
from selfdistill.objectives.distill import divergence, sampled_token_distill_loss
from selfdistill.objectives.family import position_weights  # importing it registers the family
from selfdistill.objectives.policy import (
    AGGREGATIONS,
    KnobError,
    aggregate,
    check_knob,
    clip_fraction,
    group_advantages,
    policy_loss,
    token_weights,
)
from selfdistill.objectives.registry import (
    OBJECTIVES,
    Objective,
    ObjectiveBatch,
    dasd_divergence_loss,
    loss_knobs,
    register_objective,
)

__all__ = [
    "AGGREGATIONS",
    "OBJECTIVES",
    "KnobError",
    "Objective",
    "ObjectiveBatch",
    "aggregate",
    "antisd_advantages",
    "check_knob",
    "clip_fraction",
    "dasd_advantages",
    "dasd_direction",
    "dasd_divergence_loss",
    "divergence",
    "egrsd_advantages",
    "gap_scale",
    "group_advantages",
    "jsd_ascent_signal",
    "lookahead_mean",
    "loss_knobs",
    "masked_quantile",
    "policy_loss",
    "position_weights",
    "register_objective",
    "rlrt_advantages",
    "rlsd_advantages",
    "sampled_token_distill_loss",
    "token_weights",
]
