"""selfdistill.forward: packing, the shared-prompt-prefix forward against the full pack on tiny real models
(the same hidden states and parameter gradients, student and teacher, an explicit fallback where it
cannot run), and the output-layer check."""

import pytest
import torch

from selfdistill.forward import check_output_layer, pack, pack_shared, response_hidden_states, shared_prefix_blocker
from selfdistill.models import build_tiny_model, build_tiny_tokenizer, load_model, tiny_model_dir
from selfdistill.teacher import Teacher
from tests.helpers import assert_grads_match

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


def scale_logits_outside_the_head(model: torch.nn.Module, factor: float) -> None:
    """Wraps the model's forward so its logits come out multiplied by `factor`: a scale that no config attribute
    names, which only a probe forward can see."""
    plain_forward = model.forward

    def scaled_forward(*args, **kwargs):
        out = plain_forward(*args, **kwargs)
        out.logits = out.logits * factor
        return out

    model.forward = scaled_forward


def test_scaled_output_heads_are_refused():
    from transformers import AutoModelForCausalLM, GraniteConfig

    tokenizer = build_tiny_tokenizer()
    granite = GraniteConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=2, logits_scaling=4.0)
    with pytest.raises(NotImplementedError, match="logits_scaling=4.0"):
        check_output_layer(AutoModelForCausalLM.from_config(granite))
    granite.logits_scaling = 1.0
    check_output_layer(AutoModelForCausalLM.from_config(granite))  # a plain head passes

    # A scale that no known attribute names is found by the probe forward.
    model = build_tiny_model(tokenizer, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2)
    check_output_layer(model)
    scale_logits_outside_the_head(model, 0.5)
    with pytest.raises(NotImplementedError, match="logits differ from h @ W.T"):
        check_output_layer(model)


def test_left_padding_does_not_shift_positions():
    prompts = [[11, 12, 13, 14, 15], [21, 22]]
    responses = [[31], [41, 42, 43]]
    batch = pack(prompts, responses, pad_id=0)
    assert batch.prompt_width == 5
    assert batch.input_ids.tolist() == [[11, 12, 13, 14, 15, 31, 0, 0], [0, 0, 0, 21, 22, 41, 42, 43]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1, 1]]
    # Padding columns get a valid (non-negative) position too: embedding tables cannot take -1.
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 5, 5], [0, 0, 0, 0, 1, 2, 3, 4]]
    real = batch.attention_mask.bool()
    assert batch.position_ids[0][real[0]].tolist() == [0, 1, 2, 3, 4, 5]
    assert batch.position_ids[1][real[1]].tolist() == [0, 1, 2, 3, 4]
    assert batch.position_ids.dtype == torch.long and batch.input_ids.dtype == torch.long


def test_pad_equal_to_eos_keeps_eos_in_the_mask():
    eos = 2
    responses = [[5, 6, eos], [7, eos, 8, eos], [eos]]  # a response may even contain eos mid-way
    batch = pack([[1, 3], [1], [1, 4, 4]], responses, pad_id=eos)
    assert batch.response_mask.sum(1).tolist() == [3.0, 4.0, 1.0]
    assert batch.response_mask.dtype == torch.float32
    last_real = batch.response_ids[0, 2]
    assert last_real == eos and batch.response_mask[0, 2] == 1.0 and batch.response_mask[0, 3] == 0.0


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        pack([[1], [2]], [[3]], pad_id=0)
    with pytest.raises(ValueError, match="at least one token"):
        pack([[]], [[3]], pad_id=0)
    with pytest.raises(ValueError, match="empty batch"):
        pack([], [], pad_id=0)
    empty = pack([[1, 2]], [[]], pad_id=0)
    assert empty.response_mask.shape == (1, 0) and empty.input_ids.tolist() == [[1, 2]]


def test_pack_shared_keeps_each_distinct_prompt_once_and_lays_rows_out_as_pack():
    eos = 2
    prompts = [[11, 12, 13], [21], [11, 12, 13], [31, 32], [21], [11, 12, 13]]  # rows of one prompt apart
    responses = [[5, eos], [6, 7, eos, 8], [eos], [9], [10, 11], [eos, eos, eos]]  # eos (= pad) inside
    shared = pack_shared(prompts, responses, pad_id=eos)
    full = pack(prompts, responses, pad_id=eos)
    assert shared.prefix_ids.tolist() == [[11, 12, 13], [eos, eos, 21], [eos, 31, 32]]  # first-seen order
    assert shared.prefix_of_row.tolist() == [0, 1, 0, 2, 1, 0]
    assert shared.prompt_width == full.prompt_width == 3
    # Row by row, the same tensors `pack` builds.
    width = full.prompt_width
    assert torch.equal(shared.prefix_ids[shared.prefix_of_row], full.input_ids[:, :width])
    assert torch.equal(shared.prefix_position_ids[shared.prefix_of_row], full.position_ids[:, :width])
    assert torch.equal(shared.row_attention_mask(), full.attention_mask)
    assert torch.equal(shared.response_position_ids(), full.position_ids[:, width:])
    assert torch.equal(shared.response_ids, full.response_ids)
    assert torch.equal(shared.response_mask, full.response_mask)
    assert shared.response_mask.sum(1).tolist() == [2.0, 4.0, 1.0, 1.0, 2.0, 3.0]  # eos counted, from lengths
    assert shared.response_mask.dtype == torch.float32 and shared.prefix_of_row.dtype == torch.long


def test_pack_shared_with_distinct_prompts_shares_nothing_and_rejects_bad_input():
    shared = pack_shared([[1, 2], [1, 3], [2, 1]], [[4], [5], [6]], pad_id=0)  # same tokens, other order
    assert shared.prefix_of_row.tolist() == [0, 1, 2] and shared.prefix_ids.shape == (3, 2)
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        pack_shared([[1], [2]], [[3]], pad_id=0)
    with pytest.raises(ValueError, match="at least one token"):
        pack_shared([[]], [[3]], pad_id=0)
    with pytest.raises(ValueError, match="empty batch"):
        pack_shared([], [], pad_id=0)
    empty = pack_shared([[1, 2]], [[]], pad_id=0)
    assert empty.response_mask.shape == (1, 0) and empty.row_attention_mask().tolist() == [[1, 1]]


def test_the_head_check_without_a_probe_refuses_named_scales_only():
    """Under ZeRO-3 the route checks the head by name only (no forward on partitioned weights)."""
    from selfdistill.forward import check_output_layer

    model, _ = load_model(str(tiny_model_dir()))
    model.config.logits_scaling = 4.0
    with pytest.raises(NotImplementedError, match="logits_scaling=4.0"):
        check_output_layer(model, probe=False)
    model.config.logits_scaling = 1.0
    scale_logits_outside_the_head(model, 0.5)
    check_output_layer(model, probe=False)  # only a probe forward can see this one
    with pytest.raises(NotImplementedError, match="logits differ"):
        check_output_layer(model)
