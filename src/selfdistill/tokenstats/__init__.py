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
    of that block's statistics, returning the loss and its diagnostics; the gradient with respect to
    each block's logits is taken while the block is in memory, during the forward pass, so the
    backward pass only rescales stored gradients. The student's logits of a block of rows are held
    whole when they fit in `chunk_tokens` positions, else formed a few positions at a time in both
    passes (one extra student matmul); the teacher's are always formed a few positions at a time (one
    extra teacher matmul). This is what the trainer uses.

Logits are divided by `temperature` before any softmax (the sampling temperature).

Modules: `stats` (`TokenStats`, `DivergenceSpec`, the math on one block of float32 logits),
`reference` (the autograd paths: `naive_token_stats`, `token_stats`, `hidden_token_stats`),
`fused` (`hidden_objective`: a per-block forward, a per-block gradient and the loop over blocks),
`subchunk` (the fused path's closed-form statistics and gradients of a few positions, in a reused workspace).
"""

from selfdistill.tokenstats.fused import (
    AUTO_BLOCK_BYTES,
    SUBCHUNK_TOKENS,
    BlockLoss,
    FusedResult,
    auto_chunk_tokens,
    hidden_objective,
)
from selfdistill.tokenstats.reference import hidden_token_stats, naive_token_stats, token_stats
from selfdistill.tokenstats.stats import (
    DEFAULT_CHUNK_TOKENS,
    DIFFERENTIABLE_FIELDS,
    STAT_FIELDS,
    DivergenceSpec,
    TokenStats,
    divergence_terms,
)
from selfdistill.tokenstats.subchunk import FusedBuffers

__all__ = [
    "AUTO_BLOCK_BYTES",
    "DEFAULT_CHUNK_TOKENS",
    "DIFFERENTIABLE_FIELDS",
    "STAT_FIELDS",
    "SUBCHUNK_TOKENS",
    "BlockLoss",
    "DivergenceSpec",
    "FusedBuffers",
    "FusedResult",
    "TokenStats",
    "auto_chunk_tokens",
    "divergence_terms",
    "hidden_objective",
    "hidden_token_stats",
    "naive_token_stats",
    "token_stats",
]
