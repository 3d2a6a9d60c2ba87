"""Objectives as pure functions over token statistics, selected by name through `OBJECTIVES`.

`register_objective` adds a method (ours in `losses` and `family`, a user's from their own package); a built-in
method's knobs are a frozen dataclass in `knobs`, read by its loss and its advantage function.
A per-token loss is reduced in its aggregation mode by `token_weights` (per-token weights from the counts
of the whole update; the trainer sums `loss · weights` over micro-batches) or, in one call on one batch,
by `aggregate`, which is `(loss · token_weights(...)).sum()`.
"""

from selfdistill.objectives.advantages import (
    DasdDirection,
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
    shuffle_within_rows,
)
from selfdistill.objectives.distill import divergence, sampled_token_distill_loss
from selfdistill.objectives.family import position_weights  # importing it registers the family
from selfdistill.objectives.knobs import (
    AntisdKnobs,
    ClipKnobs,
    DasdDivergenceKnobs,
    DasdKnobs,
    DasdRoutingKnobs,
    EgrsdKnobs,
    RlrtKnobs,
    RlsdKnobs,
)
from selfdistill.objectives.losses import dasd_divergence_loss, dasd_loss, surrogate  # importing it registers them
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
    BlockObjective,
    Objective,
    ObjectiveBatch,
    loss_knobs,
    probe_batch,
    register_objective,
)

__all__ = [
    "AGGREGATIONS",
    "OBJECTIVES",
    "AntisdKnobs",
    "BlockObjective",
    "ClipKnobs",
    "DasdDirection",
    "DasdDivergenceKnobs",
    "DasdKnobs",
    "DasdRoutingKnobs",
    "EgrsdKnobs",
    "KnobError",
    "Objective",
    "ObjectiveBatch",
    "RlrtKnobs",
    "RlsdKnobs",
    "aggregate",
    "antisd_advantages",
    "check_knob",
    "clip_fraction",
    "dasd_advantages",
    "dasd_direction",
    "dasd_divergence_loss",
    "dasd_loss",
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
    "probe_batch",
    "register_objective",
    "rlrt_advantages",
    "rlsd_advantages",
    "sampled_token_distill_loss",
    "shuffle_within_rows",
    "surrogate",
    "token_weights",
]
