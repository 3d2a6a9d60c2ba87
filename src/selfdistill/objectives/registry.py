"""Every training method as one entry of `OBJECTIVES`: token statistics in, per-token loss out.

The trainer looks a method up by name, computes the statistics it declares it needs, calls it, and
reduces the per-token loss in the method's aggregation mode (`objective.aggregation` in the config
overrides it): it multiplies the loss by `token_weights` of each micro-batch, computed with the counts of
the whole update (all micro-batches and processes), and sums. That is `aggregate` of the whole update,
which is itself `(loss · token_weights(...)).sum()`; tests/test_objectives.py checks the two agree
(test_trainer_reduction_with_token_weights_is_aggregate_of_the_whole_batch). No if/elif on names.
A package of one's own adds a method with `register_objective` (see docs/objectives.md).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from selfdistill.objectives.advantages import (
    ROUTERS,
    dasd_advantages,
    dasd_direction,
    egrsd_advantages,
    rlsd_advantages,
)
from selfdistill.objectives.distill import sampled_token_distill_loss
from selfdistill.objectives.policy import AGGREGATIONS, check_knob, clip_fraction, policy_loss
from selfdistill.tokenstats import DivergenceSpec, TokenStats

Diagnostics = dict[str, Tensor]


@dataclass
class ObjectiveBatch:
    """What an objective sees for a batch (or a block) of rollouts.

    stats: student statistics with gradient; teacher statistics and divergence as needed.
    mask: `[B,T]` 1 on valid response tokens (EOS included). group_adv: `[B]` group advantages.
    old_logp: `[B,T]` behaviour-policy log-probs; `None` means exactly on-policy (ratio 1).
    step: optimizer steps completed before this one (for methods with a schedule, e.g. REOPOLD's phases).
    Rows are whole rollouts: an objective may compute per-row statistics (positions, quantiles) from `mask`.
    """

    stats: TokenStats
    mask: Tensor
    group_adv: Tensor
    old_logp: Tensor | None = None
    step: int = 0

    @property
    def behaviour_logp(self) -> Tensor:
        return self.stats.logp.detach() if self.old_logp is None else self.old_logp


@dataclass(frozen=True)
class Objective:
    """A named method: its loss function and what the trainer must prepare for it.

    uses_old_logp: the loss reads `ObjectiveBatch.old_logp` (a clipped ratio); when it does not, the trainer
    skips the behaviour log-prob pass before several updates per rollout step.
    """

    name: str
    loss: Callable[..., tuple[Tensor, Diagnostics]]
    aggregation: str
    needs_teacher: bool
    divergence: DivergenceSpec | None = None
    std_normalize: bool = True
    presets: tuple[tuple[str, object], ...] = ()
    uses_old_logp: bool = True

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"{self.name}: unknown aggregation {self.aggregation!r}")

    def __call__(self, batch: ObjectiveBatch, **knobs) -> tuple[Tensor, Diagnostics]:
        return self.loss(batch, **{**dict(self.presets), **knobs})

    def knob_defaults(self) -> dict[str, object]:
        """Every knob of this method with its default (the loss signature's, then the presets)."""
        return {**loss_knobs(self.loss), **dict(self.presets)}


def loss_knobs(loss: Callable[..., object]) -> dict[str, object]:
    """The keyword-only parameters of a loss function and their defaults: the method's knobs."""
    return {name: p.default for name, p in inspect.signature(loss).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


OBJECTIVES: dict[str, Objective] = {}
"""Every method by name. Add to it with `register_objective`, not by assignment."""


def register_objective(
    name: str,
    loss: Callable[..., tuple[Tensor, Diagnostics]] | None = None,
    *,
    aggregation: str = "token-mean",
    needs_teacher: bool = True,
    divergence: DivergenceSpec | None = None,
    std_normalize: bool = True,
    presets: dict[str, object] | None = None,
    uses_old_logp: bool = True,
    replace: bool = False,
):
    """Add a method to `OBJECTIVES`; as a function, or as a decorator when `loss` is left out:

        @register_objective("my_method", aggregation="token-mean", needs_teacher=True)
        def my_loss(batch: ObjectiveBatch, *, alpha: float = 0.5) -> tuple[Tensor, dict[str, Tensor]]:
            ...

    `loss(batch, **knobs)` gets an `ObjectiveBatch` and returns a per-token loss `[B,T]` (zero where
    `batch.mask` is 0) and a dict of scalar diagnostics. Its keyword-only parameters, each with a default,
    are the method's knobs: `objective.knobs.<name>` (or `objective.<name>`) in a config sets them, checked
    against their annotations. `needs_teacher` makes the trainer score the teacher (`stats.teacher_logp`,
    `stats.teacher_entropy`); `divergence` makes it compute `stats.divergence` with that spec; `presets`
    override knob defaults for this name (one loss can back several methods); `uses_old_logp=False` says the loss
    never reads `batch.old_logp` (no clipped ratio), so the trainer skips the behaviour log-prob pass before
    several updates per rollout step (`optim.ppo_epochs`, `optim.mini_batches`). A taken name is an error
    unless `replace=True`. Returns the loss (so the decorator leaves the function as it was).
    """
    if loss is None:
        return lambda fn: register_objective(name, fn, aggregation=aggregation, needs_teacher=needs_teacher,
                                             divergence=divergence, std_normalize=std_normalize, presets=presets,
                                             uses_old_logp=uses_old_logp, replace=replace)
    if not name or not isinstance(name, str):
        raise ValueError(f"an objective needs a non-empty name, got {name!r}")
    if name in OBJECTIVES and not replace:
        raise ValueError(f"objective {name!r} is already registered (pass replace=True to override it)")
    positional = [p for p in inspect.signature(loss).parameters.values()
                  if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    if len(positional) != 1:
        raise ValueError(f"{name}: the loss must take exactly one positional argument (the batch), "
                         f"got {[p.name for p in positional]}")
    knobs = loss_knobs(loss)
    missing = [k for k, default in knobs.items() if default is inspect.Parameter.empty]
    if missing:
        raise ValueError(f"{name}: every knob needs a default, {missing} have none")
    unknown = sorted(set(presets or {}) - set(knobs))
    if unknown:
        raise ValueError(f"{name}: presets {unknown} are not knobs of {loss.__name__} ({sorted(knobs)})")
    OBJECTIVES[name] = Objective(name, loss, aggregation, needs_teacher=needs_teacher, divergence=divergence,
                                 std_normalize=std_normalize, presets=tuple((presets or {}).items()),
                                 uses_old_logp=uses_old_logp)
    return loss


def _surrogate(batch: ObjectiveBatch, advantages: Tensor, eps_low: float,
               eps_high: float) -> tuple[Tensor, Diagnostics]:
    logp, old = batch.stats.logp, batch.behaviour_logp
    loss = policy_loss(logp, old, advantages, batch.mask, eps_low=eps_low, eps_high=eps_high)
    frac = clip_fraction(logp.detach(), old, advantages, batch.mask, eps_low=eps_low, eps_high=eps_high)
    return loss, {"clip_fraction": frac}


def grpo_loss(batch: ObjectiveBatch, *, eps_low: float = 0.2, eps_high: float = 0.2) -> tuple[Tensor, Diagnostics]:
    """Clipped surrogate with the group advantage on every token (GRPO, DAPO, Dr.GRPO)."""
    return _surrogate(batch, batch.group_adv, eps_low, eps_high)


def opsd_loss(batch: ObjectiveBatch) -> tuple[Tensor, Diagnostics]:
    """Full-vocabulary divergence to the teacher on every token (OPSD)."""
    return batch.stats.divergence * batch.mask, {}


def opsd_sampled_loss(batch: ObjectiveBatch) -> tuple[Tensor, Diagnostics]:
    """OPSD's sampled-token form `−sg(τ − s)·s`."""
    return sampled_token_distill_loss(batch.stats.logp, batch.stats.teacher_logp, batch.mask), {}


def rlsd_loss(batch: ObjectiveBatch, *, lam: float = 0.5, eps_w: float = 0.2, eps_low: float = 0.2,
              eps_high: float = 0.2) -> tuple[Tensor, Diagnostics]:
    """RLSD: the clipped surrogate with `rlsd_advantages` (the verifier's sign, the teacher's magnitude)."""
    s = batch.stats
    adv, diag = rlsd_advantages(batch.group_adv, s.logp, s.teacher_logp, batch.mask, lam=lam, eps_w=eps_w)
    loss, surrogate_diag = _surrogate(batch, adv, eps_low, eps_high)
    return loss, {**diag, **surrogate_diag}


def egrsd_loss(batch: ObjectiveBatch, *, lam: float = 1.0, eps_w: float = 0.2, g_min: float = 0.2,
               tau_h: float = 1.0, lookahead: int | None = None, eps_low: float = 0.2,
               eps_high: float = 0.2) -> tuple[Tensor, Diagnostics]:
    """EGRSD / CL-EGRSD: the clipped surrogate with `egrsd_advantages` (RLSD × a teacher-entropy gate)."""
    s = batch.stats
    adv, diag = egrsd_advantages(batch.group_adv, s.logp, s.teacher_logp, s.teacher_entropy, batch.mask,
                                 lam=lam, eps_w=eps_w, g_min=g_min, tau_h=tau_h, lookahead=lookahead)
    loss, surrogate_diag = _surrogate(batch, adv, eps_low, eps_high)
    return loss, {**diag, **surrogate_diag}


def dasd_loss(batch: ObjectiveBatch, *, rho: float = 0.2, beta: float = 0.03, direction: str = "dasd",
              router: str = "student_entropy", normalize: str = "mad", gate: bool = True, quantile: str = "top",
              scale_floor: float = 0.1, push_signal: str = "jsd", push_beta: float = 0.5,
              eps_low: float = 0.2, eps_high: float = 0.2) -> tuple[Tensor, Diagnostics]:
    """DASD: the clipped surrogate with `dasd_advantages` (entropy-routed pull/push toward the teacher)."""
    s = batch.stats
    adv, diag = dasd_advantages(batch.group_adv, s.logp, s.teacher_logp, s.entropy, batch.mask, rho=rho,
                                beta=beta, direction=direction, router=router, normalize=normalize, gate=gate,
                                quantile=quantile, scale_floor=scale_floor, push_signal=push_signal,
                                push_beta=push_beta, teacher_entropy=s.teacher_entropy)
    loss, surrogate_diag = _surrogate(batch, adv, eps_low, eps_high)
    return loss, {**diag, **surrogate_diag}


def dasd_divergence_loss(batch: ObjectiveBatch, *, rho: float = 0.2, beta: float = 1.0, direction: str = "dasd",
                         router: str = "student_entropy", normalize: str = "mad", gate: bool = True,
                         quantile: str = "top", scale_floor: float = 0.1, eps_low: float = 0.2,
                         eps_high: float = 0.2) -> tuple[Tensor, Diagnostics]:
    """DASD's full-vocabulary variant [reconstruction]: `ℓ_t = ℓ^GRPO_t + β·ω_t·D_t`, ω detached.

    With a bounded divergence `D` (JSD by default) the push (ω < 0) cannot diverge.
    """
    if router not in ROUTERS:
        raise ValueError(f"unknown DASD router {router!r}; choose one of {ROUTERS}")
    s = batch.stats
    routing = s.entropy if router == "student_entropy" else s.teacher_entropy
    check_knob(router in ROUTERS, "router", f"must be one of {ROUTERS}, got {router!r}")
    if routing is None:
        raise ValueError(f"router={router!r} needs the teacher entropy")
    omega, _, diag = dasd_direction(routing, s.teacher_logp - s.logp, batch.mask, rho=rho, direction=direction,
                                    normalize=normalize, gate=gate, quantile=quantile, scale_floor=scale_floor)
    loss, surrogate_diag = _surrogate(batch, batch.group_adv, eps_low, eps_high)
    loss = loss + beta * omega.detach() * s.divergence * batch.mask
    return loss, {**diag, **surrogate_diag}


register_objective("grpo", grpo_loss, aggregation="seq-mean-token-mean", needs_teacher=False)
register_objective("dapo", grpo_loss, needs_teacher=False, presets={"eps_high": 0.28})
register_objective("dr_grpo", grpo_loss, aggregation="seq-mean-token-sum-norm", needs_teacher=False,
                   std_normalize=False)
register_objective("opsd", opsd_loss, divergence=DivergenceSpec(beta=0.5), uses_old_logp=False)
register_objective("opsd_clip", opsd_loss, divergence=DivergenceSpec(beta=0.0, clip=0.05), uses_old_logp=False)
register_objective("opsd_sampled", opsd_sampled_loss, uses_old_logp=False)
register_objective("rlsd", rlsd_loss)
register_objective("egrsd", egrsd_loss)
register_objective("cl_egrsd", egrsd_loss, presets={"lookahead": 8})
register_objective("dasd", dasd_loss)
register_objective("dasd_divergence", dasd_divergence_loss, divergence=DivergenceSpec(beta=0.5))
