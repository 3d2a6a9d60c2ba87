"""`selfdistill study`: the method study from the command line (imports stay light until it runs)."""

from __future__ import annotations

import argparse


def _study(args: argparse.Namespace) -> int:
    from selfdistill.study.runner import run_study
    from selfdistill.study.settings import METHODS, StudySettings

    overrides = {}
    if args.methods:
        methods = [m.strip() for m in ",".join(args.methods).split(",") if m.strip()]
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            print(f"error: unknown methods {unknown}; choose from {', '.join(METHODS)}")
            return 2
        overrides["methods"] = tuple(methods)
    if args.seeds is not None:
        overrides["seeds"] = args.seeds
    if args.steps is not None:
        overrides["steps"] = args.steps
    if args.lr is not None:
        overrides["lr"] = args.lr
    settings = StudySettings.quick(**overrides) if args.quick else StudySettings(**overrides)
    out = args.out or ("runs/study-quick" if args.quick else "runs/study")
    run_study(settings, out, workers=args.workers, progress=not args.no_progress,
              rebuild_warm_start=args.rebuild_warm_start)
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    from selfdistill.study.settings import METHODS  # light: no torch

    study = commands.add_parser(
        "study",
        help="the method study: GRPO, OPSD, DASD, EGRSD, ... from one warm start, several seeds, with a report",
        description="Train every method from the same cached warm start of a tiny model on operation chains, "
                    "evaluate held-out Avg@k / pass@k and entropy, and write report.md with tables and plots. "
                    "Finished runs in --out are reused.",
    )
    study.add_argument("--quick", action="store_true",
                       help="3 methods, 1 seed, 6 steps, 16 held-out problems, a short warm start: checks the pipeline "
                            "end to end in about 3 minutes; its numbers mean little")
    study.add_argument("--seeds", type=int, help="seeds per method (default 3; --quick: 1)")
    study.add_argument("--methods", nargs="+",
                       help="methods to run, space- or comma-separated, from: " + ", ".join(METHODS)
                            + " (default: all but dasd_bottom; --quick: grpo opsd dasd)")
    study.add_argument("--steps", type=int, help="optimizer steps per run (default 30; --quick: 6)")
    study.add_argument("--lr", type=float, help="learning rate of every run (default 1e-4)")
    study.add_argument("--out", help="study folder (default runs/study, or runs/study-quick)")
    study.add_argument("--rebuild-warm-start", action="store_true",
                       help="train the warm start (on one thread, into the cache: about 15 min) instead of using the "
                            "one shipped with the package; the study then runs from the rebuilt weights")
    study.add_argument("--workers", type=int, default=2, help="worker processes running runs in parallel")
    study.add_argument("--no-progress", action="store_true", help="no progress display")
    study.set_defaults(func=_study)
