"""Per-token statistics over the vocabulary, computed without holding `[B·T, V]` float32 logits.

For every response position we need, for the student (with gradient) and the teacher (without):
the log-probability of the sampled token, the entropy of the full next-token distribution, and
for distillation objectives a divergence between the two distributions summed over the
vocabulary. Three paths compute the same numbers (tested equal, values and gradients):

* `naive_token_stats`: the textbook version on full logits. Reference only.
* `token_stats`: from logits `[B,T,V]`, in chunks of tokens, each chunk upcast to float32 on its
  own and recomputed in the backward pass (no matmul is repeated, only the softmax).
* from final hidden states `[B,T,d]` and the output-layer weight `[V,d]`, never forming the whole
  logits tensor:
  - `hidden_token_stats`: chunked, the chunk's logits recomputed in the backward pass. Works with
    any downstream loss, at the price of one extra matmul.
  - `hidden_objective`: the fused path. The caller passes the loss of a block of rows as a function
    of that block's statistics; the gradient with respect to each block's logits is taken while
    the block is in memory, during the forward pass, so the backward pass only rescales stored
    gradients. The student's logits of a block of rows are held whole when they fit in
    `chunk_tokens` positions, else formed a few positions at a time in both passes (one extra
    student matmul); the teacher's are always formed a few positions at a time (one extra teacher
    matmul). This is what the trainer uses.

Logits are divided by `temperature` before any softmax (the sampling temperature).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_TOKENS = 1024
# `hidden_objective`'s default block: as many positions as fit in this many bytes of float32 logits
# (55 positions at V = 151,936; 170 at SmolLM2's 49,152), so the block's memory does not grow with the vocabulary.
AUTO_BLOCK_BYTES = 32 << 20


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


def _top_ids(spec: DivergenceSpec, student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """The ids `[..., k]` of the spec's top-k entries, from the teacher's or the student's log-probs."""
    ranked = teacher_logp if spec.top_k_of == "teacher" else student_logp
    return ranked.topk(min(spec.top_k, ranked.shape[-1]), dim=-1).indices


def _restricted_student(spec: DivergenceSpec, student_logp: Tensor, top: Tensor) -> Tensor:
    """The student's log-probs `[..., k]` on the top-k entries: renormalized over them, or as they are."""
    picked = student_logp.gather(-1, top)
    return picked.log_softmax(-1) if spec.renormalize_student else picked


@dataclass
class TokenStats:
    """Statistics per response token; every tensor is `[B,T]` float32."""

    logp: Tensor
    entropy: Tensor
    teacher_logp: Tensor | None = None
    teacher_entropy: Tensor | None = None
    divergence: Tensor | None = None

    def detach(self) -> TokenStats:
        return TokenStats(*(None if x is None else x.detach() for x in self._fields()))

    def _fields(self) -> tuple[Tensor | None, ...]:
        return (self.logp, self.entropy, self.teacher_logp, self.teacher_entropy, self.divergence)


# ----------------------------------------------------------------------------------------------
# the math on one block of float32 logits


def divergence_terms(student_logp: Tensor, teacher_logp: Tensor, spec: DivergenceSpec) -> Tensor:
    """Per-vocabulary-entry divergence terms `[..., V]` (or `[..., k]` with top-k) from float32 log-probs."""
    if spec.top_k is not None:
        top = _top_ids(spec, student_logp, teacher_logp)  # [..., k]
        student_logp = _restricted_student(spec, student_logp, top)  # [..., k]
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


def _block_stats(
    student_logits: Tensor,
    tokens: Tensor,
    teacher_logits: Tensor | None,
    temperature: float,
    divergence: DivergenceSpec | None,
) -> tuple[Tensor | None, ...]:
    """(logp, entropy, teacher_logp, teacher_entropy, divergence), each `[n]`, from `[n,V]` logits."""
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
    return logp, entropy, t_logp, t_entropy, div


def _analytic_backward_applies(divergence: DivergenceSpec | None) -> bool:
    """`_subchunk_grad` covers every divergence except clipped ones (autograd does those)."""
    return divergence is None or divergence.clip is None


class FusedBuffers:
    """The fused path's large buffers: one block of student logits `[n,V]` (a sub-chunk's, when the
    logits are streamed) and a workspace of five `[positions,V]` float32 buffers that every sub-chunk
    reuses. Pass the same instance to successive `hidden_objective` calls (the trainer keeps one per
    run) and they are allocated once, at the largest size asked for; without one, each call allocates
    its own.

    Allocating the softmax-sized temporaries afresh for each sub-chunk cost more than the arithmetic on
    this CPU: above glibc's largest mmap threshold (32 MiB) every one is mapped, page-faulted in and
    unmapped again; below it, freed ones fragment the heap and the resident memory grows
    (docs/performance.md). The sub-chunk functions write into the workspace with ``out=`` and in-place ops.
    """

    def __init__(self) -> None:
        self.workspace = torch.empty(0)  # [5,c,V] float32
        self.block = torch.empty(0)  # [n,V]

    def prepare(self, block_positions: int, positions: int, vocab: int, dtype: torch.dtype,
                device: torch.device) -> None:
        """Make room for blocks of `block_positions` logits of `dtype` and sub-chunks of `positions`."""
        if self.block.dtype != dtype or self.block.device != device or self.block.shape[1:] != (vocab,) \
                or self.block.shape[0] < block_positions:
            self.block = torch.empty(0)  # let the old one go before the new one is made
            self.block = torch.empty((block_positions, vocab), dtype=dtype, device=device)
        if self.workspace.device != device or self.workspace.shape[2:] != (vocab,) \
                or self.workspace.shape[1] < positions:
            self.workspace = torch.empty(0)
            self.workspace = torch.empty((5, positions, vocab), dtype=torch.float32, device=device)

    def release(self) -> None:
        """Give the memory back (the next call allocates again)."""
        self.workspace, self.block = torch.empty(0), torch.empty(0)

    def views(self, positions: int) -> tuple[Tensor, ...]:
        """The five workspace buffers cut to `positions` rows, 5 x `[positions,V]`."""
        return tuple(buffer[:positions] for buffer in self.workspace)


def _scaled_log_softmax(logits: Tensor, temperature: float, out: Tensor, scratch: Tensor) -> Tensor:
    """``log_softmax(logits / temperature)`` written into `out` [c,V] float32 (`scratch` may be overwritten)."""
    if logits.dtype != torch.float32 or temperature != 1.0:
        torch.div(logits, temperature, out=scratch)
        logits = scratch
    return torch.log_softmax(logits, -1, out=out)


def _entropy_of(logp: Tensor, scratch: Tensor) -> Tensor:
    """``-Σ exp(l)·l`` per row `[c]` from log-probs `[c,V]`."""
    torch.exp(logp, out=scratch)
    return -scratch.mul_(logp).sum(-1)


def _teacher_logits_into(teacher_hidden: Tensor, teacher_weight: Tensor, out: Tensor) -> Tensor:
    """The teacher's logits of a sub-chunk `[c,d] @ [d,V]`, in `out` when the dtypes allow it."""
    if teacher_hidden.dtype == torch.float32 and teacher_weight.dtype == torch.float32:
        return torch.mm(teacher_hidden, teacher_weight.T, out=out)
    return out.copy_(_logits_block(teacher_hidden, teacher_weight))


def _subchunk_stats(
    logits: Tensor, tokens: Tensor, teacher_hidden: Tensor | None, teacher_weight: Tensor | None,
    temperature: float, divergence: DivergenceSpec | None, workspace: FusedBuffers,
    teacher_top: list[tuple[Tensor, Tensor]] | None = None,
) -> tuple[Tensor | None, ...]:
    """`_block_stats` without gradient, for a sub-chunk's student logits `[c,V]` (left untouched) and the
    teacher's hidden states `[c,d]` (its logits are formed here), in the workspace's buffers. With a top-k
    divergence, (the teacher's top-k ids `[c,k]`, its log-probs renormalized over them `[c,k]`) are appended to
    `teacher_top` when given: all the gradient pass needs of the teacher then."""
    s_logp, scratch, t_logp_all, extra, t_logits = workspace.views(logits.shape[0])  # 5 x [c,V]
    _scaled_log_softmax(logits, temperature, s_logp, scratch)
    logp = s_logp.gather(-1, tokens[:, None]).squeeze(-1)  # [c]
    entropy = _entropy_of(s_logp, scratch)  # [c]
    if teacher_hidden is None:
        return logp, entropy, None, None, None
    _teacher_logits_into(teacher_hidden, teacher_weight, t_logits)
    _scaled_log_softmax(t_logits, temperature, t_logp_all, scratch)
    t_logp = t_logp_all.gather(-1, tokens[:, None]).squeeze(-1)  # [c]
    t_entropy = _entropy_of(t_logp_all, scratch)  # [c]
    if divergence is None:
        return logp, entropy, t_logp, t_entropy, None
    if divergence.top_k is not None:  # [c,k]: small, the plain function does it on the restricted log-probs
        top = _top_ids(divergence, s_logp, t_logp_all)  # [c,k]
        top_t_logp = t_logp_all.gather(-1, top).log_softmax(-1)  # [c,k]
        if teacher_top is not None:
            teacher_top.append((top, top_t_logp))
        terms = divergence_terms(_restricted_student(divergence, s_logp, top), top_t_logp,
                                 replace(divergence, top_k=None, renormalize_student=True))
        return logp, entropy, t_logp, t_entropy, terms.sum(-1)
    terms = scratch
    if divergence.beta == 0.0:  # p_T (l_T - l)
        torch.sub(t_logp_all, s_logp, out=terms).mul_(torch.exp(t_logp_all, out=extra))
    elif divergence.beta == 1.0:  # p (l - l_T)
        torch.sub(s_logp, t_logp_all, out=terms).mul_(torch.exp(s_logp, out=extra))
    else:  # β p_T (l_T - l_M) + (1-β) p (l - l_M), l_M = log(β p_T + (1-β) p)
        beta = divergence.beta
        mix = torch.logaddexp(torch.add(t_logp_all, math.log(beta), out=t_logits),
                              torch.add(s_logp, math.log(1.0 - beta), out=extra), out=t_logits)  # [c,V]
        torch.sub(t_logp_all, mix, out=terms).mul_(torch.exp(t_logp_all, out=extra)).mul_(beta)
        student_part = torch.sub(s_logp, mix, out=t_logp_all)  # the teacher's log-probs are no longer needed
        terms.add_(student_part.mul_(torch.exp(s_logp, out=extra)), alpha=1.0 - beta)
    if divergence.clip is not None:
        terms.clamp_(max=divergence.clip)
    return logp, entropy, t_logp, t_entropy, terms.sum(-1)


def _subchunk_grad(
    logits: Tensor, tokens: Tensor, teacher_hidden: Tensor | None, teacher_weight: Tensor | None,
    temperature: float, divergence: DivergenceSpec | None, workspace: FusedBuffers,
    grad_logp: Tensor | None, grad_entropy: Tensor | None, grad_divergence: Tensor | None,
    teacher_top: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """The gradient `[c,V]` float32 with respect to the student logits of
    `Σ g_logp·logp + g_entropy·entropy + g_divergence·divergence` (the statistics of `_block_stats`),
    in closed form, in a workspace buffer (valid until the workspace is used again). Not for clipped
    divergences (autograd does those).

    With p = softmax(z/τ), l = log p and, per row, a vector a such that the statistic's gradient with
    respect to p is a (up to a constant, which the softmax removes): ∂/∂z = p ⊙ (a − Σ p a) / τ.
    Entropy: a = −l. Reverse KL(S‖T): a = l − l_T. Forward KL(T‖S): p ⊙ a = −p_T. Generalized JSD
    with mixture M: a = (1−β)(l − l_M). The sampled token's log-prob adds (onehot − p) / τ.
    A top-k divergence depends only on the logits of the top-k tokens, through the
    distributions renormalized over them: the same rule with p, l, l_T restricted and renormalized
    to those k entries, scattered back into the vocabulary (the student's top-k set is constant where the
    gradient exists, so it is the same rule). With the student not renormalized (forward KL only),
    p ⊙ a = −p̃_T on the k entries, over the whole vocabulary's softmax; `teacher_top` (from `_subchunk_stats`) gives the
    teacher's top-k ids and renormalized log-probs, so the teacher's logits need not be formed again.
    """
    s_logp, probs, weighted, scratch, other = workspace.views(logits.shape[0])  # 5 x [c,V]
    _scaled_log_softmax(logits, temperature, s_logp, scratch)
    torch.exp(s_logp, out=probs)
    weighted.zero_()  # p ⊙ a, summed over the statistics
    if grad_entropy is not None:
        weighted.sub_(torch.mul(probs, s_logp, out=scratch).mul_(grad_entropy[:, None]))
    top = top_grad = None
    if grad_divergence is not None and divergence is not None and (teacher_hidden is not None or teacher_top):
        if teacher_top is None:
            t_logp_all = _scaled_log_softmax(_teacher_logits_into(teacher_hidden, teacher_weight, scratch),
                                             temperature, other, scratch)  # [c,V]
        if divergence.top_k is not None:  # only the top-k logits carry this gradient, renormalized over them
            if teacher_top is not None:
                top, top_t_logp = teacher_top  # [c,k], [c,k]
            else:
                top = _top_ids(divergence, s_logp, t_logp_all)  # [c,k]
                top_t_logp = t_logp_all.gather(-1, top).log_softmax(-1)  # [c,k]
            if not divergence.renormalize_student:  # −Σ_k p̃_T(k) log p_S(k): p ⊙ a = −p̃_T on the k entries
                weighted.scatter_add_(1, top, -top_t_logp.exp() * grad_divergence[:, None])
                top = None
            else:
                top_logp = s_logp.gather(-1, top).log_softmax(-1)  # [c,k]
                top_probs = top_logp.exp()  # [c,k]
                top_weighted = _divergence_weighted(top_probs, top_logp, top_t_logp, divergence)  # [c,k]
                top_weighted.mul_(grad_divergence[:, None])
                top_grad = top_weighted - top_probs * top_weighted.sum(-1, keepdim=True)  # [c,k]
        else:
            term = _divergence_weighted(probs, s_logp, t_logp_all, divergence, out=scratch)  # [c,V]
            weighted.add_(term.mul_(grad_divergence[:, None]))
    grad = weighted.sub_(torch.mul(probs, weighted.sum(-1, keepdim=True), out=scratch))  # [c,V]
    if top is not None:
        grad.scatter_add_(1, top, top_grad)
    if grad_logp is not None:
        grad.sub_(torch.mul(probs, grad_logp[:, None], out=scratch))
        grad.scatter_add_(1, tokens[:, None], grad_logp[:, None])
    return grad if temperature == 1.0 else grad.div_(temperature)


def _divergence_weighted(
    probs: Tensor, logp: Tensor, t_logp: Tensor, divergence: DivergenceSpec, out: Tensor | None = None,
) -> Tensor:
    """p ⊙ a for an unclipped divergence (see `_subchunk_grad`) from the student's probabilities and
    log-probs and the teacher's log-probs over the same entries `[c,V]` (or `[c,k]`); into `out` if given
    (then `t_logp` is overwritten for the JSD)."""
    if divergence.beta == 1.0:  # reverse KL(S‖T)
        return torch.sub(logp, t_logp, out=out).mul_(probs)
    if divergence.beta == 0.0:  # forward KL(T‖S)
        return torch.exp(t_logp, out=out).neg_()
    beta = divergence.beta  # generalized JSD: (1-β) p (l - l_M)
    if out is None:
        mix = torch.logaddexp(t_logp + math.log(beta), logp + math.log(1.0 - beta))
    else:
        mix = torch.logaddexp(t_logp.add_(math.log(beta)), torch.add(logp, math.log(1.0 - beta), out=out),
                              out=t_logp)
    return torch.sub(logp, mix, out=out).mul_(probs).mul_(1.0 - beta)


def _check_inputs(tokens: Tensor, student: Tensor, teacher: Tensor | None, what: str) -> None:
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


def _assemble(parts: list[tuple[Tensor | None, ...]], shape: torch.Size) -> TokenStats:
    columns = []
    for i in range(5):
        pieces = [p[i] for p in parts]
        columns.append(None if pieces[0] is None else torch.cat(pieces).view(shape))
    return TokenStats(*columns)


# ----------------------------------------------------------------------------------------------
# reference and logits paths


def naive_token_stats(
    logits: Tensor,
    tokens: Tensor,
    *,
    temperature: float = 1.0,
    teacher_logits: Tensor | None = None,
    divergence: DivergenceSpec | None = None,
) -> TokenStats:
    """Reference implementation: the whole `[B,T,V]` computation at once, in float32."""
    _check_inputs(tokens, logits, teacher_logits, "logits")
    B, T, V = logits.shape
    t_flat = None if teacher_logits is None else teacher_logits.reshape(B * T, V)
    parts = _block_stats(logits.reshape(B * T, V), tokens.reshape(-1), t_flat, temperature, divergence)
    return _assemble([parts], tokens.shape)


def token_stats(
    logits: Tensor,
    tokens: Tensor,
    *,
    temperature: float = 1.0,
    teacher_logits: Tensor | None = None,
    divergence: DivergenceSpec | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> TokenStats:
    """Statistics from logits `[B,T,V]` (any float dtype), `chunk_tokens` positions at a time.

    Only one chunk is upcast to float32 at a time; when gradients are needed, each chunk's
    softmax is recomputed in the backward pass instead of being kept.
    """
    _check_inputs(tokens, logits, teacher_logits, "logits")
    B, T, V = logits.shape
    flat = logits.reshape(B * T, V)
    flat_teacher = None if teacher_logits is None else teacher_logits.reshape(B * T, V).detach()
    flat_tokens = tokens.reshape(-1)
    recompute = torch.is_grad_enabled() and logits.requires_grad
    parts = []
    for start in range(0, B * T, chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        t_block = None if flat_teacher is None else flat_teacher[rows]
        args = (flat[rows], flat_tokens[rows], t_block, temperature, divergence)
        if recompute:
            parts.append(checkpoint(_block_stats, *args, use_reentrant=False))
        else:
            parts.append(_block_stats(*args))
    return _assemble(parts, tokens.shape)


# ----------------------------------------------------------------------------------------------
# hidden-state paths


def _logits_block(hidden: Tensor, weight: Tensor) -> Tensor:
    return hidden @ weight.T  # [n,d] @ [d,V] -> [n,V]


def _hidden_block_stats(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    teacher_logits: Tensor | None,
    temperature: float,
    divergence: DivergenceSpec | None,
) -> tuple[Tensor | None, ...]:
    return _block_stats(_logits_block(hidden, weight), tokens, teacher_logits, temperature, divergence)


def hidden_token_stats(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    *,
    temperature: float = 1.0,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    divergence: DivergenceSpec | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> TokenStats:
    """Statistics from final hidden states `[B,T,d]` and the output weight `[V,d]`.

    Chunked over tokens with recomputation: each chunk's logits are formed again in the backward
    pass. Use it when the loss is not known up front; `hidden_objective` is faster when it is.
    """
    _check_inputs(tokens, hidden, teacher_hidden, "hidden states")
    B, T, d = hidden.shape
    flat = hidden.reshape(B * T, d)
    flat_tokens = tokens.reshape(-1)
    recompute = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    parts = []
    for start in range(0, B * T, chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        t_logits = None
        if teacher_hidden is not None:
            t_w = weight if teacher_weight is None else teacher_weight
            with torch.no_grad():
                t_logits = _logits_block(teacher_hidden.reshape(B * T, d)[rows], t_w)  # [n,V]
        args = (flat[rows], weight, flat_tokens[rows], t_logits, temperature, divergence)
        parts.append(
            checkpoint(_hidden_block_stats, *args, use_reentrant=False)
            if recompute
            else _hidden_block_stats(*args)
        )
    return _assemble(parts, tokens.shape)


BlockLoss = Callable[[TokenStats, slice], Tensor]
"""Maps the statistics of rows `rows` (a slice of the batch) to their contribution to the scalar loss.

The contribution of the whole batch must be the sum of the contributions of its row blocks, which
holds for every objective here: they are per-rollout, and `aggregate` normalizes with global counts.
"""


# Softmax-sized work inside a block is done at most this many positions at a time, in a workspace of five
# [positions, V] float32 buffers (`FusedBuffers`), so a block's peak memory is its student logits plus that
# workspace. Each sub-chunk also makes about five passes over the [V, d] weight (the teacher's logits twice,
# the two gradient matmuls), so taller sub-chunks pay off when d is large: 128 rather than 64 at d = 896
# (bench/tokenstats.py: 1.02x instead of 1.23x the naive time). With a small d those passes are cheap and
# the workspace is sized down to d / 4 positions (at least 16): at d = 64 and V = 151,936 that is 16 positions,
# 46 MiB instead of 371 MiB at 128, at the same speed (bench/step_vs_trl.py, docs/performance.md). With a small
# vocabulary the workspace is small whatever the positions, and each sub-chunk's fixed cost (some thirty tensor
# operations) dominates: there sub-chunks take as many positions as fit in AUTO_BLOCK_BYTES of workspace.
SUBCHUNK_TOKENS = 128


def _subchunk_positions(hidden_size: int, vocab_size: int) -> int:
    by_hidden = min(SUBCHUNK_TOKENS, max(16, hidden_size // 4))
    return max(by_hidden, AUTO_BLOCK_BYTES // (5 * 4 * vocab_size))


def auto_chunk_tokens(vocab_size: int) -> int:
    """The default block of `hidden_objective`: the positions whose float32 logits fit in AUTO_BLOCK_BYTES."""
    return max(1, AUTO_BLOCK_BYTES // (4 * vocab_size))


_DIFFERENTIABLE = (0, 1, 4)  # logp, entropy, divergence: the statistics that carry the student's gradient


class _FusedHiddenObjective(torch.autograd.Function):
    """Forward computes the loss and, block by block, its gradient; backward rescales it.

    Per block of rows: (1) the student's logits, one matmul; (2) the statistics, a few positions at a
    time, without gradient, the teacher's logits of those positions formed on the spot; (3) the
    block's loss from them and its gradient with respect to the statistics (cheap: `[rows, T]`
    tensors); (4) again a few positions at a time (the teacher's logits formed once more), the
    softmax-level backward from those statistic gradients to the logits, in closed form
    (`_subchunk_grad`; autograd for clipped divergences), and the two matmuls that
    turn it into gradients for the hidden states and the weight.

    Streamed (`rows_per_block == 0`: one row has more positions than a block may hold): the block is the
    whole batch, and the student's logits are formed a sub-chunk at a time in (2) and again in (4) instead of
    once in (1), so memory no longer grows with the response length.
    """

    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, tokens, block_loss, options):
        temperature, divergence, rows_per_block, buffers, weight_grad_out = options
        B, T, d = hidden.shape
        streamed = rows_per_block == 0
        rows_per_block = B if streamed else rows_per_block
        need_hidden_grad = ctx.needs_input_grad[0]
        need_weight_grad = ctx.needs_input_grad[1] or weight_grad_out is not None
        ctx.weight_grad_outside = weight_grad_out is not None
        # Gradients are formed by hand below (some of it under enable_grad, for block_loss): record no graph.
        hidden, weight = hidden.detach(), weight.detach()
        ctx.weight_dtype = weight.dtype
        grad_hidden = torch.zeros_like(hidden) if need_hidden_grad else None  # [B,T,d]
        grad_weight = None  # [V,d] float32: the caller's tensor when it is float32, else our own
        if weight_grad_out is not None and weight_grad_out.dtype == torch.float32:
            grad_weight = weight_grad_out
        elif need_weight_grad:
            grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        total = hidden.new_zeros((), dtype=torch.float32)
        analytic = _analytic_backward_applies(divergence)
        parts = []
        block_positions = min(B, rows_per_block) * T
        positions = min(_subchunk_positions(d, weight.shape[0]), block_positions)
        workspace = buffers if buffers is not None else FusedBuffers()
        workspace.prepare(positions if streamed else block_positions, positions, weight.shape[0],
                          torch.result_type(hidden, weight), hidden.device)
        for start in range(0, B, rows_per_block):
            rows = slice(start, min(start + rows_per_block, B))
            n_rows = rows.stop - rows.start
            n = n_rows * T
            h_block = hidden[rows].reshape(n, d)  # [n,d]
            block_tokens = tokens[rows].reshape(-1)  # [n]
            held = None if streamed else torch.mm(h_block, weight.T, out=workspace.block[:n])  # [n,V]

            def student_logits(sub: slice, h_block=h_block, held=held) -> Tensor:
                """The student's logits of a sub-chunk `[c,V]`: a view of the held block, or formed now."""
                if held is not None:
                    return held[sub]
                return torch.mm(h_block[sub], weight.T, out=workspace.block[: sub.stop - sub.start])

            t_block = None if teacher_hidden is None else teacher_hidden[rows].reshape(n, d)  # [n,d]
            subs = [slice(i, min(i + positions, n)) for i in range(0, n, positions)]
            # a top-k divergence's teacher side, per sub-chunk, for the closed-form gradient pass
            teacher_top = [] if analytic and divergence is not None and divergence.top_k is not None else None
            block = [torch.cat(column) if column[0] is not None else None for column in zip(*(
                _subchunk_stats(student_logits(sub), block_tokens[sub], None if t_block is None else t_block[sub],
                                teacher_weight, temperature, divergence, workspace, teacher_top)
                for sub in subs), strict=True)]
            with torch.enable_grad():
                fields = [None if x is None else x.view(n_rows, T).requires_grad_(i in _DIFFERENTIABLE)
                          for i, x in enumerate(block)]
                loss = block_loss(TokenStats(*fields), rows)
                leaves = [fields[i] for i in _DIFFERENTIABLE if fields[i] is not None]
                if (need_hidden_grad or need_weight_grad) and loss.requires_grad:
                    stat_grads = torch.autograd.grad(loss, leaves, allow_unused=True)  # each [rows,T] or None
                    wanted = [(i, g.reshape(-1)) for i, g in zip(
                        [i for i in _DIFFERENTIABLE if fields[i] is not None], stat_grads, strict=True)
                        if g is not None]
                    for j, sub in enumerate(subs):
                        by_field = {i: g[sub] for i, g in wanted}
                        # the teacher enters the gradient only through the divergence
                        t_sub = t_block[sub] if t_block is not None and 4 in by_field else None  # [c,d]
                        if analytic:
                            top = teacher_top[j] if teacher_top is not None and 4 in by_field else None
                            grad_z = _subchunk_grad(
                                student_logits(sub), block_tokens[sub], None if top else t_sub, teacher_weight,
                                temperature, divergence, workspace, by_field.get(0), by_field.get(1), by_field.get(4),
                                teacher_top=top,
                            )  # [c,V] float32, a workspace buffer
                        else:  # clipped divergence: autograd through `_block_stats`
                            z = student_logits(sub).detach().requires_grad_(True)  # [c,V]
                            t_logits = None if t_block is None else _logits_block(t_block[sub], teacher_weight)
                            out = _block_stats(z, block_tokens[sub], t_logits, temperature, divergence)
                            torch.autograd.backward([out[i] for i in by_field], list(by_field.values()))
                            grad_z = z.grad.float()  # [c,V]
                        if need_hidden_grad:
                            rows_out = grad_hidden.view(B * T, d)[start * T + sub.start : start * T + sub.stop]
                            if grad_z.dtype == weight.dtype == rows_out.dtype:
                                torch.mm(grad_z, weight, out=rows_out)  # [c,V] @ [V,d]
                            else:
                                rows_out.copy_(grad_z.to(weight.dtype) @ weight)
                        if need_weight_grad:  # in place: no [V,d] temporary per sub-chunk
                            grad_weight.addmm_(grad_z.T, h_block[sub].float())  # [V,c] @ [c,d]
            total += loss.detach().float()
            parts.append(tuple(None if x is None else x.detach() for x in block))
        if ctx.weight_grad_outside:
            if grad_weight is not weight_grad_out:
                weight_grad_out.add_(grad_weight.to(weight_grad_out.dtype))
            grad_weight = None
        ctx.save_for_backward(grad_hidden, grad_weight)
        stats = _assemble(parts, tokens.shape)
        outputs = [x if x is not None else hidden.new_empty(0) for x in stats._fields()]
        ctx.mark_non_differentiable(*outputs)
        return (total, *outputs)

    @staticmethod
    def backward(ctx, grad_total, *unused):
        if ctx.weight_grad_outside and float(grad_total) != 1.0:
            raise RuntimeError("hidden_objective(weight_grad_out=...) added the weight's gradient of the loss itself; "
                               f"backpropagate the loss unscaled (got an upstream gradient of {float(grad_total)})")
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_total.to(grad_hidden.dtype))  # in place: used once
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def hidden_objective(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    block_loss: BlockLoss,
    *,
    temperature: float = 1.0,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    divergence: DivergenceSpec | None = None,
    chunk_tokens: int | None = None,
    buffers: FusedBuffers | None = None,
    weight_grad_out: Tensor | None = None,
) -> tuple[Tensor, TokenStats]:
    """Fused output layer + statistics + loss, over blocks of whole rows.

    hidden: `[B,T,d]` student final hidden states at the positions that predict `tokens` `[B,T]`.
    weight: `[V,d]` output-layer weight (no bias, no logit soft-capping).
    block_loss: the loss of a block of rows from its `TokenStats` (see `BlockLoss`).
    Returns the scalar loss (differentiable in `hidden` and `weight`) and the detached statistics
    of the whole batch. Rows are grouped so that a block holds at most `chunk_tokens` positions,
    whose student logits `[rows·T, V]` are held for the block; when a single row has more positions than
    that, the logits are streamed: formed a sub-chunk at a time, twice, and the block is the whole batch.
    chunk_tokens: None picks `auto_chunk_tokens(V)` (32 MiB of float32 logits).
    buffers: reused between calls when given (see `FusedBuffers`).
    weight_grad_out: a `[V,d]` tensor (e.g. `weight.grad`) into which the loss's gradient with respect to
    `weight` is added during this call; `weight` then gets none through autograd. This saves a second
    `[V,d]` gradient per call (the output layer is a model's largest matrix), and requires the loss to be
    backpropagated unscaled (gradient 1; checked in the backward pass), as the trainer does.
    """
    _check_inputs(tokens, hidden, teacher_hidden, "hidden states")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1 or None, got {chunk_tokens}")
    if teacher_hidden is not None:
        teacher_hidden = teacher_hidden.detach()
        teacher_weight = (weight if teacher_weight is None else teacher_weight).detach()
    if chunk_tokens is None:
        chunk_tokens = auto_chunk_tokens(weight.shape[0])
    rows_per_block = chunk_tokens // max(1, tokens.shape[1])  # 0: streamed
    if weight_grad_out is not None and weight_grad_out.shape != weight.shape:
        raise ValueError(f"weight_grad_out has shape {tuple(weight_grad_out.shape)}, the weight {tuple(weight.shape)}")
    options = (temperature, divergence, rows_per_block, buffers, weight_grad_out)
    loss, *fields = _FusedHiddenObjective.apply(
        hidden, weight, teacher_hidden, teacher_weight, tokens, block_loss, options
    )
    stats = TokenStats(*(None if f.numel() == 0 and f.dim() == 1 else f for f in fields))
    return loss, stats
