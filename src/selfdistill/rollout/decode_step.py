"""The one-token decoding step of `HFBackend`: the model's eager forward pass, or the same pass compiled.

``decode`` (a backend argument, ``rollout.decode`` in a training config) chooses:

- ``eager``: the model's forward pass, operation by operation.
- ``compiled``: the one-token step compiled by ``torch.compile`` (inductor, ``dynamic=False``) when it can be: a
  preallocated KV cache (``StaticCache``, so every step of a call has the same shapes), a compiler for the device (a
  C++ compiler for the CPU, triton for a GPU) and a Python that dynamo supports. Otherwise, or when compilation fails,
  the eager step runs and one warning says why. The prefill stays eager (its width changes with every batch).
  Graphs are compiled once per (model, rows, cache length) and kept for the process (dynamo's cache, up to
  ``torch._dynamo.config.recompile_limit`` shapes); the cache length is rounded up to `CACHE_LENGTH_MULTIPLE` so
  prompts of nearby widths share a graph.
- ``auto``: the eager step. Compiling costs its compile time for every new shape (the first step of each rows x
  cache length in the process), and on the CPU measured the compiled step repaid that only after about a thousand
  steps or more at one or a few rows, and was no faster than the eager step at the batches training decodes (16-64
  rows of a SmolLM2-sized model; docs/performance.md, "The compiled one-token step"). On a GPU it is unmeasured.
  ``compiled`` is there to choose it where it pays: long runs of few rows, small models.

The token choice (sampling, EOS bookkeeping) is the same eager code under both steps, so for the same logits the
two loops give the same tokens. The compiled step computes the logits with other kernels (fused element-wise
work), so in float32 they agree with the eager ones to rounding, not bit for bit: a draw that lands within rounding
of a boundary of the cumulative distribution could go the other way (tests/rollout/test_decode_step.py checks
that the samples are identical on a tiny Qwen2 model and a tiny Llama with grouped-query attention).

One log line per backend says which step runs and why (INFO when as asked, WARNING when ``compiled`` was asked
and cannot run), and one more if a failed compilation switches it to the eager step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch

log = logging.getLogger(__name__)

DECODE_MODES = ("auto", "compiled", "eager")

# The static cache's length is rounded up to a multiple of this, so the compiled step's shapes repeat across calls.
CACHE_LENGTH_MULTIPLE = 64

StepForward = Callable[..., torch.Tensor]
"""Runs the model on one token per row (keyword arguments of the model's forward) and returns the logits `[b, V]`."""


def eager_step(model: Any, **inputs: Any) -> torch.Tensor:
    return model(**inputs).logits[:, -1]  # [b, V]


_compiled_step: StepForward | None = None  # torch.compile(eager_step), made on first use


def _compiled() -> StepForward:
    global _compiled_step
    if _compiled_step is None:
        _compiled_step = torch.compile(eager_step, dynamic=False)
    return _compiled_step


def _not_compiling() -> bool:
    return False


@contextlib.contextmanager
def _one_token_gqa_packed() -> Iterator[None]:
    """Attention of a one-token step as transformers runs it eagerly, also while it is compiled: with grouped-query
    attention its SDPA path folds the query heads of each key/value head into one row block (``pack_gqa``), except
    under ``torch.compile``, where it repeats the keys and values for every query head instead, writing them out
    per layer and step. That check is lifted for the compiled step's own calls (the shapes are static, so packing
    traces like any reshape) and restored after each."""
    module = sys.modules.get("transformers.integrations.sdpa_attention")
    original = getattr(module, "is_torchdynamo_compiling", None)
    if original is None:  # another transformers layout: nothing to lift
        yield
        return
    module.is_torchdynamo_compiling = _not_compiling
    try:
        yield
    finally:
        module.is_torchdynamo_compiling = original


def compiled_step(model: Any, **inputs: Any) -> torch.Tensor:
    """The one-token step compiled (`eager_step` through ``torch.compile``)."""
    with _one_token_gqa_packed():
        return _compiled()(model, **inputs)  # [b, V]


def compiler_unavailable(device: torch.device) -> str | None:
    """Why ``torch.compile`` cannot compile a step for `device` in this process, or None when it can."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python"
    if device.type == "cpu":
        compilers = [c for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c]
        if not any(shutil.which(c) for c in compilers):
            tried = ", ".join(compilers)
            return f"no C++ compiler on PATH (inductor builds its CPU kernels with one; tried {tried})"
        return None
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "triton is not installed (inductor's GPU kernels need it)"
    return f"inductor is not set up here for device {device.type!r}"


def check_decode_mode(decode: str) -> str:
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
    return decode


class DecodeStep:
    """The step function of one backend: `for_call` gives the function for one decoding call, `failed` turns the
    compiled step off after an error. Logs its choice once, and again only when it changes."""

    def __init__(self, decode: str) -> None:
        self.decode = check_decode_mode(decode)
        self._broken: str | None = None  # the error that turned the compiled step off
        self._logged: tuple[str, str] | None = None

    def for_call(self, device: torch.device, static_cache: bool) -> StepForward:
        """The step for a decoding call on `device` (`static_cache`: whether its KV cache is a preallocated one)."""
        name, reason = self._choose(device, static_cache)
        asked_compiled = self.decode == "compiled"
        if self._logged != (name, reason):
            level = logging.WARNING if asked_compiled and name == "eager" else logging.INFO
            log.log(level, "decoding with the %s one-token step (decode=%s): %s", name, self.decode, reason)
            self._logged = (name, reason)
        return compiled_step if name == "compiled" else eager_step

    def failed(self, error: BaseException) -> None:
        """The compiled step raised `error`: the eager step runs from now on."""
        self._broken = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]

    def _choose(self, device: torch.device, static_cache: bool) -> tuple[str, str]:
        if self.decode == "eager":
            return "eager", "as configured"
        if self.decode == "auto":
            return "eager", ("compiling the step does not pay for its compile time where it was measured "
                             "(decode=compiled compiles it; docs/performance.md)")
        if self._broken is not None:
            return "eager", f"the compiled step failed ({self._broken})"
        if not static_cache:
            return "eager", ("the KV cache grows (the model has no static cache, or it exceeds STATIC_CACHE_BYTES), "
                             "so every step would have new shapes")
        missing = compiler_unavailable(device)
        if missing is not None:
            return "eager", missing
        return "compiled", "torch.compile (inductor), one graph per rows x cache length"
