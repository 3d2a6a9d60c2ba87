"""The autograd paths: the naive reference, statistics from logits in chunks (the TRL route, `distill`), and
from hidden states in chunks with each chunk's logits recomputed in the backward pass (tests, bench)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from selfdistill.tokenstats.stats import (
    DEFAULT_CHUNK_TOKENS,
    DivergenceSpec,
    TokenStats,
    block_stats,
    check_inputs,
    concat_stats,
    logits_block,
)


def naive_token_stats(
    logits: Tensor,
    tokens: Tensor,
    *,
    temperature: float = 1.0,
    teacher_logits: Tensor | None = None,
    divergence: DivergenceSpec | None = None,
) -> TokenStats:
    """Reference implementation: the whole `[B,T,V]` computation at once, in float32."""
    check_inputs(tokens, logits, teacher_logits, "logits")
    B, T, V = logits.shape
    t_flat = None if teacher_logits is None else teacher_logits.reshape(B * T, V)
    whole = block_stats(logits.reshape(B * T, V), tokens.reshape(-1), t_flat, temperature, divergence)
    return concat_stats([whole], tokens.shape)


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
    check_inputs(tokens, logits, teacher_logits, "logits")
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
            parts.append(checkpoint(block_stats, *args, use_reentrant=False))
        else:
            parts.append(block_stats(*args))
    return concat_stats(parts, tokens.shape)


def _hidden_block_stats(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    teacher_logits: Tensor | None,
    temperature: float,
    divergence: DivergenceSpec | None,
) -> TokenStats:
    return block_stats(logits_block(hidden, weight), tokens, teacher_logits, temperature, divergence)


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
    check_inputs(tokens, hidden, teacher_hidden, "hidden states")
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
                t_logits = logits_block(teacher_hidden.reshape(B * T, d)[rows], t_w)  # [n,V]
        args = (flat[rows], weight, flat_tokens[rows], t_logits, temperature, divergence)
        parts.append(
            checkpoint(_hidden_block_stats, *args, use_reentrant=False)
            if recompute
            else _hidden_block_stats(*args)
        )
    return concat_stats(parts, tokens.shape)
