"""The HF rollout backend: shapes and order, EOS handling (also when pad == eos), truncation, seeding,
batching, the sampling distribution, the shared prefill, and (slow) greedy SmolLM2."""

import copy

import pytest
import torch

from selfdistill.models import build_tiny_model, load_model
from selfdistill.rollout import Rollouts
from selfdistill.rollout.hf import HFBackend, _RowSampler, nucleus_mask, row_seed

# Question -> the exact answer the trained tiny model learns to give (then EOS). The prompts have
# different lengths, so batches need left padding; the longest comes first so that sorting by length
# really reorders the rows.
QA = [
    ("Tom has 3 apples and buys 4 more. How many apples does Tom have now?", "3 + 4 = 7. The answer is \\boxed{7}."),
    ("What is 2+3?", "5"),
    ("Count to nine.", "1 2 3 4 5 6 7 8 9"),
]


def chat_ids(tokenizer, question: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)[
        "input_ids"
    ]


@pytest.fixture(scope="module")
def trained_model(tok):
    """The tiny model fitted until it answers each question of QA exactly and then emits EOS."""
    model = build_tiny_model(tok, seed=0)
    seqs = []
    for question, answer in QA:
        prompt = chat_ids(tok, question)
        seqs.append((prompt, tok(answer, add_special_tokens=False).input_ids + [tok.eos_token_id]))
    width = max(len(p) + len(r) for p, r in seqs)
    input_ids = torch.full((len(seqs), width), tok.pad_token_id)  # [N, W]
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)  # [N, W]
    labels = torch.full((len(seqs), width), -100)  # [N, W], loss on response tokens and EOS only
    for i, (prompt, response) in enumerate(seqs):
        n = len(prompt) + len(response)
        input_ids[i, :n] = torch.tensor(prompt + response)
        attention_mask[i, :n] = 1
        labels[i, len(prompt) : n] = torch.tensor(response)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    for _ in range(300):
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.01:
            break
    assert loss.item() < 0.01, f"tiny model did not fit the answers (loss {loss.item():.3f})"
    return model.eval()


def check_invariants(r: Rollouts, backend: HFBackend, prompts: list[list[int]], num_samples: int) -> None:
    """Properties every Rollouts batch must have."""
    B, T = r.response_ids.shape
    assert B == len(prompts) * num_samples == len(r)
    assert torch.equal(r.prompt_index, torch.arange(len(prompts)).repeat_interleave(num_samples))
    assert r.prompt_lengths.tolist() == [len(prompts[p]) for p in r.prompt_index.tolist()]
    assert r.response_mask.dtype == torch.float32 and r.response_ids.dtype == torch.long
    assert torch.equal(r.response_mask.sum(1).long(), r.lengths)
    assert int(r.lengths.max()) == T
    is_eos = torch.isin(r.response_ids, torch.tensor(backend.eos_ids))  # [B, T]
    for i in range(B):
        n = int(r.lengths[i])
        assert r.response_mask[i, :n].eq(1).all() and r.response_mask[i, n:].eq(0).all()
        assert r.response_ids[i, n:].eq(backend.pad_id).all()
        assert not is_eos[i, : n - 1].any()  # no EOS before the last response token
        assert bool(r.truncated[i]) == (not is_eos[i, n - 1])
        ids = r.response_ids[i, :n].tolist()
        assert r.texts[i] == backend.tokenizer.decode(ids, skip_special_tokens=True)
    for t in (r.prompt_index, r.response_ids, r.response_mask, r.lengths, r.truncated):
        assert not t.is_inference()  # usable as input to a training forward pass


def test_generate_rejects_bad_arguments(tok, random_model):
    backend = HFBackend(random_model, tok)
    ok = {"num_samples": 1, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 4, "seed": 0}
    for bad in ({"num_samples": 0}, {"max_new_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}):
        with pytest.raises(ValueError):
            backend.generate([[1, 2]], **{**ok, **bad})
    with pytest.raises(ValueError):
        backend.generate([[1, 2], []], **ok)
    with pytest.raises(ValueError):
        HFBackend(random_model, tok, batch_size=0)


def test_shapes_order_and_model_state(tok, random_model):
    model = copy.deepcopy(random_model).train()
    saved_config = model.generation_config
    modes = []
    model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    prompts = [chat_ids(tok, q) for q, _ in QA]
    backend = HFBackend(model, tok)
    r = backend.generate(prompts, num_samples=3, temperature=1.0, top_p=1.0, max_new_tokens=12, seed=0)
    check_invariants(r, backend, prompts, 3)
    assert r.lengths.max() <= 12
    assert modes and not any(modes)  # eval mode while generating
    assert model.training and model.generation_config is saved_config  # restored afterwards


def test_truncated_without_eos(tok, random_model):
    backend = HFBackend(random_model, tok)
    prompts = [chat_ids(tok, "What is 2+3?")]
    r = backend.generate(prompts, num_samples=8, temperature=1.0, top_p=1.0, max_new_tokens=5, seed=3)
    check_invariants(r, backend, prompts, 8)
    # An untrained model over ~800 tokens almost never picks EOS within 5 tokens: all rows run out.
    assert r.truncated.all() and r.lengths.eq(5).all() and r.response_mask.eq(1).all()


def test_same_seed_same_rollouts(tok, random_model):
    backend = HFBackend(random_model, tok, batch_size=3)
    prompts = [chat_ids(tok, q) for q, _ in QA[:2]]
    kwargs = {"num_samples": 3, "temperature": 1.0, "top_p": 0.95, "max_new_tokens": 8}
    rng_before = torch.get_rng_state()
    a = backend.generate(prompts, seed=11, **kwargs)
    assert torch.equal(torch.get_rng_state(), rng_before)  # a seeded call leaves the global RNG alone
    b = backend.generate(prompts, seed=11, **kwargs)
    c = backend.generate(prompts, seed=12, **kwargs)
    assert torch.equal(a.response_ids, b.response_ids) and a.texts == b.texts
    assert not torch.equal(a.response_ids, c.response_ids)
    # seed=None draws from the global RNG, so re-seeding it reproduces the rows too.
    torch.manual_seed(5)
    d = backend.generate(prompts, seed=None, **kwargs)
    torch.manual_seed(5)
    e = backend.generate(prompts, seed=None, **kwargs)
    assert torch.equal(d.response_ids, e.response_ids)


def test_a_prompts_samples_depend_only_on_its_seed(tok, random_model):
    """Per-prompt seeds: the same rows alone, next to other prompts, and under any batching."""
    prompts = [chat_ids(tok, q) for q, _ in QA]
    kwargs = {"num_samples": 3, "temperature": 1.0, "top_p": 0.9, "max_new_tokens": 8}
    together = HFBackend(random_model, tok).generate(prompts, seed=[7, 8, 9], **kwargs)
    batched = HFBackend(random_model, tok, batch_size=2).generate(prompts, seed=[7, 8, 9], **kwargs)
    assert together.texts == batched.texts
    for p, seed in enumerate([7, 8, 9]):
        alone = HFBackend(random_model, tok).generate([prompts[p]], seed=[seed], **kwargs)
        assert alone.texts == together.texts[3 * p : 3 * p + 3]
    assert len(set(together.texts[:3])) > 1  # the samples of a prompt differ from each other
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        HFBackend(random_model, tok).generate(prompts, seed=[1, 2], **kwargs)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.5, 1.0), (1.0, 0.8)])
def test_row_sampler_draws_from_the_tempered_nucleus(temperature, top_p):
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])  # [1, V]
    probs = torch.softmax(logits[0].double() / temperature, dim=-1)  # [V]
    outside = nucleus_mask(logits / temperature, top_p)[0]  # [V]
    probs = probs.masked_fill(outside, 0.0)
    probs = probs / probs.sum()
    draws = 20000
    sampler = _RowSampler([row_seed(0, 0)], temperature, top_p, torch.device("cpu"), steps=draws)
    counts = torch.zeros(6, dtype=torch.float64)
    for _ in range(draws):
        drawn = sampler(logits)  # [1]
        counts[drawn[0]] += 1
    assert torch.allclose(counts / draws, probs, atol=0.012)  # ~3.5 standard errors at p = 0.5
    assert counts[outside].sum() == 0


def test_sampling_is_from_the_full_distribution(tok, random_model):
    """No top-k cut (transformers would apply top_k=50 by default) and top_p is honoured."""
    prompt = chat_ids(tok, "What is 2+3?")
    backend = HFBackend(random_model, tok)
    r = backend.generate([prompt], num_samples=48, temperature=1.0, top_p=1.0, max_new_tokens=1, seed=0)
    with torch.no_grad():
        logits = random_model(input_ids=torch.tensor([prompt])).logits[0, -1]  # [V]
    rank = logits.argsort(descending=True).argsort()  # [V], 0 = most likely token
    sampled_ranks = rank[r.response_ids[:, 0]]  # [48]
    assert sampled_ranks.max() >= 50
    # A vanishing nucleus keeps only the most likely token: sampling then equals greedy decoding.
    greedy = backend.generate([prompt], num_samples=2, temperature=0.0, top_p=1.0, max_new_tokens=8, seed=None)
    nucleus = backend.generate([prompt], num_samples=2, temperature=1.0, top_p=1e-6, max_new_tokens=8, seed=0)
    assert torch.equal(greedy.response_ids, nucleus.response_ids)


def test_checkpoint_generation_defaults_are_ignored_also_through_peft(tok, random_model):
    """Sampling must not pick up top_k, min_p, penalties, ... from the model's generation config, also
    when the model is wrapped by PEFT (whose base model holds that config)."""
    peft = pytest.importorskip("peft")
    prompts = [chat_ids(tok, q) for q, _ in QA[:2]]
    kwargs = {"num_samples": 3, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 8, "seed": 4}
    reference = HFBackend(random_model, tok).generate(prompts, **kwargs)

    model = copy.deepcopy(random_model)
    sampled = reference.response_ids.unique().tolist()
    model.generation_config.top_k = 1
    model.generation_config.min_p = 0.5
    model.generation_config.repetition_penalty = 5.0
    model.generation_config.suppress_tokens = sampled  # would forbid every token sampled above
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    wrapped.train()
    r = HFBackend(wrapped, tok).generate(prompts, **kwargs)  # LoRA starts as the identity
    assert torch.equal(r.response_ids, reference.response_ids)
    assert wrapped.training
    assert model.generation_config.top_k == 1 and model.generation_config.suppress_tokens == sampled


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_eos_is_kept_in_the_mask(tok, trained_model, pad_is_eos):
    tokenizer = copy.deepcopy(tok)
    if pad_is_eos:
        tokenizer.pad_token = tokenizer.eos_token
    backend = HFBackend(trained_model, tokenizer)
    assert (backend.pad_id == tok.eos_token_id) == pad_is_eos
    prompts = [chat_ids(tok, q) for q, _ in QA]
    r = backend.generate(prompts, num_samples=2, temperature=0.0, top_p=1.0, max_new_tokens=20, seed=None)
    check_invariants(r, backend, prompts, 2)
    answers = [a for _, a in QA for _ in range(2)]
    assert r.texts == answers
    assert not r.truncated.any()
    eos = tok.eos_token_id
    for i, answer in enumerate(answers):
        n = len(tok(answer, add_special_tokens=False).input_ids) + 1
        assert r.lengths[i] == n
        assert r.response_ids[i, n - 1] == eos and r.response_mask[i, n - 1] == 1
    # "5" + EOS is the shortest answer: its row is padded after the EOS, and the padding is masked
    # even where the pad token is the EOS token.
    short = 2  # first row of QA[1]
    assert r.lengths[short] == 2 and r.response_mask[short, 2:].eq(0).all()
    assert r.response_ids[short, 2:].eq(backend.pad_id).all()


def test_truncated_flags(tok, trained_model):
    backend = HFBackend(trained_model, tok)
    prompts = [chat_ids(tok, q) for q, _ in QA]
    r = backend.generate(prompts, num_samples=1, temperature=0.0, top_p=1.0, max_new_tokens=3, seed=None)
    check_invariants(r, backend, prompts, 1)
    assert r.truncated.tolist() == [True, False, True]
    assert r.lengths.tolist() == [3, 2, 3]
    first3 = [tok.decode(tok(a, add_special_tokens=False).input_ids[:3]) for _, a in QA]
    assert r.texts == [first3[0], "5", first3[2]]


def test_sorted_batches_give_the_same_rows(tok, trained_model):
    prompts = [chat_ids(tok, q) for q, _ in QA]
    kwargs = {"num_samples": 2, "temperature": 0.0, "top_p": 1.0, "max_new_tokens": 20, "seed": None}
    reference = HFBackend(trained_model, tok).generate(prompts, **kwargs)
    for batch_size in (1, 4):
        backend = HFBackend(trained_model, tok, batch_size=batch_size)
        r = backend.generate(prompts, **kwargs)
        check_invariants(r, backend, prompts, 2)
        assert r.texts == reference.texts
        assert torch.equal(r.response_ids, reference.response_ids)
        assert torch.equal(r.prompt_index, reference.prompt_index)


def test_sampling_from_the_trained_model_follows_prompt_order(tok, trained_model):
    """Sampled rows land in prompt-major order even when batches are sorted by prompt length."""
    prompts = [chat_ids(tok, q) for q, _ in QA]
    backend = HFBackend(trained_model, tok, batch_size=2)
    r = backend.generate(prompts, num_samples=3, temperature=0.7, top_p=1.0, max_new_tokens=20, seed=0)
    check_invariants(r, backend, prompts, 3)
    # The fitted model is nearly deterministic, so each row's text identifies its prompt.
    for i, p in enumerate(r.prompt_index.tolist()):
        assert r.texts[i] == QA[p][1]


@pytest.mark.slow
def test_smollm2_greedy_answer():
    model, tokenizer = load_model("smollm2")
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # SmolLM2 pads with <|im_end|>
    backend = HFBackend(model, tokenizer)
    prompt = chat_ids(tokenizer, "What is 2+3?")
    r = backend.generate([prompt], num_samples=2, temperature=0.0, top_p=1.0, max_new_tokens=40, seed=None)
    check_invariants(r, backend, [prompt], 2)
    print("SmolLM2 greedy:", repr(r.texts[0]))
    assert r.texts[0].strip() and r.texts[0] == r.texts[1]
    assert not r.truncated.any()
    assert r.response_ids[0, r.lengths[0] - 1] == tokenizer.eos_token_id
    assert "5" in r.texts[0]


@pytest.mark.parametrize("arch", ["qwen2", "llama", "trained"])
@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_greedy_decoding_equals_transformers_generate(tok, trained_model, arch, cache, monkeypatch):
    """Our decoding loop (either KV cache) gives transformers' greedy tokens, with left padding and (trained
    model) rows that end early with EOS."""
    from transformers import GenerationConfig

    import selfdistill.rollout.hf as hf

    if cache == "dynamic":
        monkeypatch.setattr(hf, "STATIC_CACHE_BYTES", 0)
    model = trained_model if arch == "trained" else build_tiny_model(tok, arch=arch, seed=1)
    prompts = [chat_ids(tok, question) for question, _ in QA]
    ours = HFBackend(model, tok).generate(prompts, num_samples=1, temperature=0.0, top_p=1.0, max_new_tokens=24,
                                          seed=None)
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])  # [3, P]
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])  # [3, P]
    config = GenerationConfig(max_new_tokens=24, do_sample=False, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        reference = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    for row in range(len(prompts)):
        expected = reference[row, width:].tolist()
        if tok.eos_token_id in expected:
            expected = expected[: expected.index(tok.eos_token_id) + 1]
        assert ours.response_ids[row, : ours.lengths[row]].tolist() == expected
    if arch == "trained":  # every answer ended with EOS before the limit
        assert not ours.truncated.any()


def test_min_new_tokens_holds_back_eos(tok, trained_model):
    """The trained model answers "5" then EOS; with min_new_tokens EOS cannot come before that many tokens."""
    prompt = chat_ids(tok, QA[1][0])
    free = HFBackend(trained_model, tok).generate([prompt], num_samples=1, temperature=0.0, top_p=1.0,
                                                  max_new_tokens=10, seed=None)
    held = HFBackend(trained_model, tok, min_new_tokens=6).generate([prompt], num_samples=1, temperature=0.0,
                                                                    top_p=1.0, max_new_tokens=10, seed=None)
    assert free.response_ids[0, free.lengths[0] - 1] == tok.eos_token_id
    assert held.lengths[0] >= 6 and tok.eos_token_id not in held.response_ids[0, :5].tolist()
    with pytest.raises(ValueError, match="min_new_tokens"):
        HFBackend(trained_model, tok, min_new_tokens=-1)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("static", [True, False])
def test_prefill_runs_each_distinct_prompt_once_with_the_same_samples(tok, arch, static, monkeypatch):
    """The samples of a prompt share its prefill (its keys and values copied to its rows): the prefill sees one
    row per distinct prompt, and every sampled and greedy token is what prefilling every row gives."""
    import selfdistill.rollout.hf as rollout_hf

    model = build_tiny_model(tok, arch=arch, seed=3)
    if not static:
        monkeypatch.setattr(rollout_hf, "STATIC_CACHE_BYTES", 0)
    # The first prompt comes back last: its rows are not all next to each other (a regression test: the
    # shared prefill once took the keys and values of another prompt's row for them).
    prompts = [chat_ids(tok, "What is 2+3?"), chat_ids(tok, "Name a colour, please."), chat_ids(tok, "Hi"),
               chat_ids(tok, "What is 2+3?")]
    prefill_rows = []
    forward = model.forward

    def counted(*args, **kwargs):
        if kwargs["input_ids"].shape[1] > 1:
            prefill_rows.append(kwargs["input_ids"].shape[0])
        return forward(*args, **kwargs)

    results = {}
    for shared in (True, False):
        monkeypatch.setattr(rollout_hf, "full_attention_cache",
                            (lambda cache: True) if shared else (lambda cache: False))
        monkeypatch.setattr(model, "forward", counted)
        backend = HFBackend(model, tok, min_new_tokens=3)
        for temperature in (1.0, 0.0):
            out = backend.generate(prompts, num_samples=4, temperature=temperature, top_p=1.0, max_new_tokens=12,
                                   seed=[5, 6, 7, 5])
            results[shared, temperature] = out.response_ids.tolist()
    assert prefill_rows == [3, 3, 16, 16]  # shared: one row per distinct prompt; else every row
    assert results[True, 1.0] == results[False, 1.0]
    assert results[True, 0.0] == results[False, 0.0]
    assert results[True, 1.0][12:] == results[True, 1.0][:4]  # the same prompt and seed: the same samples
    assert len({tuple(r) for r in results[True, 1.0][:4]}) > 1  # the samples of a prompt still differ


def test_prefill_is_not_shared_for_sliding_window_caches(tok):
    from transformers import DynamicCache, Qwen2Config

    from selfdistill.forward import full_attention_cache

    config = Qwen2Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, use_sliding_window=True, sliding_window=4,
                         max_window_layers=0)
    assert not full_attention_cache(DynamicCache(config=config))
    assert full_attention_cache(DynamicCache(config=build_tiny_model(tok).config))


def test_the_cache_keyword_follows_the_installed_transformers(tok, random_model):
    """transformers 5.x takes the KV cache as `cache` (`past_key_values` is deprecated there), older versions as
    `past_key_values`; a model taking neither is refused up front."""
    from selfdistill.forward import cache_keyword

    class OldStyle(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=None):
            raise AssertionError("not called")

    class NoCache(torch.nn.Module):
        def forward(self, input_ids):
            raise AssertionError("not called")

    assert cache_keyword(random_model) in ("cache", "past_key_values")
    assert cache_keyword(OldStyle()) == "past_key_values"
    assert cache_keyword(NoCache()) is None
    with pytest.raises(TypeError, match="takes no KV cache"):
        HFBackend(NoCache(), tok)
