"""The fused path's work on a sub-chunk of a few positions `[c,V]`: the statistics without gradient and their
gradient with respect to the student's logits in closed form, in a workspace of float32 buffers reused by
every sub-chunk (`FusedBuffers`). Computes what `stats.block_stats` computes (tested equal)."""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor

from selfdistill.tokenstats.stats import (
    DivergenceSpec,
    TokenStats,
    divergence_terms,
    logits_block,
    restricted_student,
    top_ids,
)


def analytic_backward_applies(divergence: DivergenceSpec | None) -> bool:
    """`subchunk_grad` covers every divergence except clipped ones (autograd does those)."""
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
    return out.copy_(logits_block(teacher_hidden, teacher_weight))


def subchunk_stats(
    logits: Tensor, tokens: Tensor, teacher_hidden: Tensor | None, teacher_weight: Tensor | None,
    temperature: float, divergence: DivergenceSpec | None, workspace: FusedBuffers,
    teacher_top: list[tuple[Tensor, Tensor]] | None = None,
) -> TokenStats:
    """`block_stats` without gradient, for a sub-chunk's student logits `[c,V]` (left untouched) and the
    teacher's hidden states `[c,d]` (its logits are formed here), in the workspace's buffers. With a top-k
    divergence, (the teacher's top-k ids `[c,k]`, its log-probs renormalized over them `[c,k]`) are appended to
    `teacher_top` when given: all the gradient pass needs of the teacher then."""
    s_logp, scratch, t_logp_all, extra, t_logits = workspace.views(logits.shape[0])  # 5 x [c,V]
    _scaled_log_softmax(logits, temperature, s_logp, scratch)
    logp = s_logp.gather(-1, tokens[:, None]).squeeze(-1)  # [c]
    entropy = _entropy_of(s_logp, scratch)  # [c]
    if teacher_hidden is None:
        return TokenStats(logp, entropy)
    _teacher_logits_into(teacher_hidden, teacher_weight, t_logits)
    _scaled_log_softmax(t_logits, temperature, t_logp_all, scratch)
    t_logp = t_logp_all.gather(-1, tokens[:, None]).squeeze(-1)  # [c]
    t_entropy = _entropy_of(t_logp_all, scratch)  # [c]
    if divergence is None:
        return TokenStats(logp, entropy, teacher_logp=t_logp, teacher_entropy=t_entropy)
    if divergence.top_k is not None:  # [c,k]: small, the plain function does it on the restricted log-probs
        top = top_ids(divergence, s_logp, t_logp_all)  # [c,k]
        top_t_logp = t_logp_all.gather(-1, top).log_softmax(-1)  # [c,k]
        if teacher_top is not None:
            teacher_top.append((top, top_t_logp))
        terms = divergence_terms(restricted_student(divergence, s_logp, top), top_t_logp,
                                 replace(divergence, top_k=None, renormalize_student=True))
        return TokenStats(logp, entropy, teacher_logp=t_logp, teacher_entropy=t_entropy, divergence=terms.sum(-1))
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
    return TokenStats(logp, entropy, teacher_logp=t_logp, teacher_entropy=t_entropy, divergence=terms.sum(-1))


def subchunk_grad(
    logits: Tensor, tokens: Tensor, teacher_hidden: Tensor | None, teacher_weight: Tensor | None,
    temperature: float, divergence: DivergenceSpec | None, workspace: FusedBuffers,
    grad_logp: Tensor | None, grad_entropy: Tensor | None, grad_divergence: Tensor | None,
    teacher_top: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """The gradient `[c,V]` float32 with respect to the student logits of
    `Σ g_logp·logp + g_entropy·entropy + g_divergence·divergence` (the statistics of `block_stats`),
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
    p ⊙ a = −p̃_T on the k entries, over the whole vocabulary's softmax; `teacher_top` (from `subchunk_stats`) gives the
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
                top = top_ids(divergence, s_logp, t_logp_all)  # [c,k]
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
    """p ⊙ a for an unclipped divergence (see `subchunk_grad`) from the student's probabilities and
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

