"""The built-in losses: GRPO / DAPO / Dr.GRPO, OPSD (full-vocabulary and sampled-token), RLSD, EGRSD / CL-EGRSD,
DASD and its full-vocabulary variant, each registered where it is defined. The self-distillation family (RLRT,
vOPD, AntiSD, EOPD, REOPOLD, PW-OPSD) is in `family`. Each method's knobs are a frozen dataclass of
`objectives.knobs`, read by the loss and by its advantage function alike.
"""

from __future__ import annotations

from torch import Tensor

from selfdistill.objectives.advantages import (
    dasd_advantages,
    dasd_direction,
    egrsd_advantages,
    rlsd_advantages,
    router_entropy,
)
from selfdistill.objectives.distill import sampled_token_distill_loss
from selfdistill.objectives.knobs import ClipKnobs, DasdDivergenceKnobs, DasdKnobs, EgrsdKnobs, RlsdKnobs
from selfdistill.objectives.policy import clip_fraction, policy_loss
from selfdistill.objectives.registry import Diagnostics, ObjectiveBatch, register_objective
from selfdistill.tokenstats import DivergenceSpec


def surrogate(batch: ObjectiveBatch, advantages: Tensor, clip: ClipKnobs | object) -> tuple[Tensor, Diagnostics]:
    """The clipped surrogate `[B,T]` with per-token `advantages` and `clip.eps_low` / `clip.eps_high` (any knobs
    object that has them), and its clip fraction."""
    logp, old = batch.stats.logp, batch.behaviour_logp
    loss = policy_loss(logp, old, advantages, batch.mask, eps_low=clip.eps_low, eps_high=clip.eps_high)
    frac = clip_fraction(logp.detach(), old, advantages, batch.mask, eps_low=clip.eps_low, eps_high=clip.eps_high)
    return loss, {"clip_fraction": frac}


@register_objective("grpo", aggregation="seq-mean-token-mean", needs_teacher=False, knobs=ClipKnobs)
@register_objective("dapo", needs_teacher=False, presets={"eps_high": 0.28}, knobs=ClipKnobs)
@register_objective("dr_grpo", aggregation="seq-mean-token-sum-norm", needs_teacher=False, std_normalize=False,
                    knobs=ClipKnobs)
def grpo_loss(batch: ObjectiveBatch, knobs: ClipKnobs) -> tuple[Tensor, Diagnostics]:
    """Clipped surrogate with the group advantage on every token (GRPO, DAPO, Dr.GRPO)."""
    return surrogate(batch, batch.group_adv, knobs)


@register_objective("opsd", divergence=DivergenceSpec(beta=0.5), uses_old_logp=False)
@register_objective("opsd_clip", divergence=DivergenceSpec(beta=0.0, clip=0.05), uses_old_logp=False)
def opsd_loss(batch: ObjectiveBatch) -> tuple[Tensor, Diagnostics]:
    """Full-vocabulary divergence to the teacher on every token (OPSD)."""
    return batch.stats.divergence * batch.mask, {}


@register_objective("opsd_sampled", uses_old_logp=False)
def opsd_sampled_loss(batch: ObjectiveBatch) -> tuple[Tensor, Diagnostics]:
    """OPSD's sampled-token form `−sg(τ − s)·s`."""
    return sampled_token_distill_loss(batch.stats.logp, batch.stats.teacher_logp, batch.mask), {}


@register_objective("rlsd", knobs=RlsdKnobs)
def rlsd_loss(batch: ObjectiveBatch, knobs: RlsdKnobs) -> tuple[Tensor, Diagnostics]:
    """RLSD: the clipped surrogate with `rlsd_advantages` (the verifier's sign, the teacher's magnitude)."""
    s = batch.stats
    adv, diag = rlsd_advantages(batch.group_adv, s.logp, s.teacher_logp, batch.mask, knobs)
    loss, surrogate_diag = surrogate(batch, adv, knobs)
    return loss, {**diag, **surrogate_diag}


@register_objective("egrsd", knobs=EgrsdKnobs)
@register_objective("cl_egrsd", presets={"lookahead": 8}, knobs=EgrsdKnobs)
def egrsd_loss(batch: ObjectiveBatch, knobs: EgrsdKnobs) -> tuple[Tensor, Diagnostics]:
    """EGRSD / CL-EGRSD: the clipped surrogate with `egrsd_advantages` (RLSD × a teacher-entropy gate)."""
    s = batch.stats
    adv, diag = egrsd_advantages(batch.group_adv, s.logp, s.teacher_logp, s.teacher_entropy, batch.mask, knobs)
    loss, surrogate_diag = surrogate(batch, adv, knobs)
    return loss, {**diag, **surrogate_diag}


@register_objective("dasd", knobs=DasdKnobs)
def dasd_loss(batch: ObjectiveBatch, knobs: DasdKnobs) -> tuple[Tensor, Diagnostics]:
    """DASD: the clipped surrogate with `dasd_advantages` (entropy-routed pull/push toward the teacher)."""
    s = batch.stats
    adv, diag = dasd_advantages(batch.group_adv, s.logp, s.teacher_logp, s.entropy, batch.mask, knobs,
                                teacher_entropy=s.teacher_entropy, step=batch.step)
    loss, surrogate_diag = surrogate(batch, adv, knobs)
    return loss, {**diag, **surrogate_diag}


@register_objective("dasd_divergence", divergence=DivergenceSpec(beta=0.5), knobs=DasdDivergenceKnobs)
def dasd_divergence_loss(batch: ObjectiveBatch, knobs: DasdDivergenceKnobs) -> tuple[Tensor, Diagnostics]:
    """DASD's full-vocabulary variant [reconstruction]: `ℓ_t = ℓ^GRPO_t + β·ω_t·D_t`, ω detached.

    With a bounded divergence `D` (JSD by default) the push (ω < 0) cannot diverge.
    """
    s = batch.stats
    routing = router_entropy(knobs.router, s.entropy, s.teacher_entropy)
    omega, _, _, diag = dasd_direction(routing, s.teacher_logp - s.logp, batch.mask, knobs, step=batch.step)
    loss, surrogate_diag = surrogate(batch, batch.group_adv, knobs)
    loss = loss + knobs.beta * omega.detach() * s.divergence * batch.mask
    return loss, {**diag, **surrogate_diag}
