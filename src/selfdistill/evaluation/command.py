"""`selfdistill eval` and `selfdistill report`: the command-line shell over `runner` and `report`.

Imports here stay light (argparse only); models, torch and matplotlib load inside the handlers.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

DEFAULT_BENCHMARKS = "aime24,aime25,amc23,math500,minerva_math,olympiadbench"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _eval(args: argparse.Namespace) -> int:
    from selfdistill.evaluation.report import print_summary, write_summary_files
    from selfdistill.evaluation.runner import run_eval
    from selfdistill.evaluation.store import EvalSettings, SettingsMismatchError

    try:
        settings = EvalSettings(
            model=args.model,
            adapter=args.adapter,
            benchmarks=tuple(name.strip() for name in args.benchmarks.split(",") if name.strip()),
            split=args.split,
            limit=args.limit,
            n=args.n,
            temperature=args.temperature,
            top_p=args.top_p,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
            max_prompt_tokens=args.max_prompt_tokens,
            backend=args.backend,
            batch_size=args.batch_size,
            dtype=args.dtype,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        summary = run_eval(
            settings, args.out, data_root=args.data_root, device=args.device, progress=not args.no_progress
        )
    except SettingsMismatchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    write_summary_files(summary, args.out, title=f"selfdistill eval: {settings.model}")
    print_summary(summary, title=f"{settings.model}  (n={settings.n}, T={settings.temperature})")
    timing = summary["timing"]
    rate = timing["samples_per_second"]
    print(
        f"{timing['new_samples']} new samples in {timing['seconds']:.1f} s"
        + (f" ({rate:.2f} samples/s)" if rate else "")
        + (f", {timing['resumed_samples']} resumed" if timing["resumed_samples"] else "")
    )
    if summary.get("environment"):
        print(f"environment: {summary['environment']}")
    print(f"run folder: {args.out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from selfdistill.evaluation.report import compare_runs

    labels = args.labels.split(",") if args.labels else None
    try:
        files = compare_runs(args.runs, args.out, labels=labels)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(files["report"].read_text(encoding="utf-8"))
    for name, path in files.items():
        print(f"{name}: {path}")
    return 0


def register(commands: Any) -> None:
    """Add the `eval` and `report` sub-commands to an argparse sub-parser collection."""
    evaluate = commands.add_parser(
        "eval",
        help="sample, grade and summarize benchmarks (resumable)",
        description="Sample n completions per problem, grade them, and write samples.jsonl, summary.json, "
        "summary.md and summary.csv into --out. A re-run with the same --out and settings resumes.",
    )
    evaluate.add_argument("--model", required=True,
                          help='"tiny", "smollm2", a local Hugging Face model folder, or a full fine-tuning '
                               "checkpoint-*/ folder (a train run folder: its latest checkpoint)")
    evaluate.add_argument("--adapter", help="a peft LoRA adapter folder (e.g. checkpoint-*/adapter of a train run)")
    evaluate.add_argument("--benchmarks", default=DEFAULT_BENCHMARKS,
                          help=f"comma-separated, default {DEFAULT_BENCHMARKS}")
    evaluate.add_argument("--split", default="test", help="benchmark split (default test)")
    evaluate.add_argument("--limit", type=_positive_int, help="only the first N problems of each benchmark")
    evaluate.add_argument("--n", type=_positive_int, default=16, help="samples per problem (default 16)")
    evaluate.add_argument("--temperature", type=float, default=0.6,
                          help="sampling temperature; 0 is greedy (default 0.6)")
    evaluate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0: off)")
    evaluate.add_argument("--max-new-tokens", type=_positive_int, default=1024, help="response limit (default 1024)")
    evaluate.add_argument("--max-prompt-tokens", type=_positive_int, default=2048,
                          help="longer prompts are an error, never truncated (default 2048)")
    evaluate.add_argument("--seed", type=int, default=0, help="run seed; each problem samples with its own (default 0)")
    evaluate.add_argument("--backend", choices=("hf", "vllm"), default="hf", help="generation backend (default hf)")
    evaluate.add_argument("--batch-size", type=_positive_int,
                          help="rows (problems x n) per generate call (default: 32 for hf, 512 for vllm); "
                               "the samples do not depend on it")
    evaluate.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    evaluate.add_argument("--device", default="auto", help="hf: auto (CUDA if available), cpu, cuda, cuda:1 ...")
    evaluate.add_argument("--out", required=True, help="run folder (created; an existing one is resumed)")
    evaluate.add_argument("--data-root", help="benchmark folder (default: $SELFDISTILL_DATA_ROOT)")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluate.set_defaults(func=_eval)

    report = commands.add_parser(
        "report",
        help="compare eval runs: Markdown tables and PNG plots",
        description="Put several `selfdistill eval` run folders side by side: report.md, pass_at_k.png, "
        "lengths.png and epistemic.png.",
    )
    report.add_argument("runs", nargs="+", help="run folders written by `selfdistill eval`")
    report.add_argument("--out", default="report", help="output folder (default ./report)")
    report.add_argument("--labels", help="comma-separated names for the runs (default: the folder names)")
    report.set_defaults(func=_report)
