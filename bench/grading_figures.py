"""Check the grader on the benchmark reference solutions and time it.

Prints four figures (each reference solution graded against its own answer and against the next
problem's answer, on MATH-500 and GSM8K test), then the throughput of the math-verify path on 1,000
completions with the exact-match fast path switched off (worker start-up included).

    python bench/grading_figures.py [--data-root DIR] [--workers N]

DIR defaults to $SELFDISTILL_DATA_ROOT, else ../shared/data/math beside the checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from selfdistill.grading import Grader

REPO = Path(__file__).resolve().parents[1]


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def gsm8k_gold(solution: str) -> str:
    """The number after the last '####' of a GSM8K solution, as written (commas kept)."""
    return solution.rsplit("####", 1)[1].strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_root = os.environ.get("SELFDISTILL_DATA_ROOT", str(REPO.parent / "shared" / "data" / "math"))
    parser.add_argument("--data-root", type=Path, default=Path(default_root))
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()

    math500 = read_jsonl(args.data_root / "math500" / "test.jsonl")
    gsm8k = read_jsonl(args.data_root / "gsm8k" / "test.jsonl")
    suites = {
        "MATH-500": ([r["solution"] for r in math500], [r["answer"] for r in math500]),
        "GSM8K": ([r["answer"] for r in gsm8k], [gsm8k_gold(r["answer"]) for r in gsm8k]),
    }
    with Grader(workers=args.workers) as grader:
        print(f"workers: {grader.num_workers}")
        for name, (solutions, golds) in suites.items():
            shifted = golds[1:] + golds[:1]
            for label, targets in (("own answer", golds), ("next problem's answer", shifted)):
                start = time.perf_counter()
                scores = grader.grade_many(solutions, targets)
                seconds = time.perf_counter() - start
                accuracy = sum(scores) / len(scores)
                print(f"{name:9s} solution vs {label:22s} {accuracy:7.2%}  (n={len(scores)}, {seconds:.2f} s)")

    # Throughput of the slow path: 1,000 distinct pairs, fast path off, a fresh pool (so no warm
    # caches and the worker start-up is included).
    solutions = [r["solution"] for r in math500] + [r["answer"] for r in gsm8k[:500]]
    golds = [r["answer"] for r in math500] + [gsm8k_gold(r["answer"]) for r in gsm8k[:500]]
    with Grader(workers=args.workers, fast_path=False) as grader:
        start = time.perf_counter()
        scores = grader.grade_many(solutions, golds)
        seconds = time.perf_counter() - start
        print(
            f"math-verify on every one of {len(scores)} completions (500 MATH-500 + 500 GSM8K): "
            f"{seconds:.2f} s, {len(scores) / seconds:.0f}/s, accuracy {sum(scores) / len(scores):.2%}"
        )
        print(f"pool events: {grader.stats}")


if __name__ == "__main__":
    main()
