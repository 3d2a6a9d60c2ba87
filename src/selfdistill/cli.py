"""`selfdistill <command>`: a thin shell over the configs and functions of the library."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings


def _train(args: argparse.Namespace) -> int:
    from selfdistill.config import load_config, parse_overrides
    from selfdistill.trainer import Trainer, resume

    if args.resume:
        if args.config:
            print("error: --resume continues the saved config; give overrides as key=value instead", file=sys.stderr)
            return 2
        run_dir = resume(args.resume, parse_overrides(args.overrides))
    else:
        config = load_config(args.config, args.overrides)
        run_dir = Trainer(config).run()
    _end_process_group()
    if os.environ.get("RANK", "0") == "0":
        print(f"run folder: {run_dir}")
    return 0


def _end_process_group() -> None:
    """With several processes: wait for all, then shut the process group down before the interpreter exits
    (leaving it to exit can abort a process while the communication threads still run)."""
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _grade(args: argparse.Namespace) -> int:
    from selfdistill.grading import grade_file

    summary = grade_file(args.file, completion_field=args.completion_field, gold_field=args.gold_field,
                         out_path=args.out, timeout=args.timeout)
    print(f"accuracy {summary['accuracy']:.4f} ({summary['correct']}/{summary['n']})")
    print(f"verdicts: {summary['out_path']}")
    return 0


# Modules that add their own sub-commands: each defines `register(commands)`, where `commands` is the
# argparse sub-parser collection; the handler is set with `set_defaults(func=...)` and returns an exit
# code. Keep their top-level imports light: heavy imports belong inside the handlers.
COMMAND_MODULES: tuple[str, ...] = (
    "selfdistill.data.command", "selfdistill.demo", "selfdistill.evaluation.command", "selfdistill.study.cli"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfdistill", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="post-train a model with one of the objectives")
    train.add_argument("--config", help="YAML config (see configs/); defaults apply where it is silent")
    train.add_argument("--resume", help="run or checkpoint folder to continue from")
    train.add_argument("overrides", nargs="*", help="section.key=value, e.g. objective.name=opsd optim.steps=5")
    train.set_defaults(func=_train)

    grade = commands.add_parser("grade", help="grade a JSONL file of completions against gold answers")
    grade.add_argument("file")
    grade.add_argument("--completion-field", required=True)
    grade.add_argument("--gold-field", required=True)
    grade.add_argument("--out", help="verdicts JSONL (default: <file stem>.graded.jsonl)")
    grade.add_argument("--timeout", type=float, default=5.0, help="seconds per completion")
    grade.set_defaults(func=_grade)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command != "data":  # only `data fetch` goes to the Hub; nothing else may reach it by accident
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # peft asks transformers for a renamed attribute; the warning is not the user's to act on
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from selfdistill.config import ConfigError

    try:
        code = args.func(args)
    except (ConfigError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        code = 2
    sys.exit(code)
