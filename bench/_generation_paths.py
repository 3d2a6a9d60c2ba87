"""The workloads of bench/generation.py, one per path (see its docstring), and how each counts its generate calls."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

import selfdistill.rollout.hf as rollout_hf
from selfdistill.rollout import cut_at_eos, eos_token_ids
from selfdistill.rollout.hf import HFBackend

TEMPERATURE = 1.0
TOP_P = 1.0
SAMPLE_SEED = 1234  # the global RNG before each unseeded run; the base of the per-prompt seeds of seeded runs


@dataclass
class CallRecord:
    """Sizes of the generate calls of one run."""

    calls: int = 0
    row_steps: int = 0  # sum over calls of rows x generated steps (padding rows included)
    caches: set[str] = field(default_factory=set)  # class names of the KV caches HFBackend made (our paths)


@dataclass
class Runner:
    """One path's workload: `run()` runs it once and returns the response lengths [R]; `count(record)` is a context
    manager that counts its generate calls into `record`."""

    run: Callable[[], torch.Tensor]
    count: Callable[[CallRecord], contextlib.AbstractContextManager[None]]


# ---------------------------------------------------------------------------------------------------
# counting


@contextlib.contextmanager
def count_generate_calls(model: Any, record: CallRecord) -> Iterator[None]:
    """Count the calls of ``model.generate`` and their rows x new steps, by shadowing the method on the instance
    (the loop and generate-batched call ``model.generate``). The cost is one shape read per call."""
    original = model.generate

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        out = original(*args, **kwargs)  # [rows, P + T]
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        record.calls += 1
        record.row_steps += sequences.shape[0] * (sequences.shape[1] - input_ids.shape[1])
        return out

    model.generate = counted
    try:
        yield
    finally:
        del model.generate  # back to the class's method


@contextlib.contextmanager
def count_decode_calls(backend: HFBackend, record: CallRecord) -> Iterator[None]:
    """Count HFBackend's decoding calls and their rows x new steps, by shadowing ``backend._decode`` on the instance
    (it returns ``(new_tokens [b, T_b], entropy or None)``), and note the class of every KV cache it makes."""
    original_decode, original_cache = backend._decode, backend._cache

    def counted(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        new_tokens, entropy = original_decode(*args, **kwargs)  # [b, T_b]
        record.calls += 1
        record.row_steps += new_tokens.shape[0] * new_tokens.shape[1]
        return new_tokens, entropy

    def noted(*args: Any, **kwargs: Any) -> Any:
        cache = original_cache(*args, **kwargs)
        record.caches.add(type(cache).__name__)
        return cache

    backend._decode, backend._cache = counted, noted  # type: ignore[method-assign]
    try:
        yield
    finally:
        del backend._decode, backend._cache  # back to the class's methods


@contextlib.contextmanager
def static_cache_bytes(limit: int) -> Iterator[None]:
    """Set ``selfdistill.rollout.hf.STATIC_CACHE_BYTES`` for the block (0: HFBackend always grows its cache)."""
    saved = rollout_hf.STATIC_CACHE_BYTES
    rollout_hf.STATIC_CACHE_BYTES = limit
    try:
        yield
    finally:
        rollout_hf.STATIC_CACHE_BYTES = saved


def _eos_and_pad(tokenizer: Any, model: Any) -> tuple[list[int], int]:
    eos_ids = eos_token_ids(tokenizer, model)
    return eos_ids, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]


def _decode_responses(tokenizer: Any, new_tokens: torch.Tensor, eos_ids: list[int], pad_id: int) -> torch.Tensor:
    """Cut `new_tokens` [b, T] at EOS and decode them to text, as a user would; returns the lengths [b]."""
    response_ids, _, lengths, _ = cut_at_eos(new_tokens, eos_ids, pad_id)  # [b, T'], [b]
    tokenizer.batch_decode(
        [ids[:n].tolist() for ids, n in zip(response_ids, lengths, strict=True)], skip_special_tokens=True
    )
    return lengths


def run_loop(
    model: Any, tokenizer: Any, prompts: list[list[int]], *, samples: int, max_new_tokens: int, fixed_length: bool
) -> torch.Tensor:
    """The hand-written baseline: one generate call per prompt for its G samples. Returns the response lengths [R]."""
    eos_ids, pad_id = _eos_and_pad(tokenizer, model)
    torch.manual_seed(SAMPLE_SEED)
    lengths = []
    for prompt in prompts:
        input_ids = torch.tensor([prompt], dtype=torch.long)  # [1, P]
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),  # [1, P]
            do_sample=True,
            num_return_sequences=samples,
            temperature=TEMPERATURE,
            top_p=TOP_P,
            top_k=0,  # the same distribution as ours: plain softmax(logits / T)
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens if fixed_length else None,
            eos_token_id=eos_ids,
            pad_token_id=pad_id,
        )  # [G, P + T]
        lengths.append(_decode_responses(tokenizer, out[:, input_ids.shape[1] :], eos_ids, pad_id))  # [G]
    return torch.cat(lengths)  # [R]


def run_generate_batched(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    *,
    samples: int,
    batch_size: int,
    max_new_tokens: int,
    fixed_length: bool,
) -> torch.Tensor:
    """HFBackend before its own decoding loop: the R rows left-padded into `model.generate` calls of `batch_size`
    rows, sampling with the global RNG. Returns the response lengths [R] (in the order of the calls)."""
    eos_ids, pad_id = _eos_and_pad(tokenizer, model)
    device = next(model.parameters()).device
    rows = [p for p in range(len(prompts)) for _ in range(samples)]  # prompt-major
    rows.sort(key=lambda p: len(prompts[p]))  # stable, as HFBackend does: the same padding as ours
    torch.manual_seed(SAMPLE_SEED)
    lengths = []
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            batch = [prompts[p] for p in rows[start : start + batch_size]]
            width = max(len(p) for p in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # [b, P]
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # [b, P]
            for i, p in enumerate(batch):
                input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
                attention_mask[i, width - len(p) :] = 1
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                do_sample=True,
                temperature=TEMPERATURE,
                top_p=TOP_P,
                top_k=0,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens if fixed_length else None,
                eos_token_id=eos_ids,
                pad_token_id=pad_id,
            )  # [b, P + T]
            lengths.append(_decode_responses(tokenizer, out[:, width:], eos_ids, pad_id))  # [b]
    return torch.cat(lengths)  # [R]


def make_runner(
    path: str,
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    *,
    batch_size: int,
    samples: int,
    max_new_tokens: int,
    fixed_length: bool,
    decode: str = "eager",
) -> Runner:
    """The workload of `path` (see the module docstring) and how to count its generate calls. `decode` is the one-token
    step of the `ours` paths (`HFBackend(decode=...)`); `ours-compiled` always compiles it."""
    if path == "loop":
        return Runner(
            run=lambda: run_loop(
                model, tokenizer, prompts, samples=samples, max_new_tokens=max_new_tokens, fixed_length=fixed_length
            ),
            count=lambda record: count_generate_calls(model, record),
        )
    if path == "generate-batched":
        return Runner(
            run=lambda: run_generate_batched(
                model,
                tokenizer,
                prompts,
                samples=samples,
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
                fixed_length=fixed_length,
            ),
            count=lambda record: count_generate_calls(model, record),
        )
    if path not in ("ours", "ours-dynamic", "ours-unseeded", "ours-compiled"):
        raise ValueError(f"unknown path {path!r}")
    backend = HFBackend(model, tokenizer, batch_size=batch_size, min_new_tokens=max_new_tokens if fixed_length else 0,
                        decode="compiled" if path == "ours-compiled" else decode)
    seeds = None if path == "ours-unseeded" else [SAMPLE_SEED + i for i in range(len(prompts))]

    def run() -> torch.Tensor:
        with contextlib.ExitStack() as stack:
            if path == "ours-dynamic":
                stack.enter_context(static_cache_bytes(0))
            torch.manual_seed(SAMPLE_SEED)
            rollouts = backend.generate(
                prompts,
                num_samples=samples,
                temperature=TEMPERATURE,
                top_p=TOP_P,
                max_new_tokens=max_new_tokens,
                seed=seeds,
            )
        return rollouts.lengths  # [R]

    return Runner(run=run, count=lambda record: count_decode_calls(backend, record))
