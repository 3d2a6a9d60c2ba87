"""Objectives as pure functions over token statistics, selected by name through `OBJECTIVES`."""

from selfdistill.objectives.advantages import (
    dasd_advantages,
    dasd_direction,
    egrsd_advantages,
    lookahead_mean,
    masked_quantile,
    rlsd_advantages,
)
from selfdistill.objectives.distill import divergence, sampled_token_distill_loss
from selfdistill.objectives.policy import (
    AGGREGATIONS,
    aggregate,
    clip_fraction,
    group_advantages,
    policy_loss,
    token_weights,
)
from selfdistill.objectives.registry import OBJECTIVES, Objective, ObjectiveBatch, dasd_divergence_loss

__all__ = [
    "AGGREGATIONS",
    "OBJECTIVES",
    "Objective",
    "ObjectiveBatch",
    "aggregate",
    "clip_fraction",
    "dasd_advantages",
    "dasd_direction",
    "dasd_divergence_loss",
    "divergence",
    "egrsd_advantages",
    "group_advantages",
    "lookahead_mean",
    "masked_quantile",
    "policy_loss",
    "rlsd_advantages",
    "sampled_token_distill_loss",
    "token_weights",
]
