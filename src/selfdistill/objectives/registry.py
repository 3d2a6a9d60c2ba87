"""Every training method as one entry of `OBJECTIVES`: token statistics in, per-token loss out.

The trainer looks a method up by name, computes the statistics it declares it needs, calls it,
and reduces the loss with `aggregate` in the method's aggregation mode. No if/elif on names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from selfdistill.objectives.advantages import (
    dasd_advantages,
    dasd_direction,
    egrsd_advantages,
    rlsd_advantages,
)
from selfdistill.objectives.distill import sampled_token_distill_loss
from selfdistill.objectives.policy import AGGREGATIONS, clip_fraction, policy_loss
from selfdistill.tokenstats import DivergenceSpec, TokenStats

Diagnostics = dict[str, Tensor]


@dataclass
class ObjectiveBatch:
    """What an objective sees for a batch (or a block) of rollouts.

    stats: student statistics with gradient; teacher statistics and divergence as needed.
    mask: `[B,T]` 1 on valid response tokens (EOS included). group_adv: `[B]` group advantages.
    old_logp: `[B,T]` behaviour-policy log-probs; `None` means exactly on-policy (ratio 1).
    """

    stats: TokenStats
    mask: Tensor
    group_adv: Tensor
    old_logp: Tensor | None = None

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
    s = batch.stats
    adv, diag = rlsd_advantages(batch.group_adv, s.logp, s.teacher_logp, batch.mask, lam=lam, eps_w=eps_w)
    loss, surrogate_diag = _surrogate(batch, adv, eps_low, eps_high)
    return loss, {**diag, **surrogate_diag}


def egrsd_loss(batch: ObjectiveBatch, *, lam: float = 1.0, eps_w: float = 0.2, g_min: float = 0.2,
               tau_h: float = 1.0, lookahead: int | None = None, eps_low: float = 0.2,
               eps_high: float = 0.2) -> tuple[Tensor, Diagnostics]:
    s = batch.stats
    adv, diag = egrsd_advantages(batch.group_adv, s.logp, s.teacher_logp, s.teacher_entropy, batch.mask,
                                 lam=lam, eps_w=eps_w, g_min=g_min, tau_h=tau_h, lookahead=lookahead)
    loss, surrogate_diag = _surrogate(batch, adv, eps_low, eps_high)
    return loss, {**diag, **surrogate_diag}


def dasd_loss(batch: ObjectiveBatch, *, rho: float = 0.2, beta: float = 1.0, direction: str = "dasd",
              router: str = "student_entropy", normalize: str = "mad", gate: bool = True, quantile: str = "top",
              eps_low: float = 0.2, eps_high: float = 0.2) -> tuple[Tensor, Diagnostics]:
    s = batch.stats
    adv, diag = dasd_advantages(batch.group_adv, s.logp, s.teacher_logp, s.entropy, batch.mask, rho=rho,
                                beta=beta, direction=direction, router=router, normalize=normalize, gate=gate,
                                quantile=quantile, teacher_entropy=s.teacher_entropy)
    loss, surrogate_diag = _surrogate(batch, adv, eps_low, eps_high)
    return loss, {**diag, **surrogate_diag}


def dasd_divergence_loss(batch: ObjectiveBatch, *, rho: float = 0.2, beta: float = 1.0, direction: str = "dasd",
                         router: str = "student_entropy", normalize: str = "mad", gate: bool = True,
                         quantile: str = "top", eps_low: float = 0.2,
                         eps_high: float = 0.2) -> tuple[Tensor, Diagnostics]:
    """DASD's full-vocabulary variant [reconstruction]: `ℓ_t = ℓ^GRPO_t + β·ω_t·D_t`, ω detached.

    With a bounded divergence `D` (JSD by default) the push (ω < 0) cannot diverge.
    """
    s = batch.stats
    routing = s.entropy if router == "student_entropy" else s.teacher_entropy
    if routing is None:
        raise ValueError(f"router={router!r} needs the teacher entropy")
    omega, _, diag = dasd_direction(routing, s.teacher_logp - s.logp, batch.mask, rho=rho, direction=direction,
                                    normalize=normalize, gate=gate, quantile=quantile)
    loss, surrogate_diag = _surrogate(batch, batch.group_adv, eps_low, eps_high)
    loss = loss + beta * omega.detach() * s.divergence * batch.mask
    return loss, {**diag, **surrogate_diag}


OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective("grpo", grpo_loss, "seq-mean-token-mean", needs_teacher=False),
        Objective("dapo", grpo_loss, "token-mean", needs_teacher=False, presets=(("eps_high", 0.28),)),
        Objective("dr_grpo", grpo_loss, "seq-mean-token-sum-norm", needs_teacher=False, std_normalize=False),
        Objective("opsd", opsd_loss, "token-mean", needs_teacher=True, divergence=DivergenceSpec(beta=0.5),
                  uses_old_logp=False),
        Objective("opsd_clip", opsd_loss, "token-mean", needs_teacher=True,
                  divergence=DivergenceSpec(beta=0.0, clip=0.05), uses_old_logp=False),
        Objective("opsd_sampled", opsd_sampled_loss, "token-mean", needs_teacher=True, uses_old_logp=False),
        Objective("rlsd", rlsd_loss, "token-mean", needs_teacher=True),
        Objective("egrsd", egrsd_loss, "token-mean", needs_teacher=True),
        Objective("cl_egrsd", egrsd_loss, "token-mean", needs_teacher=True, presets=(("lookahead", 8),)),
        Objective("dasd", dasd_loss, "token-mean", needs_teacher=True),
        Objective("dasd_divergence", dasd_divergence_loss, "token-mean", needs_teacher=True,
                  divergence=DivergenceSpec(beta=0.5)),
    )
}
