"""Rollouts with transformers ``generate``: batched, left-padded, KV cache, CPU or GPU.

Sampling draws from ``softmax(logits / temperature)`` restricted to the top-p nucleus and nothing
else: the model's own generation defaults (top_k, repetition penalty, ...) are not applied, because
the training objectives score the responses under exactly that distribution.

Seeds. With a seed (one int, or one per prompt) every row draws its tokens from its own random
stream, seeded by (prompt seed, sample index): a prompt's samples are the same whichever other
prompts share the ``generate`` call, and however the rows are cut into batches (up to floating-point
differences of the batched forward pass). So the trainer and the evaluation put many prompts into one
call and stay reproducible per prompt. The draw (inverse CDF: one uniform number from the row's stream,
located in the row's cumulative ``softmax(logits / T)``) happens in a logits processor that leaves only
the drawn token, under greedy decoding. With ``seed=None`` sampling uses
transformers' own sampler and the global RNG.

With ``return_entropy=True`` the backend also records, at every generated token, the entropy of
``softmax(logits / temperature)`` (before top-p's cut; plain ``softmax(logits)`` for greedy decoding),
one float per row and step, so memory stays O(rows x steps) rather than the O(rows x steps x vocabulary)
of keeping the logits with ``output_logits=True``.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from selfdistill.rollout import Rollouts, assemble_rollouts, eos_token_ids


@contextlib.contextmanager
def _generation_state(model: Any, seed: int | None) -> Iterator[None]:
    """Eval mode, no autograd, a clean generation config and (with a seed) a private RNG stream for the
    duration of the block; the model's mode, generation config and the global RNG are restored."""
    # A PEFT wrapper generates through its base transformers model, which holds the generation config.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    was_training, saved_config = model.training, base.generation_config
    device = next(model.parameters()).device
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    try:
        model.eval()
        # generate() fills every unset field from model.generation_config: start from a clean one.
        base.generation_config = GenerationConfig()
        with torch.random.fork_rng(devices=rng_devices, enabled=seed is not None), torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            yield
    finally:
        base.generation_config = saved_config
        model.train(was_training)


class _EntropyRecorder(LogitsProcessor):
    """Records the entropy of ``softmax(logits / temperature)`` at every generation step.

    ``generate`` runs the processors it is given before its sampling warpers (temperature, top-p), and
    the clean generation config activates no other processor, so the scores seen here are the raw
    logits (tests/test_eval.py checks the result against a forward pass). Returns them unchanged.
    """

    def __init__(self, temperature: float) -> None:
        self.scale = 1.0 / temperature if temperature > 0 else 1.0  # greedy: the model's own distribution
        self.steps: list[torch.Tensor] = []  # one [b] float tensor per generated token

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float() * self.scale, dim=-1)  # [b, V]
        self.steps.append(torch.special.entr(probs).sum(dim=-1))  # [b]; entr(0) = 0, so -inf logits are safe
        return scores


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


class _RowSampler(LogitsProcessor):
    """Draws each row's next token from ``softmax(logits / temperature)`` (top-p nucleus) with the row's
    own generator, and returns scores that are -inf everywhere but the drawn token, so greedy decoding
    emits it. Rows are the rows of the batch, in order.

    Inverse-CDF sampling: one uniform number per row from the row's generator, located in the row's
    cumulative distribution; the softmax and the search run on the whole batch at once.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float, device: torch.device) -> None:
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = scores.float() / self.temperature  # [b, V]
        if self.top_p < 1.0:
            logits = logits.masked_fill(nucleus_mask(logits, self.top_p), float("-inf"))
        probs = logits.softmax(dim=-1)  # [b, V]
        cdf = probs.double().cumsum(dim=-1)  # [b, V]
        uniform = torch.cat([torch.rand(1, generator=g, device=g.device, dtype=torch.float64)
                             for g in self.generators])  # [b]
        target = (uniform * cdf[:, -1])[:, None]  # [b, 1], in [0, total)
        drawn = torch.searchsorted(cdf, target, right=True).clamp_(max=probs.shape[-1] - 1)  # [b, 1]
        # Rounding can land past the last token with probability: take the most likely token then.
        drawn = torch.where(probs.gather(1, drawn) > 0, drawn, probs.argmax(dim=-1, keepdim=True))  # [b, 1]
        return torch.full_like(scores, float("-inf")).scatter_(1, drawn, 0.0)  # [b, V]


class HFBackend:
    """Generate rollouts with ``model.generate``.

    batch_size: the most sequences (prompt x sample rows) per ``generate`` call; None puts all rows in
    one call. When set, rows are sorted by prompt length before being cut into batches (less padding),
    and put back in prompt-major order afterwards. Seeded and greedy outputs do not depend on the
    batching; with ``seed=None`` they do.

    return_entropy: also fill ``Rollouts.token_entropy`` (see the module docstring); off by default
    so training rollouts do not pay for it.
    """

    def __init__(
        self, model: Any, tokenizer: Any, *, batch_size: int | None = None, return_entropy: bool = False
    ) -> None:
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.return_entropy = return_entropy
        self.eos_ids = eos_token_ids(tokenizer, model)
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
        if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise ValueError("prompt_ids must be a non-empty list of non-empty token-id lists")
        if num_samples < 1 or max_new_tokens < 1:
            raise ValueError(f"need num_samples >= 1 and max_new_tokens >= 1, got {num_samples}, {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")

        if seed is not None and not isinstance(seed, int):
            seed = [int(s) for s in seed]
            if len(seed) != len(prompt_ids):
                raise ValueError(f"got {len(seed)} seeds for {len(prompt_ids)} prompts")
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
        # Seeded sampling decodes greedily through `_RowSampler`; transformers samples only without a seed.
        config = self._config(temperature=0.0 if streams is not None else temperature, top_p=top_p,
                              max_new_tokens=max_new_tokens)

        generated: list[torch.Tensor] = [torch.empty(0)] * len(rows)  # row -> [T_row] new tokens
        step_entropy: list[torch.Tensor] = [torch.empty(0)] * len(rows)  # row -> [T_row] entropies
        with _generation_state(self.model, None if streams is not None else seed):
            for start in range(0, len(order), step):
                batch = order[start : start + step]
                sampler = None
                if streams is not None:
                    sampler = _RowSampler([streams[r] for r in batch], temperature, top_p, self._device())
                new_tokens, entropy = self._generate_batch(
                    [prompt_ids[rows[r]] for r in batch], config, temperature=temperature, sampler=sampler
                )  # [b, T_b]
                for i, r in enumerate(batch):
                    generated[r] = new_tokens[i]
                    if entropy is not None:
                        step_entropy[r] = entropy[i]

        # Outside inference mode from here on, so the tensors can feed a training forward pass.
        return assemble_rollouts(generated, rows, prompt_ids, tokenizer=self.tokenizer, eos_ids=self.eos_ids,
                                 pad_id=self.pad_id, step_entropy=step_entropy if self.return_entropy else None)

    def _config(self, *, temperature: float, top_p: float, max_new_tokens: int) -> GenerationConfig:
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            use_cache=True,
            num_beams=1,
            **(sampling if temperature > 0 else {"do_sample": False}),
        )

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _generate_batch(
        self, prompts: list[list[int]], config: GenerationConfig, *, temperature: float,
        sampler: _RowSampler | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Left-pad `prompts`, generate, and return only the new tokens [b, T_b], with their entropies
        [b, T_b] when return_entropy is set (else None). `sampler` draws the tokens when given."""
        device = self._device()
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)  # [b, P]
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)  # [b, P]
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            attention_mask[i, width - len(p) :] = 1
        recorder = _EntropyRecorder(temperature) if self.return_entropy else None
        processors = [x for x in (recorder, sampler) if x is not None]  # the recorder sees the raw logits
        out = self.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=config,
            logits_processor=LogitsProcessorList(processors),
        )  # [b, P + T_b]
        new_tokens = out[:, width:]  # [b, T_b]
        if recorder is None:
            return new_tokens, None
        entropy = torch.stack(recorder.steps, dim=1)  # [b, T_b]
        return new_tokens, entropy
