"""The self-distillation family around "why does self-distillation (sometimes) degrade reasoning?":
RLRT, vOPD, AntiSD, EOPD, REOPOLD and PW-OPSD, each a loss over an `ObjectiveBatch`, registered
through the same `register_objective` a user's own package would use.

Notation as in `advantages`: `s_t = log p_S(y_t)`, `τ_t = log p_T(y_t)`, `A_i` the group advantage,
`H^S_t`, `H^T_t` entropies, `D_t` the full-vocabulary divergence the method declares. Provenance in
each docstring: [paper] read in a paper, [code] read in the authors' or a re-implementation's code,
[recon] our choice where neither said; research notes §9 (docs/objectives.md has the table).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from selfdistill.objectives.advantages import antisd_advantages, masked_quantile, rlrt_advantages
from selfdistill.objectives.knobs import AntisdKnobs, ClipKnobs, RlrtKnobs
from selfdistill.objectives.losses import surrogate
from selfdistill.objectives.policy import check_knob, check_same_shape
from selfdistill.objectives.registry import Diagnostics, ObjectiveBatch, register_objective
from selfdistill.tokenstats import DivergenceSpec


def _token_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


@register_objective("rlrt", knobs=RlrtKnobs)
def rlrt_loss(batch: ObjectiveBatch, knobs: RlrtKnobs) -> tuple[Tensor, Diagnostics]:
    """RLRT, "rebellious student" (Kim et al. 2605.10781) [paper via secondary notes; λ, ε_w recon]:
    GRPO, where on successful rollouts (`A_i > 0`) the advantage is scaled by the clipped reverse ratio,
    `Â_t = A_i·((1−λ) + λ·clip(exp(s_t − τ_t), 1−ε_w, 1+ε_w))`, RLSD's weight with the sign flipped;
    failed rollouts keep plain GRPO. Then the clipped surrogate. Moves the student *away* from the
    teacher on its own successes. Plot `rlrt/weight_mean`, `rlrt/weight_clip_fraction`.
    """
    s = batch.stats
    adv, diag = rlrt_advantages(batch.group_adv, s.logp, s.teacher_logp, batch.mask, knobs)
    loss, surrogate_diag = surrogate(batch, adv, knobs)
    return loss, {**diag, **surrogate_diag}


def vopd_loss(batch: ObjectiveBatch, *, coef: float = 1.0, eps_low: float = 0.2,
              eps_high: float = 0.2) -> tuple[Tensor, Diagnostics]:
    """vOPD, "KL for a KL" (Oh et al. 2605.07865) [code]: the sampled-token reverse-KL policy gradient with
    the per-token KL(S‖T) as a detached control variate, added to the group advantage:
    `Â_t = A_i + coef·sg(τ_t − s_t + D_t)`, `D_t = Σ_v p_S(v)(log p_S(v) − log p_T(v))`, then the clipped
    surrogate. `D_t` does not depend on the sampled token, so it lowers the variance without a bias.
    `vopd_topk` takes `D_t` over the student's top-32 tokens, renormalized (k = 32 [recon]). Plot
    `vopd/kl_advantage_mean`, `vopd/kl_advantage_abs_mean`, `divergence`.
    """
    s = batch.stats
    check_same_shape(logp=s.logp, teacher_logp=s.teacher_logp, divergence=s.divergence, mask=batch.mask)
    kl_adv = (s.teacher_logp - s.logp + s.divergence).detach() * batch.mask  # [B,T]
    adv = (batch.group_adv.detach()[:, None] + coef * kl_adv) * batch.mask  # [B,T]
    loss, diag = surrogate(batch, adv, ClipKnobs(eps_low, eps_high))
    return loss, {"vopd/kl_advantage_mean": _token_mean(kl_adv, batch.mask),
                  "vopd/kl_advantage_abs_mean": _token_mean(kl_adv.abs(), batch.mask), **diag}


register_objective("vopd", vopd_loss, divergence=DivergenceSpec(beta=1.0))
register_objective("vopd_topk", vopd_loss, divergence=DivergenceSpec(beta=1.0, top_k=32, top_k_of="student"))


@register_objective("antisd", knobs=AntisdKnobs)
def antisd_loss(batch: ObjectiveBatch, knobs: AntisdKnobs) -> tuple[Tensor, Diagnostics]:
    """AntiSD (Shen et al. 2605.11609) [abstract; signal derived, gate threshold and λ recon]: the group
    advantage plus λ times the JSD-ascent signal, `Â_t = A_i + λ·g_i·(s_t − log(β p_T(y_t) + (1−β) p_S(y_t)))`,
    capped above at `−log(1−β)` by construction, gated off (`g_i = 0`) on a rollout whose mean teacher
    entropy is below `h_min`; then the clipped surrogate. See `antisd_advantages`. Plot
    `antisd/signal_mean`, `antisd/signal_min`, `antisd/gate_on_fraction`.
    """
    s = batch.stats
    adv, diag = antisd_advantages(batch.group_adv, s.logp, s.teacher_logp, s.teacher_entropy, batch.mask, knobs)
    loss, surrogate_diag = surrogate(batch, adv, knobs)
    return loss, {**diag, **surrogate_diag}


def eopd_loss(batch: ObjectiveBatch, *, h_threshold: float = 0.8, eps_low: float = 0.2,
              eps_high: float = 0.2) -> tuple[Tensor, Diagnostics]:
    """EOPD, entropy-aware OPD (Jin et al. 2603.07079) [code, a re-implementation]:
    `ℓ_t = ℓ^OPD_t + 1[H^T_t > h_threshold]·D_t`, with `ℓ^OPD` the PPO-clipped sampled-token reverse-KL
    policy gradient (advantage `sg(τ_t − s^old_t)`, ε = 0.2) and `D_t` the forward KL over the teacher's
    top-16 tokens, `Σ_k p̃_T(k)(log p̃_T(k) − log p_S(k))`, the teacher renormalized over them and the
    student's full-vocabulary log-probs. Token-mean. Plot
    `eopd/high_entropy_fraction`, `eopd/fkl_mean`, `clip_fraction`.
    """
    s = batch.stats
    check_same_shape(logp=s.logp, teacher_logp=s.teacher_logp, teacher_entropy=s.teacher_entropy,
                     divergence=s.divergence, mask=batch.mask)
    check_knob(h_threshold >= 0, "h_threshold", f"must be >= 0, got {h_threshold}")
    adv = (s.teacher_logp - batch.behaviour_logp).detach() * batch.mask  # [B,T]
    opd, diag = surrogate(batch, adv, ClipKnobs(eps_low, eps_high))
    high = (s.teacher_entropy.detach() > h_threshold).to(s.logp.dtype) * batch.mask  # [B,T]
    loss = opd + high * s.divergence * batch.mask  # [B,T]
    return loss, {"eopd/high_entropy_fraction": _token_mean(high, batch.mask),
                  "eopd/fkl_mean": _token_mean(s.divergence.detach(), batch.mask), **diag}


register_objective("eopd", eopd_loss, divergence=DivergenceSpec(beta=0.0, top_k=16, renormalize_student=False))


@register_objective("reopold", uses_old_logp=False)
def reopold_loss(batch: ObjectiveBatch, *, lam: float = 0.1, beta: float = 0.2,
                 switch_step: int | None = 50) -> tuple[Tensor, Diagnostics]:
    """REOPOLD, relaxed on-policy distillation (Ko et al. 2603.11137) [code, a re-implementation]:
    `ℓ_t = −M_t·R̂_t·s_t` with the reward `R_t = sg(τ_t − s_t)` floored, `R̂_t = max(R_t, log(λ)/(1−λ))`
    (the code's reading of the paper's `log λ/(1−λ)`; λ = 0.1 gives −2.56). Phase I (steps before
    `switch_step`): `M_t = 1[R_t ≥ floor]`, tokens the teacher all but rules out are dropped. Phase II:
    `M_t = 1[H^S_t ≥ (1−β)-quantile of H^S]`, only the top-β most uncertain tokens learn.
    [recon] The quantile is per rollout (the code's is over the batch, which would depend on the
    micro-batching), and the loss is normalized by the response tokens (the trainer's token-mean), not
    by `Σ M`. `switch_step=None` stays in phase I. Plot `reopold/phase`, `reopold/mask_fraction`,
    `reopold/floored_fraction`, `reopold/reward_mean`.
    """
    s = batch.stats
    check_same_shape(logp=s.logp, teacher_logp=s.teacher_logp, entropy=s.entropy, mask=batch.mask)
    check_knob(0.0 < lam < 1.0, "lam", f"must lie in (0, 1), got {lam}")
    check_knob(0.0 < beta <= 1.0, "beta", f"must lie in (0, 1], got {beta}")
    check_knob(switch_step is None or switch_step >= 0, "switch_step", f"must be >= 0 (or None), got {switch_step}")
    floor = math.log(lam) / (1.0 - lam)
    reward = (s.teacher_logp - s.logp).detach()  # [B,T]
    reward_hat = reward.clamp(min=floor)  # [B,T]
    refining = switch_step is not None and batch.step >= switch_step
    if refining:
        entropy = s.entropy.detach()
        threshold = masked_quantile(entropy, batch.mask, 1.0 - beta)  # [B,1]
        keep = (entropy >= threshold).to(reward.dtype)  # [B,T]
    else:
        keep = (reward >= floor).to(reward.dtype)  # [B,T]
    keep = keep * batch.mask
    loss = -keep * reward_hat * s.logp  # [B,T]
    return loss, {"reopold/phase": reward.new_tensor(2.0 if refining else 1.0),
                  "reopold/mask_fraction": _token_mean(keep, batch.mask),
                  "reopold/floored_fraction": _token_mean((reward < floor).to(reward.dtype), batch.mask),
                  "reopold/reward_mean": _token_mean(reward, batch.mask)}


def position_weights(mask: Tensor, *, w_min: float = 0.25, tau: float = 0.3, scale: float = 0.1) -> Tensor:
    """PW-OPSD's weight per token `[B,T]`: `w_min + (1−w_min)·sigmoid((u_t − tau)/scale)`, with
    `u_t = (t + 0.5)/|y_i|` the token's relative position in its own response (t counted over valid
    tokens from 0), so early tokens (where a path is chosen) weigh less than late ones. 0 where masked."""
    check_knob(0.0 <= w_min <= 1.0, "w_min", f"must lie in [0, 1], got {w_min}")
    check_knob(scale > 0, "scale", f"must be positive, got {scale}")
    index = mask.cumsum(1) - 1.0  # [B,T] 0-based position among valid tokens
    length = mask.sum(1, keepdim=True).clamp(min=1.0)  # [B,1]
    relative = (index + 0.5).clamp(min=0.0) / length  # [B,T]
    return (w_min + (1.0 - w_min) * torch.sigmoid((relative - tau) / scale)) * mask


def pw_opsd_loss(batch: ObjectiveBatch, *, w_min: float = 0.25, tau: float = 0.3,
                 scale: float = 0.1) -> tuple[Tensor, Diagnostics]:
    """PW-OPSD, position-weighted OPSD (Liu et al. 2605.21606) [code]: OPSD's clipped forward KL times a
    position weight, `ℓ_t = w_t·D_t`, `D_t = Σ_v min(p_T(v)(log p_T(v) − log p_S(v)), 0.05)`, `w_t` from
    `position_weights` (w_min 0.25, tau 0.30, scale 0.10); per-rollout mean, then the mean over rollouts
    (seq-mean-token-mean). Plot `pw_opsd/weight_mean`, `divergence`.
    """
    s = batch.stats
    check_same_shape(divergence=s.divergence, mask=batch.mask)
    weight = position_weights(batch.mask, w_min=w_min, tau=tau, scale=scale)  # [B,T]
    return weight * s.divergence * batch.mask, {"pw_opsd/weight_mean": _token_mean(weight, batch.mask)}


register_objective("pw_opsd", pw_opsd_loss, aggregation="seq-mean-token-mean",
                   divergence=DivergenceSpec(beta=0.0, clip=0.05), uses_old_logp=False)

__all__ = ["antisd_loss", "eopd_loss", "position_weights", "pw_opsd_loss", "reopold_loss", "rlrt_loss",
           "vopd_loss"]
