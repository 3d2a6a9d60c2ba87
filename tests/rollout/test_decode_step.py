"""The decoding step choice (`decode`: auto, compiled, eager): the compiled step samples the same tokens as the
eager one, and every way the compiled step can be unavailable falls back to the eager loop with one log line."""

import logging

import pytest
import torch

import selfdistill.rollout.decode_step as decode_step
import selfdistill.rollout.hf as rollout_hf
from selfdistill.config import ConfigError, RolloutConfig
from selfdistill.models import build_tiny_model
from selfdistill.rollout.hf import HFBackend

LOGGER = "selfdistill.rollout.decode_step"


@pytest.fixture(scope="module")
def prompts(tok):
    """Three chat prompts of different lengths (the batch is left-padded)."""
    questions = ["What is 2+3?", "Tom has 3 apples and buys 4 more. How many now?", "Count to nine."]
    return [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)["input_ids"]
            for q in questions]


def generate(backend, prompts, **kwargs):
    settings = dict(num_samples=2, temperature=1.0, top_p=0.95, max_new_tokens=12, seed=[3, 4, 5])
    return backend.generate(prompts, **{**settings, **kwargs})


def step_records(caplog):
    return [r for r in caplog.records if r.name == LOGGER]


def compiled_twice_against_eager(model, tok, prompts, caplog):
    """Two `decode="compiled"` calls, the first checked to sample what the eager loop samples; returns the log
    records of the step choice (one backend, so a fallback must be said once, not per call)."""
    reference = generate(HFBackend(model, tok, decode="eager"), prompts)
    backend = HFBackend(model, tok, decode="compiled")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        result = generate(backend, prompts)
        generate(backend, prompts)
    assert torch.equal(result.response_ids, reference.response_ids)
    return step_records(caplog)


@pytest.mark.slow  # compiles a tiny model's step
@pytest.mark.parametrize("arch, kv_heads", [("qwen2", None), ("llama", 2)], ids=["qwen2", "llama-gqa"])
def test_compiled_step_samples_what_the_eager_step_samples(tok, prompts, caplog, arch, kv_heads):
    """float32, seeded sampling and greedy decoding: the same token ids with the compiled step as with the eager
    one, on the tiny Qwen2 model and on a tiny Llama with grouped-query attention (SmolLM2's architecture: the
    compiled step packs the query heads as the eager one does). The compiled step really runs (its log line, no
    fallback); both settings decode 6 rows, one graph."""
    missing = decode_step.compiler_unavailable(torch.device("cpu"))
    if missing is not None:
        pytest.skip(missing)
    model = build_tiny_model(tok, arch=arch, num_kv_heads=kv_heads, seed=1)
    eager = HFBackend(model, tok, decode="eager")
    compiled = HFBackend(model, tok, decode="compiled")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        for kwargs in ({}, {"temperature": 0.0, "seed": None}):
            reference = generate(eager, prompts, **kwargs)
            result = generate(compiled, prompts, **kwargs)
            assert torch.equal(result.response_ids, reference.response_ids), kwargs
            assert torch.equal(result.lengths, reference.lengths)
            assert compiled.step._broken is None
    messages = [r.getMessage() for r in step_records(caplog)]
    assert len(messages) == 2  # one line per backend
    assert "eager one-token step (decode=eager)" in messages[0]
    assert "compiled one-token step (decode=compiled)" in messages[1]


def test_auto_runs_the_eager_step_and_says_so_once(random_model, tok, prompts, caplog):
    backend = HFBackend(random_model, tok)  # decode="auto"
    with caplog.at_level(logging.INFO, logger=LOGGER):
        generate(backend, prompts)
        generate(backend, prompts)
    records = step_records(caplog)
    assert len(records) == 1 and records[0].levelno == logging.INFO
    assert "eager one-token step (decode=auto)" in records[0].getMessage()


def test_no_compiler_falls_back_to_eager_with_one_warning(random_model, tok, prompts, caplog, monkeypatch):
    monkeypatch.setattr(decode_step.shutil, "which", lambda name: None)
    records = compiled_twice_against_eager(random_model, tok, prompts, caplog)
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert "no C++ compiler" in records[0].getMessage()


def test_compile_error_falls_back_to_eager_with_one_warning(random_model, tok, prompts, caplog, monkeypatch):
    """A step that fails to compile (here: raises like a backend error) is turned off; the step is rerun eagerly and
    the samples are the eager loop's."""
    calls = []

    def failing_step(model, **inputs):
        calls.append(1)
        raise RuntimeError("inductor: simulated compile failure\nmore detail")

    monkeypatch.setattr(decode_step, "_compiled", lambda: failing_step)
    monkeypatch.setattr(decode_step, "compiler_unavailable", lambda device: None)
    records = compiled_twice_against_eager(random_model, tok, prompts, caplog)
    assert len(calls) == 1  # tried once, then never again
    messages = [(r.levelno, r.getMessage()) for r in records]
    assert messages[0][0] == logging.INFO and "compiled one-token step" in messages[0][1]
    assert len(messages) == 2 and messages[1][0] == logging.WARNING
    assert "the compiled step failed (RuntimeError: inductor: simulated compile failure)" in messages[1][1]


def test_growing_cache_runs_the_eager_step(random_model, tok, prompts, caplog, monkeypatch):
    monkeypatch.setattr(rollout_hf, "STATIC_CACHE_BYTES", 0)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        generate(HFBackend(random_model, tok, decode="compiled"), prompts)
    records = step_records(caplog)
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert "the KV cache grows" in records[0].getMessage()


def test_decode_is_validated(random_model, tok):
    with pytest.raises(ValueError, match="decode must be one of auto, compiled, eager, got 'fast'"):
        HFBackend(random_model, tok, decode="fast")
    with pytest.raises(ConfigError, match="rollout.decode"):
        RolloutConfig(decode="fast")
    assert RolloutConfig().decode == "auto"
