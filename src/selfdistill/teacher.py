"""Teacher weights (frozen, live, EMA) and the forward pass that scores responses.

The teacher is the student's own architecture shown the privileged prompt. It always runs without
gradient. `frozen` under LoRA disables the adapter, so no second copy of the weights is held;
`frozen` with full fine-tuning keeps one copy of the initial weights; `live` uses the current
weights; `ema` keeps an exponential moving average of the student.

`response_hidden_states` takes either batch layout of `selfdistill.prompts`: a `PackedBatch` (every row
runs `prompt ⊕ response`) or a `SharedPrefixBatch` (each distinct prompt runs once, and the rows'
responses run on its KV cache). Both give the same hidden states and the same gradients;
`shared_prefix_blocker` says when the shared one cannot run.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterator

import torch
from torch import Tensor

from selfdistill.models import cache_keyword, full_attention_cache
from selfdistill.prompts import PackedBatch, SharedPrefixBatch


def check_output_layer(model: torch.nn.Module) -> None:
    """The fused statistics need plain `logits = h @ W.T`; refuse heads that do more.

    Known attributes (a bias, soft-capping, Granite's `logits_scaling`, ...) are refused by name; any other
    change the model's forward makes to the logits is found by one probe forward of a few tokens, comparing
    the model's logits with `h @ W.T` of its decoder's hidden states. Training log-probs that differ from the
    distribution the rollouts were sampled from would make every update off-policy without a word.
    """
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise NotImplementedError("an output layer with a bias is not supported by the fused token statistics")
    config = model.config
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"):
        if getattr(config, attr, None) not in (None, 1, 1.0):
            raise NotImplementedError(f"models with {attr}={getattr(config, attr)} are not supported yet: the fused "
                                      "token statistics compute logits = h @ W.T, and this model scales them")
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


def output_weight(model: torch.nn.Module) -> Tensor:
    return model.get_output_embeddings().weight  # [V,d]


class Teacher:
    """Runs the teacher forward pass over `teacher_prompt ⊕ response` without gradient."""

    def __init__(self, mode: str, student: torch.nn.Module, *, ema_decay: float = 0.99) -> None:
        if mode not in ("frozen", "live", "ema"):
            raise ValueError(f"unknown teacher mode {mode!r}; choose frozen, live or ema")
        self.mode = mode
        self.student = student
        self.ema_decay = ema_decay
        self.uses_adapter_switch = mode == "frozen" and hasattr(student, "disable_adapter")
        self.copy: torch.nn.Module | None = None
        if mode == "ema" or (mode == "frozen" and not self.uses_adapter_switch):
            self.copy = copy.deepcopy(student).eval()
            if mode == "ema":
                # The average accumulates in float32 whatever the student's dtype: with decay 0.99 a step moves
                # the teacher by 1 % of the student's change, far below bfloat16's resolution (8 bits).
                for t, s in zip(self.copy.parameters(), student.parameters(), strict=True):
                    if s.requires_grad and t.dtype != torch.float32:
                        t.data = t.data.float()
            self.copy.requires_grad_(False)

    @contextlib.contextmanager
    def _model(self) -> Iterator[torch.nn.Module]:
        if self.copy is not None:
            yield self.copy
        elif self.uses_adapter_switch:
            with self.student.disable_adapter():
                yield self.student
        else:
            yield self.student

    @torch.no_grad()
    def hidden_states(self, batch: PackedBatch | SharedPrefixBatch) -> tuple[Tensor, Tensor]:
        """(`[B,T,d]` teacher hidden states at the response positions, `[V,d]` teacher output weight)."""
        with self._model() as model:
            was_training = model.training
            model.eval()
            try:
                hidden = response_hidden_states(model, batch)
                weight = output_weight(model)
            finally:
                model.train(was_training)
        return hidden.detach(), weight.detach()

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: move the EMA teacher toward the student."""
        if self.mode != "ema":
            return
        for t, s in zip(self.copy.parameters(), self.student.parameters(), strict=True):
            if s.requires_grad:  # frozen weights (the base under LoRA) are equal in both and stay so
                t.lerp_(s.detach().to(t.dtype), 1.0 - self.ema_decay)

    def state_dict(self) -> dict[str, Tensor] | None:
        """Only the EMA teacher has state of its own (a frozen copy is rebuilt from the initial weights)."""
        return None if self.mode != "ema" else dict(self.copy.state_dict())

    def load_state_dict(self, state: dict[str, Tensor] | None) -> None:
        if self.mode == "ema":
            if state is None:
                raise ValueError("resuming an ema-teacher run needs teacher.safetensors in the checkpoint")
            self.copy.load_state_dict(state, strict=False)
