"""Token-level advantages shaped by the privileged self-teacher: RLSD, RLRT, EGRSD, CL-EGRSD, DASD, AntiSD.

Each takes the group advantage `A_i` `[B]`, per-token statistics `[B,T]` and the method's knobs (a frozen
dataclass of `objectives.knobs`, checked when built), and returns `(advantages [B,T], diagnostics)`. Every
input statistic is treated as a constant (detached): the gradient flows only through the policy surrogate
these advantages are plugged into.
Notation: `s_t = log p_S(y_t)`, `τ_t = log p_T(y_t)`, `δ_t = τ_t − s_t`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from selfdistill.objectives.knobs import (
    NORMALIZATIONS,
    AntisdKnobs,
    DasdKnobs,
    DasdRoutingKnobs,
    EgrsdKnobs,
    RlrtKnobs,
    RlsdKnobs,
)
from selfdistill.objectives.policy import check_knob, check_same_shape


def _check_group_adv(group_adv: Tensor, mask: Tensor) -> None:
    if group_adv.dim() != 1 or group_adv.shape[0] != mask.shape[0]:
        raise ValueError(f"group_adv must be [B]={mask.shape[0]}, got shape {tuple(group_adv.shape)}")


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over each row's valid tokens, `[B,1]`; 0 for a row with none."""
    return (x * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1.0)


def masked_mean_abs_dev(x: Tensor, mask: Tensor) -> Tensor:
    """Mean absolute deviation from the row mean over valid tokens, `[B,1]`."""
    return masked_mean((x - masked_mean(x, mask)).abs(), mask)


def masked_std(x: Tensor, mask: Tensor) -> Tensor:
    """Population standard deviation over each row's valid tokens, `[B,1]`."""
    return masked_mean((x - masked_mean(x, mask)) ** 2, mask).sqrt()


def masked_quantile(x: Tensor, mask: Tensor, q: float) -> Tensor:
    """The q-quantile (linear interpolation, as `torch.quantile`) of each row's valid tokens, `[B,1]`.

    A row with no valid token gets 0.
    """
    valid = mask > 0
    counts = valid.sum(1)  # [B]
    ordered = x.masked_fill(~valid, float("inf")).sort(dim=1).values  # [B,T] valid values first
    position = q * (counts - 1).clamp(min=0).to(x.dtype)  # [B]
    lo = position.floor().long()
    hi = position.ceil().long()
    frac = (position - lo.to(x.dtype))[:, None]  # [B,1]
    lo_val = ordered.gather(1, lo[:, None])  # [B,1]
    hi_val = ordered.gather(1, hi[:, None])  # [B,1]
    result = lo_val + frac * (hi_val - lo_val)
    return torch.where(counts[:, None] > 0, result, torch.zeros_like(result))


def _likelihood_ratio_weight(group_adv: Tensor, gap: Tensor, eps_w: float) -> Tensor:
    """`clip(exp(sign(A)·δ_t), 1−eps_w, 1+eps_w)`, `[B,T]`."""
    return torch.exp(group_adv.sign()[:, None] * gap).clamp(1.0 - eps_w, 1.0 + eps_w)


def rlsd_advantages(
    group_adv: Tensor,
    student_logp: Tensor,
    teacher_logp: Tensor,
    mask: Tensor,
    knobs: RlsdKnobs = RlsdKnobs(),
) -> tuple[Tensor, dict[str, Tensor]]:
    """RLSD: the verifier sets the direction, the teacher the magnitude per token.

    `Â_t = A·((1−λ) + λ·clip(exp(sign(A)·δ_t), 1−eps_w, 1+eps_w))`.
    """
    check_same_shape(student_logp=student_logp, teacher_logp=teacher_logp, mask=mask)
    _check_group_adv(group_adv, mask)
    lam, eps_w = knobs.lam, knobs.eps_w
    gap = (teacher_logp - student_logp).detach()  # [B,T]
    weight = _likelihood_ratio_weight(group_adv.detach(), gap, eps_w)  # [B,T]
    adv = group_adv.detach()[:, None] * ((1.0 - lam) + lam * weight) * mask  # [B,T]
    n = mask.sum().clamp(min=1.0)
    diagnostics = {
        "rlsd/weight_mean": (weight * mask).sum() / n,
        "rlsd/weight_clip_fraction": (((weight - 1.0).abs() >= eps_w - 1e-6).float() * mask).sum() / n,
    }
    return adv, diagnostics


def rlrt_advantages(
    group_adv: Tensor,
    student_logp: Tensor,
    teacher_logp: Tensor,
    mask: Tensor,
    knobs: RlrtKnobs = RlrtKnobs(),
) -> tuple[Tensor, dict[str, Tensor]]:
    """RLRT ("rebellious student"): RLSD's weight with the ratio reversed, on successful rollouts only.

    On rollouts with `A_i > 0`: `Â_t = A_i·((1−λ) + λ·clip(exp(s_t − τ_t), 1−eps_w, 1+eps_w))`, i.e.
    `exp(sign(A)·(log p_S − log p_T))`, which favours the tokens the student chose and the teacher
    would not have; every other rollout keeps its plain group advantage `A_i`. With 0/1 rewards,
    `A_i > 0` is exactly "this rollout succeeded in a group that also failed" (a group that all
    succeeded has `A = 0`, where any weight is moot).
    """
    check_same_shape(student_logp=student_logp, teacher_logp=teacher_logp, mask=mask)
    _check_group_adv(group_adv, mask)
    lam, eps_w = knobs.lam, knobs.eps_w
    reverse_gap = (student_logp - teacher_logp).detach()  # [B,T] log p_S − log p_T
    adv_i = group_adv.detach()  # [B]
    weight = _likelihood_ratio_weight(adv_i, reverse_gap, eps_w)  # [B,T]
    success = (adv_i > 0).to(mask.dtype)[:, None] * mask  # [B,T]
    scaled = adv_i[:, None] * ((1.0 - lam) + lam * weight)  # [B,T]
    adv = torch.where(success > 0, scaled, adv_i[:, None].expand_as(scaled)) * mask  # [B,T]
    n_success = success.sum().clamp(min=1.0)  # []
    diagnostics = {
        "rlrt/success_token_fraction": success.sum() / mask.sum().clamp(min=1.0),
        "rlrt/weight_mean": (weight * success).sum() / n_success,
        "rlrt/weight_clip_fraction": (((weight - 1.0).abs() >= eps_w - 1e-6).float() * success).sum() / n_success,
    }
    return adv, diagnostics


def lookahead_mean(x: Tensor, mask: Tensor, k: int) -> Tensor:
    """Mean of `x` over the next `k` valid positions after each position, `[B,T]`.

    Position t averages t+1 … t+k (valid tokens only, counted within the window); a position with
    no valid token after it keeps its own value.
    """
    B, T = x.shape
    zero = x.new_zeros(B, 1)
    csum = torch.cat([zero, (x * mask).cumsum(1)], dim=1)  # [B,T+1]
    ccount = torch.cat([zero, mask.float().cumsum(1)], dim=1)  # [B,T+1]
    idx = torch.arange(T, device=x.device)
    lo = idx + 1  # window start (exclusive of t itself)
    hi = (idx + 1 + k).clamp(max=T)
    total = csum[:, hi] - csum[:, lo]  # [B,T]
    count = ccount[:, hi] - ccount[:, lo]  # [B,T]
    return torch.where(count > 0, total / count.clamp(min=1.0), x)


def egrsd_advantages(
    group_adv: Tensor,
    student_logp: Tensor,
    teacher_logp: Tensor,
    teacher_entropy: Tensor,
    mask: Tensor,
    knobs: EgrsdKnobs = EgrsdKnobs(),
) -> tuple[Tensor, dict[str, Tensor]]:
    """EGRSD [reconstruction]: RLSD's weight times a teacher-entropy confidence gate.

    `Â_t = A·((1−λ) + λ·w_t)·g_t`, `g_t = g_min + (1−g_min)·exp(−H^T_t/τ_H)`, so every gate is at
    least `g_min`. `lookahead=K` is CL-EGRSD: `H^T_t` is replaced by
    `min(H^T_t, mean of H^T over the next K valid tokens)`, so a transient spike followed by low
    entropy keeps its weight while a sustained high-entropy span is damped.
    """
    check_same_shape(student_logp=student_logp, teacher_logp=teacher_logp, teacher_entropy=teacher_entropy,
                     mask=mask)
    _check_group_adv(group_adv, mask)
    lam, eps_w, g_min, tau_h, lookahead = knobs.lam, knobs.eps_w, knobs.g_min, knobs.tau_h, knobs.lookahead
    gap = (teacher_logp - student_logp).detach()  # [B,T]
    weight = _likelihood_ratio_weight(group_adv.detach(), gap, eps_w)  # [B,T]
    entropy = teacher_entropy.detach()
    if lookahead is not None:
        entropy = torch.minimum(entropy, lookahead_mean(entropy, mask, lookahead))
    gate = g_min + (1.0 - g_min) * torch.exp(-entropy / tau_h)  # [B,T], ≥ g_min
    adv = group_adv.detach()[:, None] * ((1.0 - lam) + lam * weight) * gate * mask  # [B,T]
    n = mask.sum().clamp(min=1.0)
    diagnostics = {
        "egrsd/gate_mean": (gate * mask).sum() / n,
        "egrsd/weight_mean": (weight * mask).sum() / n,
    }
    return adv, diagnostics


def gap_scale(gap: Tensor, mask: Tensor, *, normalize: str, scale_floor: float) -> Tensor:
    """The per-rollout scale `[B,1]` that DASD divides δ by: `max(MAD_i(δ), scale_floor)` (or the std;
    1 for `normalize="none"`).

    The floor [reconstruction] keeps float noise from becoming an O(1) signal: where teacher ≈ student
    (a live teacher, the sibling fallback) δ is ~1e-6 and so is its MAD, so without a floor
    `δ / MAD` would be of order 1. With the floor such a rollout's δ̄ stays ~1e-6 / scale_floor.
    """
    check_knob(normalize in NORMALIZATIONS, "normalize",
               f"must be one of {NORMALIZATIONS}, got {normalize!r}")
    check_knob(scale_floor >= 0, "scale_floor", f"must be >= 0, got {scale_floor}")
    if normalize == "none":
        return gap.new_ones(gap.shape[0], 1)
    scale = masked_mean_abs_dev(gap, mask) if normalize == "mad" else masked_std(gap, mask)  # [B,1]
    return scale.clamp(min=scale_floor)


def jsd_ascent_signal(student_logp: Tensor, teacher_logp: Tensor, *, beta: float = 0.5) -> Tensor:
    """AntiSD's per-token signal for *ascending* JSD_β [reconstruction, research notes §9.2], `[B,T]`:
    `log p_S(y_t) − log(β·p_T(y_t) + (1−β)·p_S(y_t))`, bounded above by `−log(1−β)`, unbounded below.

    For the mixture `M = β p_T + (1−β) p_S`, `∂JSD_β/∂p_S(v) = (1−β)·log(p_S(v)/M(v))`, so this is the
    REINFORCE signal that raises the divergence; 0 where student and teacher agree on the token.
    """
    check_knob(0.0 < beta < 1.0, "beta", f"must lie in (0, 1), got {beta}")
    s, t = student_logp.detach(), teacher_logp.detach()  # [B,T], [B,T]
    mix = torch.logaddexp(t + math.log(beta), s + math.log(1.0 - beta))  # [B,T] log M(y_t)
    return s - mix


class DasdDirection(NamedTuple):
    """What DASD's router gives: the direction `omega` `[B,T]` (> 0 pull, < 0 push), the normalized gap
    `gap_bar` `[B,T]`, the per-rollout `scale` `[B,1]` it was divided by, and diagnostics."""

    omega: Tensor
    gap_bar: Tensor
    scale: Tensor
    diagnostics: dict[str, Tensor]


def shuffle_within_rows(values: Tensor, mask: Tensor, *, step: int) -> Tensor:
    """`values` `[B,T]` with each row's valid entries (mask > 0) permuted among themselves; masked entries kept.

    The permutation of a row depends only on `step` and the row's number of valid tokens (a generator seeded by
    both), not on the row's place in the batch, so splitting a batch into blocks, micro-batches or processes
    gives the same result, and every step draws new permutations.
    """
    out = values.clone()
    for row in range(values.shape[0]):
        valid = mask[row].nonzero().squeeze(1)  # [L]
        length = valid.numel()
        if length < 2:
            continue
        generator = torch.Generator().manual_seed(1_000_003 * step + length)
        order = torch.randperm(length, generator=generator).to(valid.device)  # [L]
        out[row, valid] = values[row, valid[order]]
    return out


def dasd_direction(
    router_entropy: Tensor,
    gap: Tensor,
    mask: Tensor,
    knobs: DasdRoutingKnobs = DasdKnobs(),
    *,
    step: int = 0,
    eps: float = 1e-6,
) -> DasdDirection:
    """DASD's router (`DasdDirection`: ω, δ̄, the scale, diagnostics) from an entropy and the gap `δ = τ − s`.

    `δ̄_t = δ_t / (scale_i(δ) + eps)` per rollout (`normalize`: mean absolute deviation, std, or none;
    scale only, the sign is kept; the scale is at least `scale_floor`, see `gap_scale`). `τ_i` is the
    (1−ρ)-quantile of the rollout's entropies (`quantile="top"`: the top ρ most uncertain tokens are
    pushed) or the ρ-quantile (`quantile="bottom"`: only the calmest ρ are pulled); `σ_i` the entropies' mean absolute
    deviation. `ω_t = tanh((τ_i − H_t)/(σ_i + eps)) · sigmoid(|δ̄_t| − 1)` (the sigmoid is the
    reliability gate, dropped with `gate=False`). `direction="conform"` sets ω ≡ +1 (pull every
    token toward the teacher), `"novelty"` ω ≡ −1 (push every token away). `direction="shuffled"` is the
    routing's control: DASD's ω, then permuted among each rollout's valid tokens (`shuffle_within_rows`, seeded
    by `step`), so the push/pull term keeps its sizes and share but no longer follows the token's entropy.
    """
    rho, direction, normalize, quantile = knobs.rho, knobs.direction, knobs.normalize, knobs.quantile
    entropy = router_entropy.detach()
    gap = gap.detach()
    scale = gap_scale(gap, mask, normalize=normalize, scale_floor=knobs.scale_floor)  # [B,1]
    gap_bar = gap if normalize == "none" else gap / (scale + eps)  # [B,T]
    diagnostics: dict[str, Tensor] = {}
    if direction in ("dasd", "shuffled"):
        q = 1.0 - rho if quantile == "top" else rho
        tau = masked_quantile(entropy, mask, q)  # [B,1]
        sigma = masked_mean_abs_dev(entropy, mask)  # [B,1]
        omega = torch.tanh((tau - entropy) / (sigma + eps))  # [B,T] >0 calm, <0 uncertain
        if knobs.gate:
            omega = omega * torch.sigmoid(gap_bar.abs() - 1.0)
        diagnostics["dasd/tau_mean"] = tau.mean()
        if direction == "shuffled":
            omega = shuffle_within_rows(omega, mask, step=step)  # [B,T]
    else:
        omega = torch.full_like(entropy, 1.0 if direction == "conform" else -1.0)
    omega = omega * mask
    n = mask.sum().clamp(min=1.0)
    diagnostics.update({
        "dasd/pull_fraction": ((omega > 0).float() * mask).sum() / n,
        "dasd/push_fraction": ((omega < 0).float() * mask).sum() / n,
        "dasd/omega_mean": omega.sum() / n,
        "dasd/gap_bar_abs_mean": (gap_bar.abs() * mask).sum() / n,
    })
    return DasdDirection(omega, gap_bar, scale, diagnostics)


def dasd_advantages(
    group_adv: Tensor,
    student_logp: Tensor,
    teacher_logp: Tensor,
    student_entropy: Tensor,
    mask: Tensor,
    knobs: DasdKnobs = DasdKnobs(),
    *,
    teacher_entropy: Tensor | None = None,
    step: int = 0,
    eps: float = 1e-6,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DASD [structure from a note on the paper; details reconstructed]: `Â_t = A_i + β·ω_t·δ̄_t`.

    The defaults (`DasdKnobs`, which says where each comes from) [recon]: β = 0.01 and no floor on δ's scale,
    chosen on the third study's validation side (β was 1.0, then 0.03; the floor 0.1), and `push_signal="jsd"`
    (the bounded push; it was `"log_ratio"`, which at β = 0.03 collapsed one seed of three in the second study).

    Adding `β·δ̄_t` to a policy-gradient advantage is the sampled estimator of descending reverse
    KL(S‖T) (pull toward the teacher); `ω_t > 0` keeps that pull on low-entropy tokens and
    `ω_t < 0` turns it into ascent (push away) on high-entropy ones. See `dasd_direction` for ω.
    `router="teacher_entropy"` routes on the teacher's entropy (pass `teacher_entropy`). `step` (the rollout
    step, `ObjectiveBatch.step`) seeds the permutations of `direction="shuffled"`, the routing's control.

    `push_signal="jsd"` [reconstruction, the default since the study's sweep]: on push tokens (ω_t < 0) the raw
    log-ratio `δ_t` is replaced by `−δ^J_t`, AntiSD's bounded JSD-ascent signal (`jsd_ascent_signal`
    with β = `push_beta`), scaled by the same per-rollout scale, so the push term
    `β·|ω_t|·δ^J_t/scale_i ≤ β·(−log(1−push_beta))/scale_floor` cannot blow up where the teacher
    gives the token little mass. Pull tokens keep `δ̄_t`. `"log_ratio"` is the original (unbounded) form.
    """
    check_same_shape(student_logp=student_logp, teacher_logp=teacher_logp, student_entropy=student_entropy,
                     mask=mask, teacher_entropy=teacher_entropy)
    _check_group_adv(group_adv, mask)
    routing = router_entropy(knobs.router, student_entropy, teacher_entropy)
    omega, gap_bar, scale, diagnostics = dasd_direction(routing, teacher_logp - student_logp, mask, knobs, step=step,
                                                        eps=eps)
    signal = gap_bar  # [B,T]
    if knobs.push_signal == "jsd":
        ascent = jsd_ascent_signal(student_logp, teacher_logp, beta=knobs.push_beta)  # [B,T] ≤ −log(1−β_J)
        push_bar = -ascent if knobs.normalize == "none" else -ascent / (scale + eps)  # [B,T]
        signal = torch.where(omega < 0, push_bar, gap_bar)  # [B,T]
    adv = (group_adv.detach()[:, None] + knobs.beta * omega * signal) * mask  # [B,T]
    return adv, diagnostics


def router_entropy(router: str, student_entropy: Tensor, teacher_entropy: Tensor | None) -> Tensor:
    """The entropy DASD routes on: the student's, or the teacher's (`router="teacher_entropy"`, which needs it)."""
    if router == "student_entropy":
        return student_entropy
    if teacher_entropy is None:
        raise ValueError("router='teacher_entropy' needs teacher_entropy")
    return teacher_entropy


def antisd_advantages(
    group_adv: Tensor,
    student_logp: Tensor,
    teacher_logp: Tensor,
    teacher_entropy: Tensor,
    mask: Tensor,
    knobs: AntisdKnobs = AntisdKnobs(),
) -> tuple[Tensor, dict[str, Tensor]]:
    """AntiSD [abstract + derived signal; gate threshold, λ and the gate's scope reconstructed]:
    `Â_t = A_i + λ·g_i·δ^J_t` with the JSD-ascent signal `δ^J_t = s_t − log(β·p_T(y_t) + (1−β)·p_S(y_t))`.

    The signal is capped on one side by construction, `δ^J ≤ −log(1−β)` (see `jsd_ascent_signal`).
    `g_i = 1[mean of H^T over rollout i's tokens ≥ h_min]`: the term is switched off for a rollout on
    which the teacher's entropy has collapsed. The gate is per rollout (the paper's batch-level gate
    would depend on how the batch is split into micro-batches). `floor`, if set, also clamps `δ^J`
    from below at `−floor` (an option; off by default).
    """
    check_same_shape(student_logp=student_logp, teacher_logp=teacher_logp, teacher_entropy=teacher_entropy,
                     mask=mask)
    _check_group_adv(group_adv, mask)
    signal = jsd_ascent_signal(student_logp, teacher_logp, beta=knobs.beta)  # [B,T]
    if knobs.floor is not None:
        signal = signal.clamp(min=-knobs.floor)
    gate = (masked_mean(teacher_entropy.detach(), mask) >= knobs.h_min).to(signal.dtype)  # [B,1]
    adv = (group_adv.detach()[:, None] + knobs.lam * gate * signal) * mask  # [B,T]
    n = mask.sum().clamp(min=1.0)
    has_tokens = (mask.sum(1) > 0).to(signal.dtype)  # [B]
    diagnostics = {
        "antisd/signal_mean": (signal * mask).sum() / n,
        "antisd/signal_min": signal.masked_fill(mask == 0, float("inf")).min().clamp(max=0.0),
        "antisd/gate_on_fraction": (gate[:, 0] * has_tokens).sum() / has_tokens.sum().clamp(min=1.0),
    }
    return adv, diagnostics
