"""`TokenStats`, `DivergenceSpec` and the math on one block of float32 logits, shared by every path."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

DEFAULT_CHUNK_TOKENS = 1024


@dataclass(frozen=True)
class DivergenceSpec:
    """A full-vocabulary divergence between student S and teacher T, summed over the vocabulary.

    beta: 0 gives forward KL(T‖S), 1 gives reverse KL(S‖T), values in between the generalized
        Jensen-Shannon divergence with mixture M = beta·p_T + (1-beta)·p_S.
    clip: if set, each vocabulary term is clamped from above at this value before the sum.
    top_k: if set, both distributions are restricted to the teacher's top-k tokens and renormalized.
    top_k_of: whose top-k tokens: "teacher" (default) or "student" (vOPD's baseline).
    renormalize_student: False keeps the student's full-vocabulary log-probs on the top-k entries
        (EOPD's forward KL `Σ_k p̃_T(k)(log p̃_T(k) − log p_S(k))`); only with top_k and beta = 0.
    """

    beta: float = 0.5
    clip: float | None = None
    top_k: int | None = None
    top_k_of: str = "teacher"
    renormalize_student: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"divergence beta must lie in [0, 1], got {self.beta}")
        if self.clip is not None and self.clip <= 0:
            raise ValueError(f"divergence clip must be positive, got {self.clip}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"divergence top_k must be >= 1, got {self.top_k}")
        if self.top_k_of not in ("teacher", "student"):
            raise ValueError(f"divergence top_k_of must be teacher or student, got {self.top_k_of!r}")
        if not self.renormalize_student and (self.top_k is None or self.beta != 0.0):
            raise ValueError("divergence renormalize_student=False needs top_k and beta = 0 (forward KL)")


def top_ids(spec: DivergenceSpec, student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """The ids `[..., k]` of the spec's top-k entries, from the teacher's or the student's log-probs."""
    ranked = teacher_logp if spec.top_k_of == "teacher" else student_logp
    return ranked.topk(min(spec.top_k, ranked.shape[-1]), dim=-1).indices


def restricted_student(spec: DivergenceSpec, student_logp: Tensor, top: Tensor) -> Tensor:
    """The student's log-probs `[..., k]` on the top-k entries: renormalized over them, or as they are."""
    picked = student_logp.gather(-1, top)
    return picked.log_softmax(-1) if spec.renormalize_student else picked


@dataclass
class TokenStats:
    """Statistics per response token; every tensor is `[B,T]` float32 (`[n]` inside a block)."""

    logp: Tensor
    entropy: Tensor
    teacher_logp: Tensor | None = None
    teacher_entropy: Tensor | None = None
    divergence: Tensor | None = None

    def detach(self) -> TokenStats:
        return TokenStats(*(None if x is None else x.detach() for x in self._fields()))

    def _fields(self) -> tuple[Tensor | None, ...]:
        return (self.logp, self.entropy, self.teacher_logp, self.teacher_entropy, self.divergence)

    def masked_sums(self, mask: Tensor) -> dict[str, Tensor]:
        """What the trainers log of the statistics, each summed over the tokens of `mask` `[B,T]` (detached): the
        student's entropy, and where present the teacher's entropy, its log-prob gap to the student and the
        divergence."""
        named = {"entropy": self.entropy, "teacher_entropy": self.teacher_entropy,
                 "teacher_logp_gap": None if self.teacher_logp is None else self.teacher_logp - self.logp,
                 "divergence": self.divergence}
        return {name: (value.detach() * mask).sum() for name, value in named.items() if value is not None}


STAT_FIELDS = tuple(f.name for f in fields(TokenStats))
"""The statistics' names, in `TokenStats` order."""
DIFFERENTIABLE_FIELDS = ("logp", "entropy", "divergence")
"""The statistics that carry the student's gradient; the teacher's are constants."""


def concat_stats(parts: list[TokenStats], shape: torch.Size | None = None) -> TokenStats:
    """The statistics of consecutive blocks `[n_i]` joined, field by field (viewed as `shape` when given)."""
    joined = {}
    for name in STAT_FIELDS:
        pieces = [getattr(part, name) for part in parts]
        whole = None if pieces[0] is None else torch.cat(pieces)
        joined[name] = whole if whole is None or shape is None else whole.view(shape)
    return TokenStats(**joined)


# ----------------------------------------------------------------------------------------------
# the math on one block of float32 logits


def divergence_terms(student_logp: Tensor, teacher_logp: Tensor, spec: DivergenceSpec) -> Tensor:
    """Per-vocabulary-entry divergence terms `[..., V]` (or `[..., k]` with top-k) from float32 log-probs."""
    if spec.top_k is not None:
        top = top_ids(spec, student_logp, teacher_logp)  # [..., k]
        student_logp = restricted_student(spec, student_logp, top)  # [..., k]
        teacher_logp = teacher_logp.gather(-1, top).log_softmax(-1)  # [..., k] renormalized
    s_logp, t_logp = student_logp, teacher_logp
    if spec.beta == 0.0:
        terms = t_logp.exp() * (t_logp - s_logp)  # KL(T‖S) terms
    elif spec.beta == 1.0:
        terms = s_logp.exp() * (s_logp - t_logp)  # KL(S‖T) terms
    else:
        mix_logp = torch.logaddexp(t_logp + math.log(spec.beta), s_logp + math.log(1.0 - spec.beta))
        terms = spec.beta * t_logp.exp() * (t_logp - mix_logp) + (1.0 - spec.beta) * s_logp.exp() * (
            s_logp - mix_logp
        )  # [..., V]
    if spec.clip is not None:
        terms = terms.clamp(max=spec.clip)
    return terms


def _scaled(logits: Tensor, temperature: float) -> Tensor:
    logits = logits.float()  # no copy when already float32
    return logits if temperature == 1.0 else logits / temperature


def block_stats(
    student_logits: Tensor,
    tokens: Tensor,
    teacher_logits: Tensor | None,
    temperature: float,
    divergence: DivergenceSpec | None,
) -> TokenStats:
    """The statistics, each `[n]`, from `[n,V]` logits, with autograd (the fused path's clipped gradient uses it)."""
    s = _scaled(student_logits, temperature)  # [n,V] float32
    s_logp_all = s.log_softmax(-1)  # [n,V]
    logp = s_logp_all.gather(-1, tokens[:, None]).squeeze(-1)  # [n]
    entropy = -(s_logp_all.exp() * s_logp_all).sum(-1)  # [n]
    t_logp = t_entropy = div = None
    if teacher_logits is not None:
        t = _scaled(teacher_logits, temperature)  # [n,V] float32
        t_logp_all = t.log_softmax(-1)  # [n,V]
        t_logp = t_logp_all.gather(-1, tokens[:, None]).squeeze(-1)  # [n]
        t_entropy = -(t_logp_all.exp() * t_logp_all).sum(-1)  # [n]
        if divergence is not None:
            div = divergence_terms(s_logp_all, t_logp_all, divergence).sum(-1)  # [n]
    return TokenStats(logp, entropy, teacher_logp=t_logp, teacher_entropy=t_entropy, divergence=div)


def logits_block(hidden: Tensor, weight: Tensor) -> Tensor:
    return hidden @ weight.T  # [n,d] @ [d,V] -> [n,V]


def check_inputs(tokens: Tensor, student: Tensor, teacher: Tensor | None, what: str) -> None:
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [B,T], got shape {tuple(tokens.shape)}")
    if student.dim() != 3 or student.shape[:2] != tokens.shape:
        raise ValueError(
            f"student {what} must be [B,T,*] with [B,T]={tuple(tokens.shape)}, got {tuple(student.shape)}"
        )
    if teacher is not None and teacher.shape != student.shape:
        raise ValueError(
            f"teacher {what} shape {tuple(teacher.shape)} differs from student {tuple(student.shape)}"
        )
    if tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"tokens must be an integer tensor, got {tokens.dtype}")
