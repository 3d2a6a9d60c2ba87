"""The roofline of one decoding step on this machine, for `bench/generation.py --roofline`.

Two probes of the machine, each timed over at least `seconds` of repeats at the thread count in use:
  copy bandwidth    `dst.copy_(src)` of a 256 MiB float32 tensor, counted as 2 x 256 MiB moved (read + write);
  GEMM throughput   `x @ w` of 1,024 rows through the model's MLP shape (`[1024,d] @ [d,intermediate]`), in the
                    dtype, 2·m·k·n FLOPs: the compute roof (a product with few rows is limited by reading its
                    weight, which the memory roof already counts).

One decoding step of a batch of b rows at context length L must read every weight once (the output layer too; the
embedding lookup reads b rows only, counted in the output layer when they are tied) and each row's KV cache, and
compute about 2 FLOPs per weight per row plus the attention's 4·L·heads·head_dim per layer per row:

    bytes(b, L) = weight bytes + b · layers · 2 · kv_heads · head_dim · L · dtype bytes
    flops(b, L) = 2 · b · matmul weights + 4 · b · layers · heads · head_dim · L
    bound time  = max(bytes / copy bandwidth, flops / GEMM throughput)

so the bound on tokens/s is b / bound time. L is the mean context over the generated tokens (prompt + half the new
tokens). The bound ignores per-operation overhead, norms, the activations' own traffic and sampling: a decode loop
reaches it only when the matrix products dominate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

COPY_BYTES = 256 << 20


def _timed(fn, seconds: float) -> float:
    """Seconds per call of `fn`, after one warm-up call, over at least `seconds` of repeats."""
    fn()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return elapsed / calls


def copy_bandwidth(seconds: float = 1.0) -> float:
    """Bytes per second of a large tensor copy (read + write counted)."""
    src = torch.ones(COPY_BYTES // 4)
    dst = torch.empty_like(src)
    return 2 * COPY_BYTES / _timed(lambda: dst.copy_(src), seconds)


def gemm_throughput(m: int, k: int, n: int, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """FLOPs per second of `[m,k] @ [k,n]` in `dtype`."""
    x, w = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    return 2 * m * k * n / _timed(lambda: x @ w, seconds)


@dataclass
class DecodeShape:
    """What one decoding step of a model reads and computes, from its config."""

    weight_count: int  # every weight read per step (the output layer included; a tied embedding counted once)
    matmul_weights: int  # weights that take part in a matrix product per row (decoder layers + output layer)
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, model: torch.nn.Module) -> DecodeShape:
        config = model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        unique = {id(p): p for p in model.parameters()}.values()
        weight_count = sum(p.numel() for p in unique)
        embedding = model.get_input_embeddings().weight
        output = model.get_output_embeddings().weight
        tied = output.data_ptr() == embedding.data_ptr()
        # an untied input embedding is only looked up (b rows), not read whole
        read = weight_count if tied else weight_count - embedding.numel()
        return cls(read, read, config.num_hidden_layers, heads, getattr(config, "num_key_value_heads", heads),
                   head_dim, config.hidden_size, config.intermediate_size, config.vocab_size)

    def bytes(self, batch: int, context: float, dtype_bytes: int) -> float:
        cache = batch * self.layers * 2 * self.kv_heads * self.head_dim * context * dtype_bytes
        return self.weight_count * dtype_bytes + cache

    def flops(self, batch: int, context: float) -> float:
        return 2 * batch * self.matmul_weights + 4 * batch * self.layers * self.heads * self.head_dim * context


@dataclass
class Bound:
    bandwidth: float  # bytes/s
    gemm: float  # FLOPs/s at the step's shapes
    seconds: float  # per step
    limit: str  # "memory" or "compute"

    def tokens_per_s(self, batch: int) -> float:
        return batch / self.seconds


def compute_roof(shape: DecodeShape, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """FLOPs per second of a compute-bound product through the model's MLP shape in `dtype`."""
    return gemm_throughput(1024, shape.hidden, shape.intermediate, dtype, seconds)


def decode_bound(shape: DecodeShape, batch: int, context: float, dtype: torch.dtype, bandwidth: float,
                 gemm: float) -> Bound:
    """The roofline bound of one decoding step of `batch` rows at mean context `context` in `dtype`, from the
    memory roof (`bandwidth`, bytes/s) and the compute roof (`gemm`, FLOPs/s)."""
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    memory_time = shape.bytes(batch, context, dtype_bytes) / bandwidth
    compute_time = shape.flops(batch, context) / gemm
    return Bound(bandwidth, gemm, max(memory_time, compute_time),
                 "memory" if memory_time >= compute_time else "compute")
