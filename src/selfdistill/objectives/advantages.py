"""Token-level advantages shaped by the privileged self-teacher: RLSD, EGRSD, CL-EGRSD, DASD.

Each takes the group advantage `A_i` `[B]` and per-token statistics `[B,T]`, and returns
`(advantages [B,T], diagnostics)`. Every input statistic is treated as a constant (detached): the
gradient flows only through the policy surrogate these advantages are plugged into.
Notation: `s_t = log p_S(y_t)`, `τ_t = log p_T(y_t)`, `δ_t = τ_t − s_t`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from selfdistill.objectives.policy import check_same_shape

DIRECTIONS = ("dasd", "conform", "novelty")
ROUTERS = ("student_entropy", "teacher_entropy")
NORMALIZATIONS = ("mad", "std", "none")
QUANTILE_ENDS = ("top", "bottom")


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
    *,
    lam: float = 0.5,
    eps_w: float = 0.2,
) -> tuple[Tensor, dict[str, Tensor]]:
    """RLSD: the verifier sets the direction, the teacher the magnitude per token.

    `Â_t = A·((1−λ) + λ·clip(exp(sign(A)·δ_t), 1−eps_w, 1+eps_w))`.
    """
    check_same_shape(student_logp=student_logp, teacher_logp=teacher_logp, mask=mask)
    _check_group_adv(group_adv, mask)
    gap = (teacher_logp - student_logp).detach()  # [B,T]
    weight = _likelihood_ratio_weight(group_adv.detach(), gap, eps_w)  # [B,T]
    adv = group_adv.detach()[:, None] * ((1.0 - lam) + lam * weight) * mask  # [B,T]
    n = mask.sum().clamp(min=1.0)
    diagnostics = {
        "rlsd/weight_mean": (weight * mask).sum() / n,
        "rlsd/weight_clip_fraction": (((weight - 1.0).abs() >= eps_w - 1e-6).float() * mask).sum() / n,
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
    *,
    lam: float = 1.0,
    eps_w: float = 0.2,
    g_min: float = 0.2,
    tau_h: float = 1.0,
    lookahead: int | None = None,
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
    if not 0.0 < g_min <= 1.0:
        raise ValueError(f"g_min must lie in (0, 1], got {g_min}")
    if tau_h <= 0:
        raise ValueError(f"tau_h must be positive, got {tau_h}")
    if lookahead is not None and lookahead < 1:
        raise ValueError(f"lookahead must be >= 1, got {lookahead}")
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


def dasd_direction(
    router_entropy: Tensor,
    gap: Tensor,
    mask: Tensor,
    *,
    rho: float = 0.2,
    direction: str = "dasd",
    normalize: str = "mad",
    gate: bool = True,
    quantile: str = "top",
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """DASD's router: `(ω [B,T], δ̄ [B,T], diagnostics)` from an entropy and the gap `δ = τ − s`.

    `δ̄_t = δ_t / (scale_i(δ) + eps)` per rollout (`normalize`: mean absolute deviation, std, or none;
    scale only, the sign is kept). `τ_i` is the (1−ρ)-quantile of the rollout's entropies
    (`quantile="top"`: the top ρ most uncertain tokens are pushed) or the ρ-quantile
    (`quantile="bottom"`: only the calmest ρ are pulled); `σ_i` the entropies' mean absolute
    deviation. `ω_t = tanh((τ_i − H_t)/(σ_i + eps)) · sigmoid(|δ̄_t| − 1)` (the sigmoid is the
    reliability gate, dropped with `gate=False`). `direction="conform"` sets ω ≡ +1 (pull every
    token toward the teacher), `"novelty"` ω ≡ −1 (push every token away).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown DASD direction {direction!r}; choose one of {DIRECTIONS}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"unknown DASD normalize {normalize!r}; choose one of {NORMALIZATIONS}")
    if quantile not in QUANTILE_ENDS:
        raise ValueError(f"unknown DASD quantile end {quantile!r}; choose one of {QUANTILE_ENDS}")
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must lie in [0, 1], got {rho}")
    entropy = router_entropy.detach()
    gap = gap.detach()
    if normalize == "mad":
        gap_bar = gap / (masked_mean_abs_dev(gap, mask) + eps)  # [B,T]
    elif normalize == "std":
        gap_bar = gap / (masked_std(gap, mask) + eps)
    else:
        gap_bar = gap
    diagnostics: dict[str, Tensor] = {}
    if direction == "dasd":
        q = 1.0 - rho if quantile == "top" else rho
        tau = masked_quantile(entropy, mask, q)  # [B,1]
        sigma = masked_mean_abs_dev(entropy, mask)  # [B,1]
        omega = torch.tanh((tau - entropy) / (sigma + eps))  # [B,T] >0 calm, <0 uncertain
        if gate:
            omega = omega * torch.sigmoid(gap_bar.abs() - 1.0)
        diagnostics["dasd/tau_mean"] = tau.mean()
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
    return omega, gap_bar, diagnostics


def dasd_advantages(
    group_adv: Tensor,
    student_logp: Tensor,
    teacher_logp: Tensor,
    student_entropy: Tensor,
    mask: Tensor,
    *,
    rho: float = 0.2,
    beta: float = 1.0,
    direction: str = "dasd",
    router: str = "student_entropy",
    normalize: str = "mad",
    gate: bool = True,
    quantile: str = "top",
    teacher_entropy: Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DASD [structure from a note on the paper; details reconstructed]: `Â_t = A_i + β·ω_t·δ̄_t`.

    Adding `β·δ̄_t` to a policy-gradient advantage is the sampled estimator of descending reverse
    KL(S‖T) (pull toward the teacher); `ω_t > 0` keeps that pull on low-entropy tokens and
    `ω_t < 0` turns it into ascent (push away) on high-entropy ones. See `dasd_direction` for ω.
    `router="teacher_entropy"` routes on the teacher's entropy (pass `teacher_entropy`).
    """
    check_same_shape(student_logp=student_logp, teacher_logp=teacher_logp, student_entropy=student_entropy,
                     mask=mask, teacher_entropy=teacher_entropy)
    _check_group_adv(group_adv, mask)
    if router not in ROUTERS:
        raise ValueError(f"unknown DASD router {router!r}; choose one of {ROUTERS}")
    if router == "teacher_entropy" and teacher_entropy is None:
        raise ValueError("router='teacher_entropy' needs teacher_entropy")
    routing = student_entropy if router == "student_entropy" else teacher_entropy
    omega, gap_bar, diagnostics = dasd_direction(
        routing, teacher_logp - student_logp, mask, rho=rho, direction=direction, normalize=normalize,
        gate=gate, quantile=quantile, eps=eps,
    )
    adv = (group_adv.detach()[:, None] + beta * omega * gap_bar) * mask  # [B,T]
    return adv, diagnostics
