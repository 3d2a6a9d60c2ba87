"""Rollout generation: sample G completions per prompt from the current policy.

A backend turns token-id prompts into a `Rollouts` batch. Rows are prompt-major: the G samples of
prompt 0 come first, then those of prompt 1, and so on; ``prompt_index`` says which prompt each row
came from. Responses are cut at their first EOS token, which stays *inside* the response mask even
when the pad token equals the EOS token (otherwise the model never learns to stop).

Backends: ``"hf"`` (`selfdistill.rollout.hf`: our decoding loop over a transformers model's forward
pass, CPU or GPU) and ``"vllm"`` (`selfdistill.rollout.vllm`, GPU, optional: ``pip install
selfdistill[vllm]``; imported only when asked for, and untested here because the development machines
have no GPU).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol

import torch


@dataclass
class Rollouts:
    """A batch of B = P * G sampled responses. All tensors live on the CPU unless moved with `to`."""

    prompt_index: torch.Tensor  # [B] long: index into the list of prompts given to `generate`
    prompt_lengths: torch.Tensor  # [B] long: number of (unpadded) prompt tokens of each row
    response_ids: torch.Tensor  # [B, T] long: response tokens, right-padded with the pad id
    response_mask: torch.Tensor  # [B, T] float: 1 on response tokens including the EOS token, else 0
    lengths: torch.Tensor  # [B] long: number of response tokens (EOS included) = response_mask.sum(1)
    truncated: torch.Tensor  # [B] bool: reached max_new_tokens without producing EOS
    texts: list[str]  # B decoded responses, special tokens removed
    # [B, T] float or None: entropy (nats) of softmax(logits / temperature) at each response token, 0 where
    # response_mask is 0. Only filled when the backend is asked for it (HFBackend(return_entropy=True)).
    token_entropy: torch.Tensor | None = None

    def __post_init__(self) -> None:
        B, T = self.response_ids.shape
        for name in ("prompt_index", "prompt_lengths", "lengths", "truncated"):
            if getattr(self, name).shape != (B,):
                raise ValueError(f"{name} has shape {tuple(getattr(self, name).shape)}, expected ({B},)")
        if self.response_mask.shape != (B, T):
            raise ValueError(f"response_mask has shape {tuple(self.response_mask.shape)}, expected ({B}, {T})")
        if len(self.texts) != B:
            raise ValueError(f"{len(self.texts)} texts for {B} rows")
        if self.token_entropy is not None and self.token_entropy.shape != (B, T):
            raise ValueError(f"token_entropy has shape {tuple(self.token_entropy.shape)}, expected ({B}, {T})")

    def __len__(self) -> int:
        return len(self.texts)

    def to(self, device: torch.device | str) -> Rollouts:
        """A copy with every tensor on `device`."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return Rollouts(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in values.items()})


class RolloutBackend(Protocol):
    """What the trainer needs from a generation backend."""

    pad_id: int
    """The token id that fills padded positions of responses (the tokenizer's pad token, else its first eos)."""

    def generate(
        self,
        prompt_ids: list[list[int]],
        *,
        num_samples: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int | Sequence[int] | None,
    ) -> Rollouts:
        """Sample `num_samples` responses for each prompt (token ids, no padding). ``temperature == 0``
        means greedy decoding. ``seed`` makes the result reproducible: one int for the whole call, or one
        per prompt (the trainer passes a list, so a prompt's samples never depend on the batch it is in);
        None uses the global RNG. `check_generate_args` checks these arguments for every backend."""
        ...


def check_generate_args(
    prompt_ids: Sequence[Sequence[int]],
    *,
    num_samples: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int | Sequence[int] | None,
) -> int | list[int] | None:
    """The argument checks every backend's `generate` makes; raises ValueError naming the bad values.
    Returns `seed` as given when it is None or an int, else as a list of ints, one per prompt (checked)."""
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("prompt_ids must be a non-empty list of non-empty token-id lists")
    if num_samples < 1 or max_new_tokens < 1:
        raise ValueError(f"need num_samples >= 1 and max_new_tokens >= 1, got {num_samples}, {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if seed is None or isinstance(seed, int):
        return seed
    seeds = [int(s) for s in seed]
    if len(seeds) != len(prompt_ids):
        raise ValueError(f"got {len(seeds)} seeds for {len(prompt_ids)} prompts")
    return seeds


def eos_token_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """Every token id that ends a response: the tokenizer's eos token and the eos id(s) of the model's
    generation config (an int or a list), without duplicates, in that order."""
    candidates: list[Any] = [tokenizer.eos_token_id]
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        candidates.append(generation_config.eos_token_id)
    ids: list[int] = []
    for item in candidates:
        for token_id in item if isinstance(item, (list, tuple)) else [item]:
            if token_id is not None and int(token_id) not in ids:
                ids.append(int(token_id))
    if not ids:
        raise ValueError("found no eos token id in the tokenizer or the model's generation config")
    return ids


def cut_at_eos(
    tokens: torch.Tensor, eos_ids: Sequence[int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut generated tokens at each row's first EOS (kept) and pad the rest.

    tokens: [B, T] long, the generated tokens after the prompt. Returns ``(response_ids [B, T'],
    response_mask [B, T'] float, lengths [B] long, truncated [B] bool)`` with T' = the longest
    response. A row without EOS is truncated and keeps all T tokens.
    """
    B, T = tokens.shape
    positions = torch.arange(T, device=tokens.device)  # [T]
    is_eos = torch.isin(tokens, torch.tensor(list(eos_ids), device=tokens.device))  # [B, T]
    first_eos = torch.where(is_eos, positions, T).min(dim=1).values  # [B], T where there is none
    truncated = first_eos == T  # [B]
    lengths = torch.where(truncated, T, first_eos + 1)  # [B], the EOS token counts
    width = int(lengths.max()) if B > 0 else 0
    keep = positions[None, :width] < lengths[:, None]  # [B, T']
    response_ids = tokens[:, :width].masked_fill(~keep, pad_id)  # [B, T']
    return response_ids, keep.float(), lengths, truncated


def assemble_rollouts(
    generated: Sequence[Sequence[int] | torch.Tensor],
    rows: Sequence[int],
    prompt_ids: Sequence[Sequence[int]],
    *,
    tokenizer: Any,
    eos_ids: Sequence[int],
    pad_id: int,
    step_entropy: Sequence[torch.Tensor | None] | None = None,
) -> Rollouts:
    """Build `Rollouts` from each row's generated tokens (any backend): pad, cut at EOS, decode.

    generated[r]: the new tokens of row r; rows[r]: the prompt it came from; step_entropy[r]: the
    per-token entropies of row r (optional, `[T_r]`).
    """
    width = max(1, max(len(t) for t in generated))
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [B, T]
    for r, row_tokens in enumerate(generated):
        tokens[r, : len(row_tokens)] = torch.as_tensor(row_tokens, dtype=torch.long).cpu()
    response_ids, response_mask, lengths, truncated = cut_at_eos(tokens, eos_ids, pad_id)
    token_entropy = None
    if step_entropy is not None:
        token_entropy = torch.zeros(response_mask.shape, dtype=torch.float32)  # [B, T]
        for r, row_entropy in enumerate(step_entropy):
            kept = int(lengths[r])
            token_entropy[r, :kept] = row_entropy[:kept].cpu()
    texts = tokenizer.batch_decode(
        [ids[:n].tolist() for ids, n in zip(response_ids, lengths, strict=True)], skip_special_tokens=True
    )
    return Rollouts(
        prompt_index=torch.tensor(list(rows), dtype=torch.long),
        prompt_lengths=torch.tensor([len(prompt_ids[p]) for p in rows], dtype=torch.long),
        response_ids=response_ids,
        response_mask=response_mask,
        lengths=lengths,
        truncated=truncated,
        texts=texts,
        token_entropy=token_entropy,
    )


def make_backend(name: str, model: Any, tokenizer: Any, **kwargs: Any) -> RolloutBackend:
    """The rollout backend called `name` ("hf" or "vllm") for `model` and `tokenizer`; extra keyword
    arguments go to the backend (``batch_size``, ``return_entropy`` for "hf"; ``adapter`` and
    ``vllm.LLM`` arguments for "vllm", whose `model` is a model folder or a ``vllm.LLM``)."""
    if name == "hf":
        from selfdistill.rollout.hf import HFBackend

        return HFBackend(model, tokenizer, **kwargs)
    if name == "vllm":
        from selfdistill.rollout.vllm import VLLMBackend  # raises ImportError with the install hint

        return VLLMBackend(model, tokenizer, **kwargs)
    raise ValueError(f"unknown rollout backend {name!r}; choose 'hf' or 'vllm'")


__all__ = [
    "Rollouts",
    "assemble_rollouts",
    "RolloutBackend",
    "check_generate_args",
    "cut_at_eos",
    "eos_token_ids",
    "make_backend",
]
