"""`selfdistill data fetch` and `selfdistill data list` (argparse only at import time)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def _fetch(args: argparse.Namespace) -> int:
    from selfdistill.data.fetch import FetchError, fetch

    names = None if args.benchmarks is None else [n.strip() for n in args.benchmarks.split(",") if n.strip()]
    try:
        dest = fetch(names, args.dest, log=lambda message: print(message, flush=True))
    except (FetchError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"benchmarks in {dest}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from selfdistill.data.fetch import list_data

    print(list_data(args.root))
    return 0


def register(commands: Any) -> None:
    """Add `data fetch` and `data list` to an argparse sub-parser collection."""
    data = commands.add_parser("data", help="fetch the benchmarks from the Hugging Face Hub; list what is where")
    actions = data.add_subparsers(dest="data_command", required=True)
    fetch = actions.add_parser(
        "fetch", help="download the benchmarks from the Hugging Face Hub and write them where the loaders look",
        description="Download the seven benchmarks (or --benchmarks) from the Hugging Face Hub, check each "
        "split's row count, and write <dest>/<benchmark>/<split>.jsonl with a manifest of SHA-256 checksums. "
        "Nothing is written unless every download and check succeeds.")
    fetch.add_argument("--benchmarks", help="comma-separated (default: all: aime24, aime25, amc23, math500, "
                       "minerva_math, olympiadbench, gsm8k)")
    fetch.add_argument("--dest", help="folder to write (default: the fetch cache, ~/.cache/selfdistill/data "
                       "or $SELFDISTILL_CACHE/data, where the loaders look last)")
    fetch.set_defaults(func=_fetch)
    listing = actions.add_parser("list", help="where the loaders look, and which benchmark files each folder holds")
    listing.add_argument("--root", help="a folder to show first, as given to --data-root")
    listing.set_defaults(func=_list)
