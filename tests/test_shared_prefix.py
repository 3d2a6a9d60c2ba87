"""The shared-prompt-prefix forward (`pack_shared`) against the full pack on tiny real models: the same
hidden states and parameter gradients, for the student (gradient) and the teacher (no gradient, LoRA
adapter switched off), an explicit fallback where it cannot run, and the same trainer update."""

import logging

import pytest
import torch

from selfdistill.forward import pack, pack_shared, response_hidden_states, shared_prefix_blocker
from selfdistill.models import build_tiny_model, build_tiny_tokenizer
from selfdistill.teacher import Teacher

# Rows of one prompt are not adjacent; prompts differ in length (left padding), responses too (right
# padding); responses hold the pad id (0) and EOS (2) among real tokens; one prompt is used once only,
# one response is a single token.
PROMPTS = [
    [1, 40, 41, 42, 43, 44, 2],
    [1, 50, 51],
    [1, 40, 41, 42, 43, 44, 2],
    [1, 60, 61, 62, 63],
    [1, 50, 51],
    [1, 40, 41, 42, 43, 44, 2],
]
RESPONSES = [
    [70, 71, 0, 72, 2],
    [73],
    [74, 2, 0, 0, 75, 76, 2],
    [77, 78, 79],
    [0, 80, 2],
    [2, 2],
]
PAD_ID = 0


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def tiny_model(tokenizer, arch: str) -> torch.nn.Module:
    # llama with grouped-query attention (2 key/value heads for 4 query heads), qwen2 with q/k/v biases
    model = build_tiny_model(tokenizer, arch=arch, num_kv_heads=2 if arch == "llama" else None)
    return model.train()


def cotangent(shape: torch.Size) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(1))


def hidden_and_grads(model, batch, params):
    hidden = response_hidden_states(model, batch)  # [B,T,d]
    loss = (hidden * cotangent(hidden.shape)).sum()  # every position, padding included
    return hidden, torch.autograd.grad(loss, params)


def assert_grads_match(shared, full, names, *, all_nonzero=True):
    assert any(g.abs().sum() > 0 for g in full)
    for name, g_shared, g_full in zip(names, shared, full, strict=True):
        if not all_nonzero and g_full.abs().sum() == 0:  # LoRA's A at the first step (B starts at 0)
            assert g_shared.abs().sum() == 0, name
            continue
        assert g_full.abs().sum() > 0, f"{name}: no gradient on the full path"
        # float32: the two layouts sum the same terms in another order (relative error ~1e-6)
        error = float((g_shared - g_full).norm() / g_full.norm())
        assert error < 2e-5, f"{name}: relative gradient error {error:.2e}"


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_hidden_states_and_gradients_equal_the_full_pack(tokenizer, arch):
    model = tiny_model(tokenizer, arch)
    names, params = zip(*model.named_parameters(), strict=True)
    shared = pack_shared(PROMPTS, RESPONSES, pad_id=PAD_ID)
    full = pack(PROMPTS, RESPONSES, pad_id=PAD_ID)
    assert shared.prefix_ids.shape[0] == 3  # the case under test: 6 rows on 3 distinct prompts
    hidden_shared, grads_shared = hidden_and_grads(model, shared, params)
    hidden_full, grads_full = hidden_and_grads(model, full, params)
    assert hidden_shared.shape == hidden_full.shape == (6, 7, model.config.hidden_size)
    torch.testing.assert_close(hidden_shared, hidden_full, rtol=0, atol=1e-5)
    assert_grads_match(grads_shared, grads_full, names)


def test_every_row_alone_gives_its_row_of_the_batch(tokenizer):
    """Guards the cache expansion: each row's states are its own prompt's, wherever the row sits."""
    model = tiny_model(tokenizer, "qwen2").eval()
    with torch.no_grad():
        batch = response_hidden_states(model, pack_shared(PROMPTS, RESPONSES, pad_id=PAD_ID))  # [B,T,d]
        for row, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES, strict=True)):
            alone = response_hidden_states(model, pack([prompt], [response], pad_id=PAD_ID))  # [1,t,d]
            torch.testing.assert_close(batch[row, : len(response)], alone[0], rtol=0, atol=1e-5)


def test_short_and_empty_responses(tokenizer):
    model = tiny_model(tokenizer, "llama").eval()
    with torch.no_grad():
        for responses in ([[5], [6]], [[], []], [[], [7, 8]]):
            prompts = [[1, 9, 10], [1, 9, 10]]
            shared = response_hidden_states(model, pack_shared(prompts, responses, pad_id=PAD_ID))
            full = response_hidden_states(model, pack(prompts, responses, pad_id=PAD_ID))
            assert shared.shape == full.shape
            torch.testing.assert_close(shared, full, rtol=0, atol=1e-5)


def test_lora_student_gradients_and_adapter_free_teacher(tokenizer):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model(tokenizer, "qwen2"),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.train()
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad], strict=True)
    assert names and all("lora_" in n for n in names)
    shared = pack_shared(PROMPTS, RESPONSES, pad_id=PAD_ID)
    full = pack(PROMPTS, RESPONSES, pad_id=PAD_ID)
    hidden_shared, grads_shared = hidden_and_grads(model, shared, params)
    hidden_full, grads_full = hidden_and_grads(model, full, params)
    torch.testing.assert_close(hidden_shared, hidden_full, rtol=0, atol=1e-5)
    assert_grads_match(grads_shared, grads_full, names)

    teacher = Teacher("frozen", model)
    assert teacher.uses_adapter_switch and teacher.copy is None
    teacher_shared, weight = teacher.hidden_states(shared)
    teacher_full, _ = teacher.hidden_states(full)
    assert not teacher_shared.requires_grad and weight.shape == (len(tokenizer), model.config.hidden_size)
    torch.testing.assert_close(teacher_shared, teacher_full, rtol=0, atol=1e-5)
    assert (teacher_shared - hidden_shared).abs().max() > 1e-3  # the adapter was off for the teacher
    assert model.training  # and the student's mode is restored


@pytest.mark.parametrize("mode", ["live", "ema"])
def test_teacher_hidden_states_take_either_batch(tokenizer, mode):
    teacher = Teacher(mode, tiny_model(tokenizer, "llama"))
    shared, _ = teacher.hidden_states(pack_shared(PROMPTS, RESPONSES, pad_id=PAD_ID))
    full, _ = teacher.hidden_states(pack(PROMPTS, RESPONSES, pad_id=PAD_ID))
    torch.testing.assert_close(shared, full, rtol=0, atol=1e-5)


def test_gradient_checkpointing_blocks_the_student_but_not_the_teacher(tokenizer):
    model = tiny_model(tokenizer, "qwen2")
    assert shared_prefix_blocker(model, backward=True) is None
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    assert "gradient checkpointing" in shared_prefix_blocker(model, backward=True)
    shared = pack_shared(PROMPTS, RESPONSES, pad_id=PAD_ID)
    with pytest.raises(RuntimeError, match="gradient checkpointing"):
        response_hidden_states(model, shared)  # refused, not silently wrong
    # Without gradient transformers keeps the cache of checkpointed layers: the teacher may share.
    assert shared_prefix_blocker(model, backward=False) is None
    teacher, _ = Teacher("live", model).hidden_states(shared)
    with torch.no_grad():
        full = response_hidden_states(model, pack(PROMPTS, RESPONSES, pad_id=PAD_ID))
    torch.testing.assert_close(teacher, full, rtol=0, atol=1e-5)


class _NoCacheDecoder(torch.nn.Module):
    """Wraps a real decoder, taking no cache argument."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.inner.get_input_embeddings()

    def forward(self, inputs_embeds=None, attention_mask=None, position_ids=None, use_cache=None):
        return self.inner(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False)


class _CacheIgnoringDecoder(_NoCacheDecoder):
    """Takes a cache argument and leaves the cache empty."""

    def forward(self, inputs_embeds=None, attention_mask=None, position_ids=None, cache=None, use_cache=None):
        return super().forward(inputs_embeds, attention_mask, position_ids)


class _Model(torch.nn.Module):
    def __init__(self, decoder: torch.nn.Module) -> None:
        super().__init__()
        self.decoder = decoder

    def get_decoder(self) -> torch.nn.Module:
        return self.decoder


def test_a_decoder_without_a_cache_is_refused(tokenizer):
    inner = tiny_model(tokenizer, "qwen2").get_decoder()
    shared = pack_shared(PROMPTS, RESPONSES, pad_id=PAD_ID)
    no_cache = _Model(_NoCacheDecoder(inner))
    assert "takes no KV cache" in shared_prefix_blocker(no_cache, backward=False)
    with pytest.raises(RuntimeError, match="takes no KV cache"):
        response_hidden_states(no_cache, shared)
    ignoring = _Model(_CacheIgnoringDecoder(inner))
    assert shared_prefix_blocker(ignoring, backward=False) is None
    with pytest.raises(RuntimeError, match="cached 0 of 7 prompt columns"):
        response_hidden_states(ignoring, shared)


def test_sliding_window_layers_are_refused():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, use_sliding_window=True, sliding_window=4,
                         max_window_layers=0)
    assert "full-attention" in shared_prefix_blocker(Qwen2ForCausalLM(config), backward=False)


# --- the trainer ---------------------------------------------------------------------------


def _trainer(tmp_path, shared_prefix: bool, **sections):
    from test_trainer import length_reward, tiny_config

    from selfdistill.trainer import Trainer

    sections.setdefault("optim", {})["shared_prefix"] = shared_prefix
    return Trainer(tiny_config(tmp_path / str(shared_prefix), **sections), reward_fn=length_reward)


@pytest.mark.parametrize(
    "sections",
    [
        {"objective": {"name": "opsd"}},
        {"objective": {"name": "rlsd"}, "data": {"template": "sibling"}},  # teacher prompts differ per row
        {"objective": {"name": "opsd", "teacher": "frozen"},
         "model": {"lora_rank": 4, "lora_targets": ["q_proj", "v_proj"]}},
    ],
    ids=["opsd", "rlsd-sibling", "opsd-lora"],
)
def test_one_update_is_the_same_with_and_without_the_shared_prefix(tmp_path, sections):
    import copy

    from selfdistill.trainer import StepLog

    on = _trainer(tmp_path, True, **copy.deepcopy(sections))
    off = _trainer(tmp_path, False, **copy.deepcopy(sections))
    assert on.pack_student is pack_shared and on.pack_teacher is pack_shared
    assert off.pack_student is pack and off.pack_teacher is pack
    group = on._rollouts(on._step_problems())  # one set of rollouts for both: only the packing differs
    assert len(set(group.prompt_of_row[:on.config.optim.micro_batch_size])) < on.config.optim.micro_batch_size
    results = []
    for trainer in (on, off):
        trainer.optimizer.zero_grad(set_to_none=True)
        log = StepLog()
        loss = trainer._update(trainer._on_policy(group), log)
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        results.append((loss, log.means(), grads))
        trainer.grader.close()
    (loss_on, log_on, grads_on), (loss_off, log_off, grads_off) = results
    assert loss_on == pytest.approx(loss_off, rel=1e-5, abs=1e-7)
    assert log_on.keys() == log_off.keys() and "teacher_entropy" in log_on
    for name in log_on:
        assert log_on[name] == pytest.approx(log_off[name], rel=1e-4, abs=1e-6), name
    assert grads_on.keys() == grads_off.keys()
    names = list(grads_off)
    assert_grads_match([grads_on[n] for n in names], [grads_off[n] for n in names], names, all_nonzero=False)


def test_trainer_falls_back_for_the_student_under_gradient_checkpointing(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="selfdistill.training_setup"):
        trainer = _trainer(tmp_path, True, model={"gradient_checkpointing": True}, objective={"name": "opsd"})
    assert trainer.pack_student is pack and trainer.pack_teacher is pack_shared
    assert "the student forward packs every row's prompt in full: gradient checkpointing" in caplog.text
    metrics = trainer.train_step()
    assert not metrics["skipped"] and torch.isfinite(torch.tensor(metrics["loss"]))
    trainer.grader.close()


def test_shared_prefix_config_is_validated(tmp_path):
    from test_trainer import tiny_config

    from selfdistill.config import ConfigError, OptimConfig

    assert OptimConfig().shared_prefix is True
    assert tiny_config(tmp_path, optim={"shared_prefix": False}).optim.shared_prefix is False
    with pytest.raises(ConfigError, match="optim.shared_prefix"):
        tiny_config(tmp_path, optim={"shared_prefix": "yes"})
    with pytest.raises(ConfigError, match="optim.shared_prefix"):
        OptimConfig(shared_prefix=1)
