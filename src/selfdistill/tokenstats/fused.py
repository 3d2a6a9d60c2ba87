"""The fused path, `hidden_objective`: output layer, statistics, loss and its gradient, block by block.

Modelled on torchtune's chunked cross-entropy, a short function per block and a loop over blocks. For each
block of whole rows, `_block_forward` forms the statistics (a few positions at a time, without gradient),
`_block_loss` applies the caller's loss and takes its gradient with respect to each statistic, by name, and
`_block_gradient` turns those into gradients of the hidden states and the output weight (again a few positions
at a time). `_FusedHiddenObjective.forward` is the loop; its backward pass only rescales the stored gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from selfdistill.tokenstats.stats import (
    DIFFERENTIABLE_FIELDS,
    STAT_FIELDS,
    DivergenceSpec,
    TokenStats,
    block_stats,
    check_inputs,
    concat_stats,
    logits_block,
)
from selfdistill.tokenstats.subchunk import FusedBuffers, analytic_backward_applies, subchunk_grad, subchunk_stats

# `hidden_objective`'s default block: as many positions as fit in this many bytes of float32 logits
# (55 positions at V = 151,936; 170 at SmolLM2's 49,152), so the block's memory does not grow with the vocabulary.
AUTO_BLOCK_BYTES = 32 << 20

Diagnostics = dict[str, Tensor]

BlockLoss = Callable[[TokenStats, slice], tuple[Tensor, Diagnostics]]
"""Maps the statistics of rows `rows` (a slice of the batch) to `(loss, diagnostics)`: the block's contribution
to the scalar loss, and scalar diagnostics that add up over blocks (sums, not means), the same names for every
block. It must have no side effects: the kernel sums both over the blocks and returns them.

The loss of the whole batch must be the sum of the contributions of its row blocks, which holds for every
objective here: they are per-rollout, and `aggregate` normalizes with global counts.
(`objectives.BlockObjective` is the one the trainers pass.)
"""


class FusedResult(NamedTuple):
    """What `hidden_objective` returns: the scalar loss (differentiable in the hidden states and the weight), the
    detached statistics of the whole batch, and the block losses' diagnostics summed over the blocks (detached)."""

    loss: Tensor
    stats: TokenStats
    diagnostics: Diagnostics


# Softmax-sized work inside a block is done at most this many positions at a time, in a workspace of five
# [positions, V] float32 buffers (`FusedBuffers`), so a block's peak memory is its student logits plus that
# workspace. Each sub-chunk also makes about five passes over the [V, d] weight (the teacher's logits twice,
# the two gradient matmuls), so taller sub-chunks pay off when d is large: 128 rather than 64 at d = 896
# (measured by bench/tokenstats.py; the figures are in docs/performance.md). With a small d those passes are
# cheap and the workspace is sized down to d / 4 positions (at least 16): at d = 64 and V = 151,936 that is
# 16 positions, an eighth of the workspace of 128, at the same speed (bench/step_vs_trl.py). With a small
# vocabulary the workspace is small whatever the positions, and each sub-chunk's fixed cost (some thirty tensor
# operations) dominates: there sub-chunks take as many positions as fit in AUTO_BLOCK_BYTES of workspace.
SUBCHUNK_TOKENS = 128


def _subchunk_positions(hidden_size: int, vocab_size: int) -> int:
    by_hidden = min(SUBCHUNK_TOKENS, max(16, hidden_size // 4))
    return max(by_hidden, AUTO_BLOCK_BYTES // (5 * 4 * vocab_size))


def auto_chunk_tokens(vocab_size: int) -> int:
    """The default block of `hidden_objective`: the positions whose float32 logits fit in AUTO_BLOCK_BYTES."""
    return max(1, AUTO_BLOCK_BYTES // (4 * vocab_size))


@dataclass(frozen=True)
class _Setup:
    """What every block of one `hidden_objective` call shares (tensors detached)."""

    weight: Tensor  # [V,d]
    teacher_weight: Tensor | None  # [V,d]
    temperature: float
    divergence: DivergenceSpec | None
    workspace: FusedBuffers
    positions: int  # per sub-chunk
    streamed: bool  # the student's logits formed per sub-chunk, in both passes, instead of held per block
    analytic: bool  # the closed-form gradient (`subchunk_grad`); autograd for clipped divergences


@dataclass
class _Block:
    """One block of whole rows, flattened to n = rows·T positions and cut into sub-chunks."""

    rows: slice  # of the batch
    shape: tuple[int, int]  # (rows, T)
    first: int  # the block's first position in the flattened batch
    hidden: Tensor  # [n,d]
    tokens: Tensor  # [n]
    teacher_hidden: Tensor | None  # [n,d]
    held: Tensor | None  # [n,V] the student's logits (in the workspace); None when streamed
    subs: list[slice]  # sub-chunks of the n positions
    teacher_top: list[tuple[Tensor, Tensor]] | None  # a top-k divergence's teacher side per sub-chunk (forward)


def _prepare(hidden: Tensor, weight: Tensor, teacher_weight: Tensor | None, temperature: float,
             divergence: DivergenceSpec | None, rows_per_block: int, buffers: FusedBuffers | None) -> _Setup:
    """The call's settings, its sub-chunk size and its workspace, made room for (`rows_per_block == 0`: streamed)."""
    B, T, d = hidden.shape
    streamed = rows_per_block == 0
    block_positions = min(B, B if streamed else rows_per_block) * T
    positions = min(_subchunk_positions(d, weight.shape[0]), block_positions)
    workspace = buffers if buffers is not None else FusedBuffers()
    workspace.prepare(positions if streamed else block_positions, positions, weight.shape[0],
                      torch.result_type(hidden, weight), hidden.device)
    return _Setup(weight, teacher_weight, temperature, divergence, workspace, positions, streamed,
                  analytic_backward_applies(divergence))


def _make_block(setup: _Setup, hidden: Tensor, teacher_hidden: Tensor | None, tokens: Tensor, rows: slice) -> _Block:
    """Block `rows` of the batch, with its student logits `[n,V]` formed (one matmul) unless streamed."""
    n_rows, T, d = rows.stop - rows.start, hidden.shape[1], hidden.shape[2]
    n = n_rows * T
    h_block = hidden[rows].reshape(n, d)  # [n,d]
    held = None if setup.streamed else torch.mm(h_block, setup.weight.T, out=setup.workspace.block[:n])  # [n,V]
    top_k = setup.analytic and setup.divergence is not None and setup.divergence.top_k is not None
    return _Block(
        rows, (n_rows, T), rows.start * T, h_block, tokens[rows].reshape(-1),
        None if teacher_hidden is None else teacher_hidden[rows].reshape(n, d),
        held, [slice(i, min(i + setup.positions, n)) for i in range(0, n, setup.positions)], [] if top_k else None,
    )


def _student_logits(setup: _Setup, block: _Block, sub: slice) -> Tensor:
    """The student's logits of a sub-chunk `[c,V]`: a view of the held block, or formed now."""
    if block.held is not None:
        return block.held[sub]
    return torch.mm(block.hidden[sub], setup.weight.T, out=setup.workspace.block[: sub.stop - sub.start])


def _teacher_hidden(block: _Block, sub: slice) -> Tensor | None:
    return None if block.teacher_hidden is None else block.teacher_hidden[sub]  # [c,d]


def _block_forward(setup: _Setup, block: _Block) -> TokenStats:
    """The block's statistics, each `[n]`, without gradient, a sub-chunk at a time (the teacher's logits formed
    on the spot); a top-k divergence's teacher side is kept in `block.teacher_top` for the gradient pass."""
    return concat_stats([
        subchunk_stats(_student_logits(setup, block, sub), block.tokens[sub], _teacher_hidden(block, sub),
                       setup.teacher_weight, setup.temperature, setup.divergence, setup.workspace, block.teacher_top)
        for sub in block.subs
    ])


def _block_loss(
    stats: TokenStats, block: _Block, block_loss: BlockLoss, want_grad: bool
) -> tuple[Tensor, Diagnostics, dict[str, Tensor] | None]:
    """The block's loss and diagnostics, and the loss's gradient `[n]` with respect to each differentiable
    statistic it depends on, by name (cheap: `[rows,T]` tensors). The gradients are None when there is no
    gradient pass to make."""
    with torch.enable_grad():
        fields = {name: getattr(stats, name) for name in STAT_FIELDS}  # each [n] or None
        fields = {name: None if x is None else x.view(block.shape).requires_grad_(name in DIFFERENTIABLE_FIELDS)
                  for name, x in fields.items()}  # each [rows,T]
        loss, diagnostics = block_loss(TokenStats(**fields), block.rows)
        diagnostics = {name: value.detach() for name, value in diagnostics.items()}
        if not (want_grad and loss.requires_grad):
            return loss, diagnostics, None
        leaves = {name: fields[name] for name in DIFFERENTIABLE_FIELDS if fields[name] is not None}
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)  # each [rows,T] or None
    return loss, diagnostics, {name: g.reshape(-1) for name, g in zip(leaves, grads, strict=True) if g is not None}


def _add_diagnostics(totals: Diagnostics, block: Diagnostics, first: bool) -> None:
    """Add a block's diagnostics into `totals` in place; every block must report the same names."""
    if not first and block.keys() != totals.keys():
        raise ValueError(f"the block loss reported diagnostics {sorted(block)} for one block and {sorted(totals)} "
                         "for another; a block loss must report the same names for every block")
    for name, value in block.items():
        totals[name] = totals[name] + value.float() if name in totals else value.float().clone()


def _logits_gradient(setup: _Setup, block: _Block, j: int, grads: dict[str, Tensor]) -> Tensor:
    """The gradient `[c,V]` float32 with respect to sub-chunk j's student logits of `Σ grads[name]·stats.name`:
    in closed form (a workspace buffer, valid until the workspace is used again), or by autograd when clipped."""
    sub = block.subs[j]
    if setup.analytic:
        # the teacher enters the gradient only through the divergence: its top-k side as kept, or its logits
        top = block.teacher_top[j] if block.teacher_top is not None and "divergence" in grads else None
        t_hidden = _teacher_hidden(block, sub) if top is None and "divergence" in grads else None  # [c,d]
        return subchunk_grad(
            _student_logits(setup, block, sub), block.tokens[sub], t_hidden, setup.teacher_weight, setup.temperature,
            setup.divergence, setup.workspace, grads.get("logp"), grads.get("entropy"), grads.get("divergence"),
            teacher_top=top,
        )
    with torch.enable_grad():  # clipped divergence: autograd through `block_stats`
        z = _student_logits(setup, block, sub).detach().requires_grad_(True)  # [c,V]
        t_hidden = _teacher_hidden(block, sub)
        t_logits = None if t_hidden is None else logits_block(t_hidden, setup.teacher_weight)  # [c,V]
        stats = block_stats(z, block.tokens[sub], t_logits, setup.temperature, setup.divergence)
        torch.autograd.backward([getattr(stats, name) for name in grads], list(grads.values()))
    return z.grad.float()


def _block_gradient(setup: _Setup, block: _Block, stat_grads: dict[str, Tensor], grad_hidden: Tensor | None,
                    grad_weight: Tensor | None) -> None:
    """Add the block's gradient into `grad_hidden` `[B·T,d]` and `grad_weight` `[V,d]` float32 (where not None),
    a sub-chunk at a time: the softmax-level gradient, then the two matmuls through the output layer."""
    for j, sub in enumerate(block.subs):
        grad_z = _logits_gradient(setup, block, j, {name: g[sub] for name, g in stat_grads.items()})  # [c,V]
        if grad_hidden is not None:
            rows_out = grad_hidden[block.first + sub.start : block.first + sub.stop]  # [c,d]
            if grad_z.dtype == setup.weight.dtype == rows_out.dtype:
                torch.mm(grad_z, setup.weight, out=rows_out)  # [c,V] @ [V,d]
            else:
                rows_out.copy_(grad_z.to(setup.weight.dtype) @ setup.weight)
        if grad_weight is not None:  # in place: no [V,d] temporary per sub-chunk
            grad_weight.addmm_(grad_z.T, block.hidden[sub].float())  # [V,c] @ [c,d]


def _weight_grad_accumulator(weight: Tensor, weight_grad_out: Tensor | None, needed: bool) -> Tensor | None:
    """The `[V,d]` float32 tensor the blocks add the weight's gradient into: the caller's when float32, else ours."""
    if weight_grad_out is not None and weight_grad_out.dtype == torch.float32:
        return weight_grad_out
    return torch.zeros_like(weight, dtype=torch.float32) if needed else None


class _FusedHiddenObjective(torch.autograd.Function):
    """Forward computes the loss and, block by block, its gradient; backward rescales it.

    Per block of rows: (1) the student's logits, one matmul (`_make_block`); (2) the statistics, a few positions
    at a time, without gradient, the teacher's logits of those positions formed on the spot (`_block_forward`);
    (3) the block's loss from them and its gradient with respect to the statistics (`_block_loss`); (4) again a
    few positions at a time (the teacher's logits formed once more), the softmax-level backward from those
    statistic gradients to the logits, in closed form (`subchunk_grad`; autograd for clipped divergences), and
    the two matmuls that turn it into gradients for the hidden states and the weight (`_block_gradient`).

    Streamed (`rows_per_block == 0`: one row has more positions than a block may hold): the block is the
    whole batch, and the student's logits are formed a sub-chunk at a time in (2) and again in (4) instead of
    once in (1), so memory no longer grows with the response length.
    """

    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, tokens, block_loss, options):
        temperature, divergence, rows_per_block, buffers, weight_grad_out, diagnostics = options
        B, T, d = hidden.shape
        need_hidden_grad = ctx.needs_input_grad[0]
        need_weight_grad = ctx.needs_input_grad[1] or weight_grad_out is not None
        ctx.weight_grad_outside = weight_grad_out is not None
        # Gradients are formed by hand below (some of it under enable_grad, for block_loss): record no graph.
        hidden, weight = hidden.detach(), weight.detach()
        ctx.weight_dtype = weight.dtype
        grad_hidden = torch.zeros_like(hidden) if need_hidden_grad else None  # [B,T,d]
        grad_weight = _weight_grad_accumulator(weight, weight_grad_out, need_weight_grad)  # [V,d] float32
        total = hidden.new_zeros((), dtype=torch.float32)
        setup = _prepare(hidden, weight, teacher_weight, temperature, divergence, rows_per_block, buffers)
        rows_per_block = B if setup.streamed else rows_per_block
        parts = []
        for start in range(0, B, rows_per_block):
            block = _make_block(setup, hidden, teacher_hidden, tokens, slice(start, min(start + rows_per_block, B)))
            stats = _block_forward(setup, block)  # each [n]
            loss, block_diagnostics, stat_grads = _block_loss(stats, block, block_loss,
                                                              need_hidden_grad or need_weight_grad)
            _add_diagnostics(diagnostics, block_diagnostics, first=start == 0)
            if stat_grads is not None:
                _block_gradient(setup, block, stat_grads, None if grad_hidden is None else grad_hidden.view(B * T, d),
                                grad_weight)
            total += loss.detach().float()
            parts.append(stats.detach())
        if ctx.weight_grad_outside:
            if grad_weight is not weight_grad_out:
                weight_grad_out.add_(grad_weight.to(weight_grad_out.dtype))
            grad_weight = None
        ctx.save_for_backward(grad_hidden, grad_weight)
        stats = concat_stats(parts, tokens.shape)
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
) -> FusedResult:
    """Fused output layer + statistics + loss, over blocks of whole rows.

    hidden: `[B,T,d]` student final hidden states at the positions that predict `tokens` `[B,T]`.
    weight: `[V,d]` output-layer weight (no bias, no logit soft-capping).
    block_loss: a block of rows' loss and diagnostics from its `TokenStats` (see `BlockLoss`).
    Returns a `FusedResult`: the scalar loss (differentiable in `hidden` and `weight`), the detached statistics of
    the whole batch, and the diagnostics summed over the blocks. Rows are grouped so that a block holds at most
    `chunk_tokens` positions, whose student logits `[rows·T, V]` are held for the block; when a single row has more
    positions than that, the logits are streamed: formed a sub-chunk at a time, twice, and the block is the whole
    batch.
    chunk_tokens: None picks `auto_chunk_tokens(V)` (32 MiB of float32 logits).
    buffers: reused between calls when given (see `FusedBuffers`).
    weight_grad_out: a `[V,d]` tensor (e.g. `weight.grad`) into which the loss's gradient with respect to
    `weight` is added during this call; `weight` then gets none through autograd. This saves a second
    `[V,d]` gradient per call (the output layer is a model's largest matrix), and requires the loss to be
    backpropagated unscaled (gradient 1; checked in the backward pass), as the trainer does.
    """
    check_inputs(tokens, hidden, teacher_hidden, "hidden states")
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
    diagnostics: Diagnostics = {}  # filled by the forward pass (an autograd Function returns tensors only)
    options = (temperature, divergence, rows_per_block, buffers, weight_grad_out, diagnostics)
    loss, *fields = _FusedHiddenObjective.apply(
        hidden, weight, teacher_hidden, teacher_weight, tokens, block_loss, options
    )
    stats = TokenStats(*(None if f.numel() == 0 and f.dim() == 1 else f for f in fields))
    return FusedResult(loss, stats, diagnostics)
