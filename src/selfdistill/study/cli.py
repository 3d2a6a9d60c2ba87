"""`selfdistill study`: the method study from the command line (imports stay light until it runs)."""

from __future__ import annotations

import argparse


def _study(args: argparse.Namespace) -> int:
    from selfdistill.study.runner import StudyPremiseError, run_study
    from selfdistill.study.settings import BENCHMARK_TASKS, METHODS, StudySettings

    overrides = {}
    if args.methods:
        methods = [m.strip() for m in ",".join(args.methods).split(",") if m.strip()]
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            print(f"error: unknown methods {unknown}; choose from {', '.join(METHODS)}")
            return 2
        overrides["methods"] = tuple(methods)
    if args.no_tuning:
        overrides["tuning"] = ()
    if args.seeds is not None:
        overrides["seeds"] = args.seeds
    if args.steps is not None:
        overrides["steps"] = args.steps
    if args.lr is not None:
        overrides["lr"] = args.lr
    if args.eval_samples is not None:
        overrides["eval_samples"] = args.eval_samples
    if args.curves is not None:
        overrides["eval_every"] = args.curves
    if args.model is not None:
        overrides["model"] = args.model
    task_options = {}
    if args.data_root is not None:
        if args.task not in BENCHMARK_TASKS:
            print(f"error: --data-root: the {args.task} task generates its problems; --data-root is for a benchmark "
                  f"task ({', '.join(BENCHMARK_TASKS)})")
            return 2
        task_options["data_root"] = args.data_root
    try:
        settings = StudySettings.for_task(args.task, quick=args.quick, task_options=task_options, **overrides)
    except (ValueError, FileNotFoundError) as error:  # the message names the setting (and its flag) or the file
        print(f"error: {error}")
        return 2
    out = args.out or f"runs/study-{args.task}" + ("-quick" if args.quick else "")
    try:
        run_study(settings, out, workers=args.workers, progress=not args.no_progress,
                  rebuild_warm_start=args.rebuild_warm_start)
    except StudyPremiseError as error:
        print(f"error: {error}")
        return 3
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    from selfdistill.study.preregistration import TUNING_SEEDS  # light: numpy only
    from selfdistill.study.settings import (  # light: no torch
        BENCHMARK_TASKS,
        DEFAULT_METHODS,
        METHODS,
        STUDY_TASKS,
        TUNING_METHODS,
    )

    study = commands.add_parser(
        "study",
        help="the method study: GRPO, OPSD, DASD, EGRSD, ... from one warm start, several seeds, with a report",
        description="The pre-registered study (selfdistill/study/preregistration.py): from the same warm start of a "
                    "tiny model (shipped with the package), after checking its premise (the teacher prompt beats the "
                    "student prompt, the student's checks verify, the student beats chance), tuning runs choose DASD's "
                    "beta and delta-scale floor on a validation slice, then every method trains on the claim seeds "
                    "and is evaluated held-out and out of distribution; report.md judges the registered claims "
                    "(paired bootstrap, Holm) with tables and plots. Finished runs in --out are reused. "
                    "Exit status 3: the premise failed.",
    )
    study.add_argument("--task", choices=sorted(STUDY_TASKS), default="search",
                       help="search: search with verified checks, with an out-of-distribution split (default); "
                            "chains: operation chains (the first study); " + ", ".join(BENCHMARK_TASKS) + ": the "
                            "benchmark on a real model (--model), RL on its train split less a validation slice, "
                            "held out: its test split")
    study.add_argument("--model",
                       help="benchmark tasks only: the base of every run instead of the warm start, a local Hugging "
                            "Face folder (or smollm2); nothing is downloaded")
    study.add_argument("--data-root",
                       help="benchmark tasks only: the folder holding <benchmark>/train.jsonl and test.jsonl (default: "
                            "$SELFDISTILL_DATA_ROOT, else where `selfdistill data fetch` wrote)")
    study.add_argument("--quick", action="store_true",
                       help="3 methods, 1 seed, 6 steps, no tuning, 16 problems per held-out set: checks the pipeline "
                            "end to end in about 3 minutes; its numbers mean little. On a benchmark: SmolLM2 (unless "
                            "--model), 2 steps, 4 test problems x 2 samples, the premise reported but not enforced")
    study.add_argument("--no-tuning", action="store_true",
                       help="skip the tuning runs (default, search: " + " ".join(TUNING_METHODS["search"])
                            + " on seeds " + ", ".join(map(str, TUNING_SEEDS))
                            + " and the validation slice; none with --quick): DASD keeps the library's defaults")
    study.add_argument("--seeds", type=int, help="claim seeds per method (default 5; --quick: 1)")
    study.add_argument("--methods", nargs="+",
                       help="methods to run, space- or comma-separated, from: " + ", ".join(METHODS)
                            + " (default, search: " + " ".join(DEFAULT_METHODS["search"]) + "; chains: "
                            + " ".join(DEFAULT_METHODS["chains"]) + "; a benchmark: "
                            + " ".join(DEFAULT_METHODS[next(iter(BENCHMARK_TASKS))]) + "; --quick: grpo opsd dasd)")
    study.add_argument("--steps", type=int, help="optimizer steps per run (default 30; --quick: 6)")
    study.add_argument("--lr", type=float, help="learning rate of every run (default 1e-4; on a benchmark 1e-6)")
    study.add_argument("--eval-samples", type=int,
                       help="samples per evaluated problem: Avg@k and pass@k for k up to it (default 8; a "
                            "benchmark's --quick: 2)")
    study.add_argument("--curves", type=int, metavar="EVERY",
                       help="also evaluate every EVERY steps during training, for the held-out curves (default 0: only "
                            "at the end; --quick: 3)")
    study.add_argument("--out", help="study folder (default runs/study-<task>, or runs/study-<task>-quick)")
    study.add_argument("--rebuild-warm-start", action="store_true",
                       help="train the warm start (on one thread, into the cache: about 15 min) instead of using the "
                            "one shipped with the package; the study then runs from the rebuilt weights")
    study.add_argument("--workers", type=int, default=2, help="worker processes running runs in parallel")
    study.add_argument("--no-progress", action="store_true", help="no progress display")
    study.set_defaults(func=_study)
