"""Token ids to hidden states, for student and teacher: packing, the forward pass, the output layer.

`pack` lays out one prompt and one response per row (`PackedBatch`): prompts left-padded to width P,
response token t of every row at column P + t, and the logits that predict it at column P - 1 + t.
`pack_shared` lays out the same batch with each distinct prompt kept once (`SharedPrefixBatch`).

`response_hidden_states` takes either layout: a `PackedBatch` runs every row's `prompt ⊕ response`; a
`SharedPrefixBatch` runs each distinct prompt once and the rows' responses on its KV cache. Both give the
same hidden states and the same gradients; `shared_prefix_blocker` says when the shared one cannot run
(`cache_keyword` and `full_attention_cache` are the KV-cache checks it shares with `selfdistill.rollout.hf`).

`output_weight` is the `[V,d]` matrix the fused token statistics multiply hidden states by, and
`check_output_layer` refuses heads whose logits are not plain `h @ W.T`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

# --------------------------------------------------------------------------------------------
# Packing prompts and responses


@dataclass
class PackedBatch:
    """Prompts left-padded to a common width, each followed by its right-padded response.

    input_ids, attention_mask, position_ids: [B, L] long with L = prompt_width + T.
    response_mask: [B, T] float, 1.0 on real response tokens (EOS included, even when pad == EOS).
    Response token t sits at column prompt_width + t; its logits are at column prompt_width - 1 + t.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    prompt_width: int
    response_mask: torch.Tensor

    @property
    def response_ids(self) -> torch.Tensor:
        """The response tokens, [B, T] (padding where response_mask is 0)."""
        return self.input_ids[:, self.prompt_width :]

    def response_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """From model logits [B, L, V], the ones that predict each response token: [B, T, V]."""
        if logits.shape[:2] != self.input_ids.shape:
            raise ValueError(
                f"logits of shape {tuple(logits.shape)} do not match input_ids {tuple(self.input_ids.shape)}"
            )
        response_length = self.response_mask.shape[1]
        return logits[:, self.prompt_width - 1 : self.prompt_width - 1 + response_length]  # [B, T, V]

    def to(self, device: torch.device | str) -> PackedBatch:
        """The same batch with every tensor on `device`."""
        return PackedBatch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            position_ids=self.position_ids.to(device),
            prompt_width=self.prompt_width,
            response_mask=self.response_mask.to(device),
        )


def pack(prompt_ids: list[list[int]], response_ids: list[list[int]], *, pad_id: int) -> PackedBatch:
    """Pack one prompt and one response per row so that responses line up column by column.

    Prompts are left-padded to the longest prompt (width P), responses right-padded to the longest
    response (T). The masks come from the lengths, never from comparing tokens with pad_id, so a
    response may contain the pad id (EOS when pad == EOS) and it still counts.
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    if not prompt_ids:
        raise ValueError("cannot pack an empty batch")
    if any(len(prompt) == 0 for prompt in prompt_ids):
        raise ValueError(
            "every prompt needs at least one token (its last token's logits predict the response)"
        )
    batch_size = len(prompt_ids)
    prompt_width = max(len(prompt) for prompt in prompt_ids)
    response_length = max(len(response) for response in response_ids)
    total_length = prompt_width + response_length

    input_ids = torch.full((batch_size, total_length), pad_id, dtype=torch.long)  # [B, L]
    attention_mask = torch.zeros((batch_size, total_length), dtype=torch.long)  # [B, L]
    response_mask = torch.zeros((batch_size, response_length), dtype=torch.float32)  # [B, T]
    for row, (prompt, response) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        prompt_start = prompt_width - len(prompt)
        response_end = prompt_width + len(response)
        input_ids[row, prompt_start:prompt_width] = torch.tensor(prompt, dtype=torch.long)
        input_ids[row, prompt_width:response_end] = torch.tensor(response, dtype=torch.long)
        attention_mask[row, prompt_start:response_end] = 1
        response_mask[row, : len(response)] = 1.0
    # Positions count real tokens only, so left padding does not shift them.
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # [B, L]
    return PackedBatch(input_ids, attention_mask, position_ids, prompt_width, response_mask)


@dataclass
class SharedPrefixBatch:
    """Each distinct prompt once, left-padded to width P, and every row's right-padded response.

    Rows that share a prompt (the G samples of one problem) share its forward pass: the decoder runs
    over the U distinct prompts once, their KV cache is indexed out to the B rows, and the responses
    run on top of it (`response_hidden_states`): the hidden states of the `pack`
    layout, computed without repeating the prompt.

    prefix_ids, prefix_attention_mask, prefix_position_ids: [U, P] long, laid out as `pack` lays out
    prompts. prefix_of_row: [B] long, the prompt of each row. response_ids: [B, T] long, padded with
    pad_id. response_mask: [B, T] float, 1.0 on real response tokens (EOS included, even when
    pad == EOS).
    """

    prefix_ids: torch.Tensor
    prefix_attention_mask: torch.Tensor
    prefix_position_ids: torch.Tensor
    prefix_of_row: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor

    @property
    def prompt_width(self) -> int:
        """P, the width of the left-padded prompts; response token t sits at column P + t."""
        return self.prefix_ids.shape[1]

    def row_attention_mask(self) -> torch.Tensor:
        """Each row's prompt mask followed by its response mask, [B, P + T] long (as `pack` makes it)."""
        prompt_mask = self.prefix_attention_mask[self.prefix_of_row]  # [B, P]
        return torch.cat([prompt_mask, self.response_mask.to(prompt_mask.dtype)], dim=1)  # [B, P+T]

    def response_position_ids(self) -> torch.Tensor:
        """Positions of the response columns, [B, T] long: counting each row's real tokens, as in `pack`."""
        prompt_lengths = self.prefix_attention_mask.sum(dim=1)[self.prefix_of_row]  # [B]
        real_tokens = prompt_lengths[:, None] + self.response_mask.long().cumsum(dim=1)  # [B, T]
        return (real_tokens - 1).clamp(min=0)  # [B, T]

    def to(self, device: torch.device | str) -> SharedPrefixBatch:
        """The same batch with every tensor on `device`."""
        return SharedPrefixBatch(
            prefix_ids=self.prefix_ids.to(device),
            prefix_attention_mask=self.prefix_attention_mask.to(device),
            prefix_position_ids=self.prefix_position_ids.to(device),
            prefix_of_row=self.prefix_of_row.to(device),
            response_ids=self.response_ids.to(device),
            response_mask=self.response_mask.to(device),
        )


def pack_shared(
    prompt_ids: list[list[int]], response_ids: list[list[int]], *, pad_id: int, min_response_width: int = 0
) -> SharedPrefixBatch:
    """Like `pack`, with each distinct prompt kept once: rows whose prompt token lists are identical
    share it, wherever they sit in the batch. Rows with prompts of their own (the sibling teacher
    template) simply share nothing.

    min_response_width: pad the responses to at least this many columns (masked). With 2, the forward pass
    always makes its two decoder calls (prompts, then responses), even when every response is one token:
    sharded processes must all make the same collectives (`distributed.strategy: fsdp2`).
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    if not prompt_ids:
        raise ValueError("cannot pack an empty batch")
    index_of_prompt: dict[tuple[int, ...], int] = {}
    prefix_of_row = [index_of_prompt.setdefault(tuple(prompt), len(index_of_prompt)) for prompt in prompt_ids]
    distinct = [list(prompt) for prompt in index_of_prompt]  # [U] in order of first appearance
    # The distinct prompts with empty responses: `pack` lays out (and checks) the prompt block.
    prompts = pack(distinct, [[] for _ in distinct], pad_id=pad_id)
    response_length = max(min_response_width, *(len(response) for response in response_ids))
    responses = torch.full((len(response_ids), response_length), pad_id, dtype=torch.long)  # [B, T]
    response_mask = torch.zeros((len(response_ids), response_length), dtype=torch.float32)  # [B, T]
    for row, response in enumerate(response_ids):
        responses[row, : len(response)] = torch.tensor(response, dtype=torch.long)
        response_mask[row, : len(response)] = 1.0
    return SharedPrefixBatch(
        prefix_ids=prompts.input_ids,
        prefix_attention_mask=prompts.attention_mask,
        prefix_position_ids=prompts.position_ids,
        prefix_of_row=torch.tensor(prefix_of_row, dtype=torch.long),
        response_ids=responses,
        response_mask=response_mask,
    )


# --------------------------------------------------------------------------------------------
# KV-cache checks


def cache_keyword(model: torch.nn.Module) -> str | None:
    """The keyword under which `model.forward` takes a KV cache: `cache` (transformers 5.x, where
    `past_key_values` is deprecated) or `past_key_values` (before), None if it takes neither. A peft
    wrapper is looked through to the model it wraps."""
    base = base_model(model)
    parameters = inspect.signature(type(base).forward).parameters  # the class's: hooks may wrap the instance's
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def full_attention_cache(cache: Any) -> bool:
    """Whether every layer of a transformers KV cache is a full-attention one (no sliding window, no hybrid
    state), so that a prompt's keys and values can be computed once and copied to several rows."""
    from transformers.cache_utils import DynamicLayer, StaticLayer

    return all(type(layer) in (StaticLayer, DynamicLayer) for layer in cache.layers)


def shared_prefix_blocker(model: torch.nn.Module, *, backward: bool) -> str | None:
    """Why `response_hidden_states` cannot run a `SharedPrefixBatch` through `model`, or None if it can.

    backward: the forward pass will be differentiated (the student's); transformers then drops the KV
    cache of gradient-checkpointed layers, so checkpointing blocks the shared path for the student
    only (the teacher runs without gradient, and there the cache is kept).
    """
    from transformers import DynamicCache

    decoder = model.get_decoder()
    if cache_keyword(decoder) is None:
        return f"{type(decoder).__name__}.forward takes no KV cache"
    if "inputs_embeds" not in inspect.signature(type(decoder).forward).parameters:
        return f"{type(decoder).__name__}.forward takes no inputs_embeds"
    if backward and any(getattr(module, "gradient_checkpointing", False) for module in decoder.modules()):
        return "gradient checkpointing is on, and transformers turns the KV cache off under it in training"
    cache = DynamicCache(config=decoder.config)
    if not full_attention_cache(cache):
        layer_types = sorted({type(layer).__name__ for layer in cache.layers})
        return f"the model's cache has {layer_types} layers; the shared prefix needs full-attention layers"
    return None


# --------------------------------------------------------------------------------------------
# Hidden states at the response positions


def response_hidden_states(model: torch.nn.Module, batch: PackedBatch | SharedPrefixBatch) -> Tensor:
    """Final (normalized) hidden states at the positions that predict each response token, `[B,T,d]`."""
    if isinstance(batch, SharedPrefixBatch):
        return _shared_prefix_hidden_states(model, batch)
    decoder = model.get_decoder()
    out = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                  use_cache=False)
    hidden = out.last_hidden_state  # [B,L,d]
    start = batch.prompt_width - 1
    return hidden[:, start : start + batch.response_mask.shape[1]]  # [B,T,d]


def _shared_prefix_hidden_states(model: torch.nn.Module, batch: SharedPrefixBatch) -> Tensor:
    """`response_hidden_states` of the batch `pack` would make, with each distinct prompt run once.

    1. The U prompts through the decoder, filling a KV cache; the last prompt column predicts
       response token 0. 2. The cache indexed out to the B rows (differentiable). 3. Response tokens
       0..T-2 on top of it, with each row's prompt mask and positions continuing after its prompt;
       column t predicts response token t + 1.
    """
    from transformers import DynamicCache

    blocker = shared_prefix_blocker(model, backward=torch.is_grad_enabled() and model.training)
    if blocker is not None:
        raise RuntimeError(f"the shared-prefix forward cannot run: {blocker}; pack the batch with `pack` instead")
    decoder = model.get_decoder()
    cache_argument = cache_keyword(decoder)
    prompt_width, response_length = batch.prompt_width, batch.response_ids.shape[1]
    body = response_length - 1  # response tokens 0..T-2 predict tokens 1..T-1
    # One embedding lookup for the prompts and the responses, so the backward pass forms one dense [V,d]
    # embedding gradient, not one per decoder call.
    U, B = batch.prefix_ids.shape[0], batch.response_ids.shape[0]
    embeds = decoder.get_input_embeddings()(
        torch.cat([batch.prefix_ids.reshape(-1), batch.response_ids[:, : max(body, 0)].reshape(-1)])
    )  # [U·P + B·(T-1), d]
    prefix_embeds = embeds[: U * prompt_width].view(U, prompt_width, -1)  # [U,P,d]
    cache = DynamicCache(config=decoder.config)
    prefix = decoder(inputs_embeds=prefix_embeds, attention_mask=batch.prefix_attention_mask,
                     position_ids=batch.prefix_position_ids, use_cache=True, **{cache_argument: cache})
    if cache.get_seq_length() != prompt_width:  # a decoder that ignored the cache: refuse, never guess
        raise RuntimeError(f"the decoder cached {cache.get_seq_length()} of {prompt_width} prompt columns")
    first = prefix.last_hidden_state[:, -1].index_select(0, batch.prefix_of_row)  # [B,d], predicts token 0
    if response_length <= 1:
        return first[:, None][:, :response_length]  # [B,T,d]
    # The cache out to the rows with index_select, not `cache.batch_select_indices` (advanced indexing): on
    # the CPU the backward of index_select (index_add_) sums a prompt's rows in a fixed order, while that of
    # advanced indexing did not always, and a resumed run must repeat the original bit for bit.
    for layer in cache.layers:  # DynamicLayer each (shared_prefix_blocker)
        layer.keys = layer.keys.index_select(0, batch.prefix_of_row)  # [U,h,P,k] -> [B,h,P,k]
        layer.values = layer.values.index_select(0, batch.prefix_of_row)  # [U,h,P,k] -> [B,h,P,k]
    out = decoder(inputs_embeds=embeds[U * prompt_width :].view(B, body, -1),  # [B,T-1,d]
                  attention_mask=batch.row_attention_mask()[:, : prompt_width + body],  # [B,P+T-1]
                  position_ids=batch.response_position_ids()[:, :body],  # [B,T-1]
                  use_cache=True, **{cache_argument: cache})
    return torch.cat([first[:, None], out.last_hidden_state], dim=1)  # [B,T,d]


# --------------------------------------------------------------------------------------------
# The model behind a wrapper, and its output layer


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model itself: a peft wrapper is looked through to the model it wraps."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def output_weight(model: torch.nn.Module) -> Tensor:
    """The output layer's weight, `[V,d]`: logits are `h @ W.T` (`check_output_layer`)."""
    return model.get_output_embeddings().weight  # [V,d]


def check_output_layer(model: torch.nn.Module, *, probe: bool = True) -> None:
    """The fused statistics need plain `logits = h @ W.T`; refuse heads that do more.

    Known attributes (a bias, soft-capping, Granite's `logits_scaling`, ...) are refused by name; any other
    change the model's forward makes to the logits is found by one probe forward of a few tokens, comparing
    the model's logits with `h @ W.T` of its decoder's hidden states. Training log-probs that differ from the
    distribution the rollouts were sampled from would make every update off-policy without a word.
    probe: False skips the probe forward (the named checks only), for weights another engine has already
    partitioned (DeepSpeed ZeRO-3), where a plain forward cannot run.
    """
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise NotImplementedError("an output layer with a bias is not supported by the fused token statistics")
    config = model.config
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"):
        if getattr(config, attr, None) not in (None, 1, 1.0):
            raise NotImplementedError(f"models with {attr}={getattr(config, attr)} are not supported yet: the fused "
                                      "token statistics compute logits = h @ W.T, and this model scales them")
    if not probe:
        return
    weight = head.weight  # [V,d]
    ids = torch.arange(1, 5, device=weight.device)[None] % weight.shape[0]  # [1,4]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()  # [1,4,V]
            hidden = model.get_decoder()(input_ids=ids).last_hidden_state  # [1,4,d]
            plain = (hidden @ weight.T.to(hidden.dtype)).float()  # [1,4,V]
    finally:
        model.train(was_training)
    gap = float((logits - plain).abs().max())
    scale = float(plain.abs().max()) or 1.0
    if gap > 1e-2 * scale + 1e-4:
        raise NotImplementedError(
            f"{type(model).__name__}'s logits differ from h @ W.T of its last hidden states (max gap {gap:.3g} at "
            f"logits up to {scale:.3g}): its output head scales, caps or shifts them, which the fused token "
            "statistics do not; training log-probs would differ from the distribution the rollouts came from")
