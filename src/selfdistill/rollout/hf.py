"""Rollouts from a transformers causal LM: batched, left-padded, KV cache, CPU or GPU.

Decoding is a plain loop over the model's forward pass, one token per step for every row (not
``model.generate``, whose per-step machinery costs as much as a small model's forward pass; bench/
generation.py measures it). The KV cache is preallocated (``StaticCache``: no copy of the cache per
token) when the architecture supports it and the cache for ``rows x (prompt + max_new_tokens)``
positions fits in ``STATIC_CACHE_BYTES``; otherwise it grows (``DynamicCache``). A preallocated cache's
length is rounded up to a multiple of 64, so calls with nearby prompt widths have the same step shapes. Rows
that emitted EOS are filled with the pad token until every row is done or ``max_new_tokens`` is reached.
The one-token step is the model's eager forward pass or that pass compiled (``decode``; see
`selfdistill.rollout.decode_step`); the prefill is always eager.

The prompt is prefilled once per distinct prompt: the samples of a prompt are rows with the same prompt
tokens, so its keys and values are computed for one row and copied to the others (when every cache
layer is a full-attention one; a sliding-window or hybrid cache prefills every row). With SDPA
attention each one-token step passes its row of the attention mask as a 4D boolean mask, which
transformers uses as it is instead of building a causal mask every step.

Sampling draws from ``softmax(logits / temperature)`` restricted to the top-p nucleus and nothing
else: the model's own generation defaults (top_k, repetition penalty, ...) are not applied, because
the training objectives score the responses under exactly that distribution. Temperature 0 decodes
greedily.

Seeds. With a seed (one int, or one per prompt) every row draws its tokens from its own random
stream, seeded by (prompt seed, sample index): a prompt's samples are the same whichever other
prompts share the batch, and however the rows are cut into batches (up to floating-point
differences of the batched forward pass). So the trainer and the evaluation put many prompts into one
batch and stay reproducible per prompt. The draw is by inverse CDF: one uniform number from the row's
stream per step (all of a call's steps drawn up front), located in the row's cumulative
``softmax(logits / T)``. With ``seed=None`` sampling uses
``torch.multinomial`` and the global RNG.

With ``return_entropy=True`` the backend also records, at every generated token, the entropy of
``softmax(logits / temperature)`` (before top-p's cut; plain ``softmax(logits)`` for greedy decoding),
one float per row and step, so memory stays O(rows x steps) rather than the O(rows x steps x vocabulary)
of keeping the logits.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from transformers import DynamicCache, StaticCache

from selfdistill.forward import base_model, cache_keyword, full_attention_cache
from selfdistill.rollout import Rollouts, assemble_rollouts, check_generate_args, eos_token_ids
from selfdistill.rollout.decode_step import CACHE_LENGTH_MULTIPLE, DecodeStep, StepForward, eager_step

# The most bytes a preallocated KV cache may take; above it the cache grows with the tokens decoded.
STATIC_CACHE_BYTES = 1 << 30

TokenChooser = Callable[[torch.Tensor], torch.Tensor]
"""Maps a batch's next-token logits `[b, V]` float32 to the chosen token ids `[b]`."""


@contextlib.contextmanager
def _generation_state(model: Any, seed: int | None) -> Iterator[None]:
    """Eval mode, no autograd and (with a seed) a private RNG stream for the duration of the block; the
    model's mode and the global RNG are restored."""
    was_training = model.training
    device = next(model.parameters()).device
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    try:
        model.eval()
        with torch.random.fork_rng(devices=rng_devices, enabled=seed is not None), torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            yield
    finally:
        model.train(was_training)


def row_seed(prompt_seed: int, sample: int) -> int:
    """The random stream of one row: a stable 63-bit hash of (prompt seed, sample index)."""
    digest = hashlib.sha256(f"{prompt_seed}\x00{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def nucleus_mask(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """True for the tokens outside the top-p nucleus of ``softmax(logits)`` [b, V]; the most likely
    token is always kept. Same rule as transformers' top-p warper."""
    sorted_logits, order = torch.sort(logits, dim=-1)  # ascending, [b, V]
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [b, V]
    remove_sorted = cumulative <= 1.0 - top_p  # [b, V]
    remove_sorted[:, -1] = False
    return remove_sorted.scatter(1, order, remove_sorted)  # back to vocabulary order


class _RowSampler:
    """Draws each row's next token from ``softmax(logits / temperature)`` (top-p nucleus) with the row's
    own generator. Rows are the rows of the batch, in order.

    Inverse-CDF sampling: one uniform number per row and step from the row's generator, located in the
    row's cumulative distribution; the softmax and the search run on the whole batch at once. The
    uniform numbers of all `steps` are drawn up front, one call per row rather than one per row and step.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float, device: torch.device,
                 steps: int) -> None:
        self.uniforms = torch.stack([
            torch.rand(steps, generator=torch.Generator(device=device).manual_seed(s), device=device,
                       dtype=torch.float64)
            for s in seeds
        ], dim=1)  # [steps, b]
        self.step = 0
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.step == self.uniforms.shape[0]:
            raise RuntimeError(f"the row sampler was made for {self.step} steps")
        probs = _sampling_probs(logits, self.temperature, self.top_p)  # [b, V]
        cdf = probs.double().cumsum_(dim=-1)  # [b, V], in place: one float64 buffer
        uniform = self.uniforms[self.step]  # [b]
        self.step += 1
        target = (uniform * cdf[:, -1])[:, None]  # [b, 1], in [0, total)
        drawn = torch.searchsorted(cdf, target, right=True).clamp_(max=probs.shape[-1] - 1)  # [b, 1]
        # Rounding can land past the last token with probability: take the most likely token then (rare, so the
        # arg-max over the vocabulary is computed only when it happens).
        has_probability = probs.gather(1, drawn) > 0  # [b, 1]
        if not bool(has_probability.all()):
            drawn = torch.where(has_probability, drawn, probs.argmax(dim=-1, keepdim=True))  # [b, 1]
        return drawn.squeeze(1)  # [b]


def _sampling_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """``softmax(logits / temperature)`` restricted to the top-p nucleus and renormalized, `[b, V]`."""
    scaled = logits if temperature == 1.0 else logits / temperature  # [b, V]
    if top_p < 1.0:
        scaled = scaled.masked_fill(nucleus_mask(scaled, top_p), float("-inf"))
    return scaled.softmax(dim=-1)


def _choose_greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)  # [b]


def _global_rng_sampler(temperature: float, top_p: float) -> TokenChooser:
    """Sampling with the global RNG (``seed=None``)."""
    return lambda logits: torch.multinomial(_sampling_probs(logits, temperature, top_p), 1).squeeze(1)  # [b]


def _entropy(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """Entropy of ``softmax(logits * scale)`` per row, `[b]`; entr(0) = 0, so -inf logits are safe."""
    return torch.special.entr(torch.softmax(logits * scale, dim=-1)).sum(dim=-1)


class HFBackend:
    """Sample rollouts from a transformers causal LM (or a peft model wrapping one).

    batch_size: the most sequences (prompt x sample rows) decoded together; None puts all rows in one
    batch. When set, rows are sorted by prompt length before being cut into batches (less padding),
    and put back in prompt-major order afterwards. Seeded and greedy outputs do not depend on the
    batching; with ``seed=None`` they do.

    return_entropy: also fill ``Rollouts.token_entropy`` (see the module docstring); off by default
    so training rollouts do not pay for it.

    min_new_tokens: EOS cannot be drawn before this many new tokens (0: any time). Benchmarks use it to
    fix the response length.

    decode: the one-token step, ``auto``, ``compiled`` or ``eager`` (`selfdistill.rollout.decode_step`).
    """

    def __init__(
        self, model: Any, tokenizer: Any, *, batch_size: int | None = None, return_entropy: bool = False,
        min_new_tokens: int = 0, decode: str = "auto",
    ) -> None:
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
        if min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be >= 0, got {min_new_tokens}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.return_entropy = return_entropy
        self.min_new_tokens = min_new_tokens
        self.step = DecodeStep(decode)
        self.eos_ids = eos_token_ids(tokenizer, model)
        self._cache_keyword = cache_keyword(model)
        if self._cache_keyword is None:
            raise TypeError(f"{type(model).__name__}.forward takes no KV cache (neither `cache` nor `past_key_values`)")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]

    # Samples of a prompt depend only on its own seed: callers may put many prompts into one call.
    per_prompt_seeds = True

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
        """Sample `num_samples` responses per prompt; rows are prompt-major (see `Rollouts`).

        seed: one int for every prompt, one int per prompt, or None (the global RNG).
        """
        seed = check_generate_args(prompt_ids, num_samples=num_samples, temperature=temperature, top_p=top_p,
                                   max_new_tokens=max_new_tokens, seed=seed)
        rows = [p for p in range(len(prompt_ids)) for _ in range(num_samples)]  # prompt-major
        # Row r's random stream (seeded sampling): prompt seed and sample index.
        streams = None
        if seed is not None and temperature > 0:
            prompt_seeds = [seed] * len(prompt_ids) if isinstance(seed, int) else seed
            streams = [row_seed(prompt_seeds[p], r - p * num_samples) for r, p in enumerate(rows)]
        order = list(range(len(rows)))
        if self.batch_size is not None:
            order.sort(key=lambda r: len(prompt_ids[rows[r]]))  # stable: samples of a prompt stay together
        step = self.batch_size or len(rows)
        # Greedy decoding reports the entropy of the model's own distribution.
        entropy_scale = 1.0 / temperature if temperature > 0 else 1.0

        generated: list[torch.Tensor] = [torch.empty(0)] * len(rows)  # row -> [T_row] new tokens
        step_entropy: list[torch.Tensor] = [torch.empty(0)] * len(rows)  # row -> [T_row] entropies
        # The global RNG is seeded only for unseeded-stream sampling with one seed; greedy decoding draws nothing
        # (and a list of per-prompt seeds is not one seed).
        global_seed = seed if streams is None and isinstance(seed, int) else None
        with _generation_state(self.model, global_seed):
            for start in range(0, len(order), step):
                batch = order[start : start + step]
                if temperature == 0:
                    choose = _choose_greedy
                elif streams is not None:
                    choose = _RowSampler([streams[r] for r in batch], temperature, top_p, self._device(),
                                         steps=max_new_tokens)
                else:
                    choose = _global_rng_sampler(temperature, top_p)
                new_tokens, entropy = self._decode(
                    [prompt_ids[rows[r]] for r in batch], choose, max_new_tokens=max_new_tokens,
                    entropy_scale=entropy_scale if self.return_entropy else None,
                )  # [b, T_b]
                for i, r in enumerate(batch):
                    generated[r] = new_tokens[i]
                    if entropy is not None:
                        step_entropy[r] = entropy[i]

        # Outside inference mode from here on, so the tensors can feed a training forward pass.
        return assemble_rollouts(generated, rows, prompt_ids, tokenizer=self.tokenizer, eos_ids=self.eos_ids,
                                 pad_id=self.pad_id, step_entropy=step_entropy if self.return_entropy else None)

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _cache(self, rows: int, length: int) -> StaticCache | DynamicCache:
        """A preallocated KV cache for `rows` x `length` positions (rounded up to CACHE_LENGTH_MULTIPLE) when the
        model supports one and it fits in STATIC_CACHE_BYTES, else a growing one."""
        base = base_model(self.model)
        config = base.config.get_text_config()
        length = _static_length(length)
        size = _kv_cache_bytes(config, rows, length, next(self.model.parameters()).element_size())
        if getattr(base, "_can_compile_fullgraph", False) and size is not None and size <= STATIC_CACHE_BYTES:
            return StaticCache(config=base.config, max_cache_len=length)
        return DynamicCache(config=base.config)

    def _prefill(
        self, prompts: list[list[int]], input_ids: torch.Tensor, attention_mask: torch.Tensor,
        positions: torch.Tensor, cache: StaticCache | DynamicCache,
    ) -> torch.Tensor:
        """Run the left-padded prompts `[b, P]` into `cache`; returns the logits that predict the first new
        token `[b, V]`. The samples of one prompt share its rows' prefix: each distinct prompt runs once and
        its keys and values are copied to its rows (when every cache layer is a full-attention one)."""
        width = input_ids.shape[1]
        device = input_ids.device
        distinct: dict[tuple[int, ...], int] = {}
        prompt_of_row = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]  # [b], in first-seen order
        first_rows = [prompt_of_row.index(u) for u in range(len(distinct))]  # [U] the first row of each
        static = isinstance(cache, StaticCache)
        prefix_cache = None if len(distinct) == len(prompts) else DynamicCache(config=base_model(self.model).config)
        if prefix_cache is None or not (full_attention_cache(cache) and full_attention_cache(prefix_cache)):
            prompt_mask = attention_mask if static else attention_mask[:, :width]  # [b, P + T] or [b, P]
            out = self.model(input_ids=input_ids, attention_mask=prompt_mask,
                             position_ids=positions, use_cache=True, **{self._cache_keyword: cache},
                             cache_position=torch.arange(width, device=device), logits_to_keep=1)
            return out.logits[:, -1]  # [b, V]
        rows = torch.tensor(first_rows, device=device)  # [U] one row of each distinct prompt
        out = self.model(input_ids=input_ids[rows], attention_mask=attention_mask[rows, :width],
                         position_ids=positions[rows], use_cache=True, **{self._cache_keyword: prefix_cache},
                         cache_position=torch.arange(width, device=device), logits_to_keep=1)
        to_rows = torch.tensor(prompt_of_row, device=device)  # [b]
        for index, layer in enumerate(prefix_cache.layers):
            cache.update(layer.keys.index_select(0, to_rows), layer.values.index_select(0, to_rows), index)
        return out.logits[:, -1].index_select(0, to_rows)  # [U, V] -> [b, V]

    def _step(
        self, step_forward: StepForward, inputs: dict[str, Any], device: torch.device, static: bool,
    ) -> tuple[torch.Tensor, StepForward]:
        """One decoding step: the next-token logits `[b, V]` and the step function for the next one. A compiled step
        that fails (at compile time, or on a new shape) is turned off and the step rerun eagerly: it writes the same
        cache column again, from the same inputs."""
        try:
            return step_forward(self.model, **inputs), step_forward  # [b, V]
        except Exception as error:
            if step_forward is eager_step:
                raise
            self.step.failed(error)
            step_forward = self.step.for_call(device, static)
            return step_forward(self.model, **inputs), step_forward  # [b, V]

    def _decode(
        self, prompts: list[list[int]], choose: TokenChooser, *, max_new_tokens: int, entropy_scale: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Left-pad `prompts` and decode up to `max_new_tokens` tokens for each; returns the new tokens
        `[b, T_b]` (pad after a row's EOS) and, when `entropy_scale` is given, the entropy of
        ``softmax(logits * entropy_scale)`` at each of them `[b, T_b]` (else None)."""
        device = self._device()
        b, width = len(prompts), max(len(p) for p in prompts)
        cache = self._cache(b, width + max_new_tokens)
        # A preallocated cache takes the whole mask (zeros past the current token): the same shapes every step.
        static = isinstance(cache, StaticCache)
        columns = _static_length(width + max_new_tokens) if static else width + max_new_tokens
        input_ids = torch.full((b, width), self.pad_id, dtype=torch.long)  # [b, P]
        attention_mask = torch.zeros((b, columns), dtype=torch.long)  # [b, K]: K = cache length or P + T
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            attention_mask[i, width - len(p) : width] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        positions = (attention_mask[:, :width].cumsum(dim=1) - 1).clamp(min=0)  # [b, P]; padding does not count
        eos = torch.tensor(self.eos_ids, dtype=torch.long, device=device)
        # A one-token step attends to exactly the columns its mask row holds, so with SDPA the step's 4D mask is
        # that row as booleans, which transformers takes as it is instead of building one every step; it is kept
        # up to date in place.
        step_mask_4d = getattr(base_model(self.model).config, "_attn_implementation", None) == "sdpa"
        step_mask = attention_mask.bool()[:, None, None, :] if step_mask_4d else attention_mask  # [b, 1, 1, K] | [b, K]
        cache_positions = torch.arange(width, width + max_new_tokens, device=device)  # [T]
        step_forward = self.step.for_call(device, static)

        logits = self._prefill(prompts, input_ids, attention_mask, positions, cache)  # [b, V]
        next_position = positions[:, -1:] + 1  # [b, 1]
        finished = torch.zeros(b, dtype=torch.bool, device=device)  # [b]
        tokens: list[torch.Tensor] = []  # one [b] per step
        entropies: list[torch.Tensor] = []  # one [b] per step
        for step in range(max_new_tokens):
            logits = logits.float()  # [b, V]
            if step < self.min_new_tokens:
                logits[:, eos] = float("-inf")
            if entropy_scale is not None:
                entropies.append(_entropy(logits, entropy_scale))  # [b]
            token = torch.where(finished, self.pad_id, choose(logits))  # [b]
            tokens.append(token)
            finished |= torch.isin(token, eos)
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            column = width + step
            step_mask[..., column] = 1
            inputs = dict(input_ids=token[:, None],
                          attention_mask=step_mask if static else step_mask[..., : column + 1],  # [b, 1, 1, K']
                          position_ids=next_position, use_cache=True, cache_position=cache_positions[step : step + 1],
                          **{self._cache_keyword: cache})
            logits, step_forward = self._step(step_forward, inputs, device, static)  # [b, V]
            next_position = next_position + 1
        new_tokens = torch.stack(tokens, dim=1)  # [b, T_b]
        return new_tokens, torch.stack(entropies, dim=1) if entropy_scale is not None else None


def _static_length(length: int) -> int:
    """The length of a preallocated cache for `length` positions: rounded up to CACHE_LENGTH_MULTIPLE."""
    return -(-length // CACHE_LENGTH_MULTIPLE) * CACHE_LENGTH_MULTIPLE


def _kv_cache_bytes(config: Any, rows: int, length: int, element_size: int) -> int | None:
    """Bytes of keys and values for `rows` x `length` positions, or None when the config does not say."""
    try:
        layers, heads = config.num_hidden_layers, config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    except (AttributeError, TypeError):
        return None
    return 2 * layers * rows * kv_heads * length * head_dim * element_size
