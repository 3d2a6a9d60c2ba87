"""Group advantages, the clipped policy surrogate, and the one place where losses are normalized.

Shapes: `B` rollouts (= prompts P × group size G, prompt-major), `T` padded response length.
"""

from __future__ import annotations

from torch import Tensor

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


class KnobError(ValueError):
    """A method's knob is out of range or of an unknown value; `knob` names it (the config names
    `objective.knobs.<knob>` from it)."""

    def __init__(self, knob: str, message: str) -> None:
        super().__init__(f"{knob} {message}")
        self.knob = knob


def check_knob(condition: bool, knob: str, message: str) -> None:
    """Raise `KnobError(knob, message)` unless `condition`, e.g.
    `check_knob(0 <= x < 1, "eps_w", f"must lie in [0, 1), got {x}")`."""
    if not condition:
        raise KnobError(knob, message)


def check_clip_range(**eps: float) -> None:
    """Every PPO-style clip half-width (eps_low, eps_high, eps_w) must lie in [0, 1)."""
    for knob, value in eps.items():
        check_knob(0.0 <= value < 1.0, knob, f"must lie in [0, 1), got {value}")


def check_same_shape(**tensors: Tensor | None) -> None:
    """Raise ValueError naming every shape unless all given tensors share one shape."""
    given = {name: t for name, t in tensors.items() if t is not None}
    shapes = {name: tuple(t.shape) for name, t in given.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError("shape mismatch: " + ", ".join(f"{n}={s}" for n, s in shapes.items()))
    for name, t in given.items():
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")


def group_advantages(rewards: Tensor, group_size: int, *, std_normalize: bool = True, eps: float = 1e-6) -> Tensor:
    """`A_i = (r_i − mean_g r) / (std_g r + eps)` within each group of `group_size` rollouts.

    rewards: `[P·G]`, prompt-major. Returns `[P·G]`. `std_normalize=False` is Dr.GRPO's
    `r_i − mean_g r`. The std is the unbiased one; a group of one rollout gets advantage 0.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [P*G], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)  # [P,G]
    centered = grouped - grouped.mean(dim=1, keepdim=True)  # [P,G]
    if std_normalize and group_size > 1:
        centered = centered / (grouped.std(dim=1, keepdim=True) + eps)
    return centered.view(-1)  # [P·G]


def _token_advantages(advantages: Tensor, like: Tensor) -> Tensor:
    if advantages.dim() == 1 and advantages.shape[0] == like.shape[0]:
        return advantages[:, None].expand_as(like)  # [B] -> [B,T]
    if advantages.shape == like.shape:
        return advantages
    raise ValueError(f"advantages must be [B] or [B,T] with [B,T]={tuple(like.shape)}, got {tuple(advantages.shape)}")


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
) -> Tensor:
    """PPO clipped surrogate per token, `[B,T]`, zero where `mask` is 0.

    `ℓ = −min(ρ·A, clip(ρ, 1−eps_low, 1+eps_high)·A)` with `ρ = exp(logp − old_logp)`.
    The advantages `[B]` or `[B,T]` and `old_logp` are treated as constants (detached).
    """
    check_same_shape(logp=logp, old_logp=old_logp, mask=mask)
    check_clip_range(eps_low=eps_low, eps_high=eps_high)
    adv = _token_advantages(advantages, logp).detach()  # [B,T]
    ratio = (logp - old_logp.detach()).clamp(-20.0, 20.0).exp()  # [B,T]
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    return unclipped.maximum(clipped) * mask  # [B,T]


def clip_fraction(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *,
                  eps_low: float = 0.2, eps_high: float = 0.2) -> Tensor:
    """Fraction of valid tokens whose surrogate is clipped (the gradient is cut there)."""
    adv = _token_advantages(advantages, logp)
    ratio = (logp - old_logp).detach().exp()
    clipped = ((ratio > 1.0 + eps_high) & (adv > 0)) | ((ratio < 1.0 - eps_low) & (adv < 0))
    return (clipped.float() * mask).sum() / mask.sum().clamp(min=1.0)


def token_weights(
    mask: Tensor,
    *,
    mode: str,
    global_tokens: float | None = None,
    global_sequences: float | None = None,
    norm_length: float | None = None,
) -> Tensor:
    """Weights `[B,T]` such that the aggregated loss is `(loss · weights).sum()`.

    token-mean: `1 / N_tokens`, every valid token of the global batch counts once.
    seq-mean-token-mean: `1 / (|y_i| · N_sequences)`, each rollout's mean, then the mean over rollouts.
    seq-mean-token-sum-norm: `1 / (L · N_sequences)` with a constant `L` (Dr.GRPO); default `L = T`.
    `global_tokens` / `global_sequences` are the counts over the *whole* optimizer batch (all
    micro-batches and processes); left `None` they are this batch's own counts. Rows with no valid
    token contribute 0 and still count as sequences.

    This is how the trainer reduces every objective's loss: `token_weights` of each micro-batch with the
    global counts (and `L = rollout.max_new_tokens`), `(loss · weights).sum()` per row block, summed over
    blocks, micro-batches and processes. `aggregate` is the same reduction in one call.
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B,T], got shape {tuple(mask.shape)}")
    mask = mask.float()
    n_seq = float(mask.shape[0]) if global_sequences is None else float(global_sequences)
    if mode == "token-mean":
        n_tok = mask.sum() if global_tokens is None else mask.new_tensor(float(global_tokens))
        return mask / n_tok.clamp(min=1.0)
    if mode == "seq-mean-token-mean":
        lengths = mask.sum(dim=1, keepdim=True).clamp(min=1.0)  # [B,1]
        return mask / lengths / max(n_seq, 1.0)
    if mode == "seq-mean-token-sum-norm":
        length = float(mask.shape[1]) if norm_length is None else float(norm_length)
        return mask / (max(length, 1.0) * max(n_seq, 1.0))
    raise ValueError(f"unknown aggregation mode {mode!r}; choose one of {AGGREGATIONS}")


def aggregate(
    loss: Tensor,
    mask: Tensor,
    *,
    mode: str,
    global_tokens: float | None = None,
    global_sequences: float | None = None,
    norm_length: float | None = None,
) -> Tensor:
    """Reduce a per-token loss `[B,T]` to a scalar: `(loss · token_weights(mask, ...)).sum()`, the same
    weights the trainer applies micro-batch by micro-batch; see `token_weights` for the modes.

    Given the global counts, the sum of this over micro-batches equals its value on the whole batch.
    """
    check_same_shape(loss=loss, mask=mask)
    weights = token_weights(
        mask, mode=mode, global_tokens=global_tokens, global_sequences=global_sequences, norm_length=norm_length
    )
    return (loss * weights).sum()
