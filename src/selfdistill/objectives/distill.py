"""Distillation toward the privileged self-teacher: full-vocabulary and sampled-token forms."""

from __future__ import annotations

import torch
from torch import Tensor

from selfdistill.objectives.policy import check_same_shape
from selfdistill.tokenstats import DEFAULT_CHUNK_TOKENS, DivergenceSpec, token_stats


def divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    beta: float,
    clip: float | None = None,
    top_k: int | None = None,
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> Tensor:
    """Generalized JSD between student and teacher per token, summed over the vocabulary, `[B,T]`.

    student_logits, teacher_logits: `[B,T,V]`; the teacher gets no gradient. `beta=0` is forward
    KL(T‖S), `beta=1` reverse KL(S‖T). `clip` clamps each vocabulary term from above; `top_k`
    renormalizes both distributions over the teacher's top-k tokens. Logits are divided by
    `temperature`. Zero where `mask` is 0. Computed in chunks of tokens (see `tokenstats`); from
    hidden states use `tokenstats.hidden_objective` with the same `DivergenceSpec`.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 3:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "must both be [B,T,V]"
        )
    if mask.shape != student_logits.shape[:2]:
        raise ValueError(f"mask {tuple(mask.shape)} must be [B,T]={tuple(student_logits.shape[:2])}")
    tokens = torch.zeros(mask.shape, dtype=torch.long, device=mask.device)  # token identity is unused here
    stats = token_stats(
        student_logits,
        tokens,
        temperature=temperature,
        teacher_logits=teacher_logits,
        divergence=DivergenceSpec(beta=beta, clip=clip, top_k=top_k),
        chunk_tokens=chunk_tokens,
    )
    return stats.divergence * mask  # [B,T]


def sampled_token_distill_loss(student_logp: Tensor, teacher_logp: Tensor, mask: Tensor) -> Tensor:
    """OPSD's sampled-token form `−sg(τ_t − s_t)·s_t`, `[B,T]`.

    Its expectation under the student's own samples is the gradient of reverse KL(S‖T): tokens the
    teacher likes more than the student are reinforced.
    """
    check_same_shape(student_logp=student_logp, teacher_logp=teacher_logp, mask=mask)
    gap = (teacher_logp - student_logp).detach()  # [B,T]
    return -gap * student_logp * mask
