"""Rollouts with vLLM (GPU), an optional backend: ``pip install selfdistill[vllm]``.

UNTESTED HERE: the machines this library is developed and tested on have no GPU, so this module was
written against vLLM's documented offline API (``LLM``, ``SamplingParams``, ``TokensPrompt``,
``LoRARequest``, ``RequestOutput.outputs[i].token_ids / finish_reason / stop_reason``) and has never
been run. Check it on your GPU before relying on it (e.g. compare a small eval against backend "hf").

Sampling semantics match `HFBackend`: ``softmax(logits / temperature)`` with the top-p cut and nothing
else (top-k off, no penalties), temperature 0 for greedy, at most ``max_new_tokens`` tokens, stop at
the first EOS id (the tokenizer's and the model generation config's), which stays inside the response.
Texts are decoded with the same tokenizer and ``skip_special_tokens=True``. Token entropies are not
available (vLLM returns only top-k log-probabilities), so ``Rollouts.token_entropy`` stays None.

Seeds: vLLM seeds each request on its own, so ``generate`` takes one seed per prompt (or one int
shared by all prompts), and a prompt's samples do not depend on what else is in the batch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from selfdistill.rollout import Rollouts, assemble_rollouts, check_generate_args, eos_token_ids

INSTALL_HINT = "pip install selfdistill[vllm]  (GPU only; use backend 'hf' on CPU)"


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as err:
        raise ImportError(f"the 'vllm' rollout backend needs vLLM, which is not installed: {INSTALL_HINT}") from err
    return vllm


def _adapter_rank(adapter: Path) -> int:
    """The LoRA rank ``r`` from a peft adapter folder's adapter_config.json."""
    config_path = adapter / "adapter_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{adapter} is not a peft adapter folder (no adapter_config.json)")
    return int(json.loads(config_path.read_text())["r"])


class VLLMBackend:
    """Generate rollouts with a ``vllm.LLM``.

    model: a local Hugging Face model folder (an ``LLM`` is created on it) or an existing ``vllm.LLM``.
    tokenizer: the model's tokenizer, used for the EOS ids and to decode the responses.
    adapter: a peft LoRA adapter folder applied to every request (vLLM's LoRA support; the engine
        is created with ``enable_lora=True`` and the adapter's rank).
    llm_kwargs: further ``vllm.LLM`` arguments when the engine is created here (e.g. ``dtype``,
        ``gpu_memory_utilization``, ``max_model_len``, ``tensor_parallel_size``).
    """

    # The runner may hand many prompts to one call, each with its own seed.
    per_prompt_seeds = True

    def __init__(self, model: Any, tokenizer: Any, *, adapter: str | Path | None = None, **llm_kwargs: Any) -> None:
        vllm = _import_vllm()
        if not isinstance(model, (str, Path)) and llm_kwargs:
            raise ValueError(
                f"llm_kwargs {sorted(llm_kwargs)} only apply when the backend creates the vllm.LLM from a folder"
            )
        self.tokenizer = tokenizer
        self.eos_ids = eos_token_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.lora_request = None
        if adapter is not None:
            from vllm.lora.request import LoRARequest

            adapter = Path(adapter)
            llm_kwargs.setdefault("enable_lora", True)
            llm_kwargs.setdefault("max_lora_rank", _adapter_rank(adapter))
            self.lora_request = LoRARequest(lora_name="adapter", lora_int_id=1, lora_path=str(adapter))
        if isinstance(model, (str, Path)):
            self.llm = vllm.LLM(model=str(model), tokenizer=str(model), **llm_kwargs)
        elif isinstance(model, vllm.LLM):  # made by the caller (with enable_lora=True for an adapter)
            self.llm = model
        else:
            raise TypeError(
                f"the vLLM backend takes a model folder or a vllm.LLM, not a {type(model).__name__}; it cannot "
                "generate from an in-memory transformers model (no weight sync for training rollouts)"
            )
        # The model folder's generation config may name more EOS ids than the tokenizer.
        try:
            config_eos = self.llm.llm_engine.get_model_config().hf_config.eos_token_id
        except AttributeError:  # an engine layout this code does not know: the tokenizer's ids stand
            config_eos = None
        for token_id in config_eos if isinstance(config_eos, (list, tuple)) else [config_eos]:
            if token_id is not None and int(token_id) not in self.eos_ids:
                self.eos_ids.append(int(token_id))

    def _sampling_params(
        self, *, num_samples: int, temperature: float, top_p: float, max_new_tokens: int, seed: int | None
    ) -> Any:
        from vllm import SamplingParams

        # top_k is left at its default, which means "off" in every vLLM version (-1 before, 0 since).
        return SamplingParams(
            n=num_samples,
            temperature=temperature,
            top_p=top_p if temperature > 0 else 1.0,
            max_tokens=max_new_tokens,
            seed=seed,
            stop_token_ids=list(self.eos_ids),
            repetition_penalty=1.0,
            presence_penalty=0.0,
            frequency_penalty=0.0,
            min_p=0.0,
            skip_special_tokens=True,
        )

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

        seed: one int for every prompt, one int per prompt, or None (vLLM's own randomness).
        """
        seed = check_generate_args(prompt_ids, num_samples=num_samples, temperature=temperature, top_p=top_p,
                                   max_new_tokens=max_new_tokens, seed=seed)
        seeds: list[int | None] = [seed] * len(prompt_ids) if seed is None or isinstance(seed, int) else seed
        from vllm.inputs import TokensPrompt

        # Greedy decoding gives the same response every time, and some vLLM versions refuse n > 1
        # without sampling: ask for one and repeat it.
        requested = num_samples if temperature > 0 else 1
        params = [
            self._sampling_params(
                num_samples=requested, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=s
            )
            for s in seeds
        ]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids],
            sampling_params=params,
            use_tqdm=False,
            lora_request=self.lora_request,
        )
        if len(outputs) != len(prompt_ids):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompt_ids)} prompts")

        rows: list[int] = []
        generated: list[list[int]] = []
        for p, request_output in enumerate(outputs):  # vLLM keeps the order of the prompts
            completions = sorted(request_output.outputs, key=lambda c: c.index)
            if len(completions) != requested:
                raise RuntimeError(f"vLLM returned {len(completions)} samples for prompt {p}, expected {requested}")
            completions = completions * (num_samples // requested)
            for completion in completions:
                rows.append(p)
                generated.append(self._response_tokens(completion))

        return assemble_rollouts(generated, rows, prompt_ids, tokenizer=self.tokenizer, eos_ids=self.eos_ids,
                                 pad_id=self.pad_id)

    def _response_tokens(self, completion: Any) -> list[int]:
        """A completion's token ids with its stopping EOS token in place.

        vLLM reports finish_reason "stop" with stop_reason None for the model's EOS and stop_reason =
        the token id for a ``stop_token_ids`` match; versions differ in whether that token is in
        ``token_ids``, so it is appended when missing (the EOS belongs to the response).
        """
        ids = [int(t) for t in completion.token_ids]
        if completion.finish_reason == "stop" and (not ids or ids[-1] not in self.eos_ids):
            stop = completion.stop_reason
            ids.append(int(stop) if isinstance(stop, int) and stop in self.eos_ids else self.eos_ids[0])
        return ids


__all__ = ["VLLMBackend"]
