"""Is a study reproducible? Compare two study folders made by `selfdistill study` from empty caches.

    python bench/compare_studies.py runs/study-a runs/study-b
    python bench/compare_studies.py runs/study-a runs/study-b --ignore-run-keys

Prints, for `report.md`, every line that differs outside the two that must differ (the invocation's wall time and
the environment line with its time-dependent fields), and for every run's `eval.json` (the base, the tuning and
the claim runs) and `tuning.json`, whether they are equal once the measured durations (`*_seconds` keys) are left
out. `--ignore-run-keys` also leaves out each result's `key`, the cache hash of what decides the run: it covers
the library's knob defaults, so two studies made before and after a default changed differ in it even where
every run set its knobs explicitly (the tuning and tuned runs do). Exit status 0 when both reports and every
result agree, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

TIMING_LINES = ("Wall time of this invocation:", "Environment:")
"""Report lines that measure the machine, not the study: left out of the comparison."""


def without_durations(value: Any) -> Any:
    """`value` with every `*_seconds` key removed, at any depth."""
    if isinstance(value, dict):
        return {k: without_durations(v) for k, v in value.items() if not k.endswith("_seconds")}
    if isinstance(value, list):
        return [without_durations(v) for v in value]
    return value


def report_differences(a: Path, b: Path) -> list[str]:
    missing = [str(folder / "report.md") for folder in (a, b) if not (folder / "report.md").is_file()]
    if missing:
        return [f"report.md: no such file {', '.join(missing)} (an unfinished study?)"]
    keep = [[line for line in (folder / "report.md").read_text().splitlines() if not line.startswith(TIMING_LINES)]
            for folder in (a, b)]
    if len(keep[0]) != len(keep[1]):
        return [f"report.md: {len(keep[0])} vs {len(keep[1])} lines"]
    return [f"report.md: {x!r} vs {y!r}" for x, y in zip(*keep, strict=True) if x != y]


def result_files(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder) for p in [*folder.glob("**/eval.json"), folder / "tuning.json"] if p.exists())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--ignore-run-keys", action="store_true",
                        help="leave out each result's cache key (it hashes the library's knob defaults too)")
    args = parser.parse_args()
    report = report_differences(args.a, args.b)
    problems = list(report)
    files_a, files_b = result_files(args.a), result_files(args.b)
    if files_a != files_b:
        alone = sorted(set(files_a) ^ set(files_b))
        problems.append(f"result files in one folder only: {', '.join(map(str, alone))}")
    same = 0
    for name in sorted(set(files_a) & set(files_b)):
        x, y = (without_durations(json.loads((folder / name).read_text())) for folder in (args.a, args.b))
        if args.ignore_run_keys:
            for result in (x, y):
                result.pop("key", None)
        if x == y:
            same += 1
        else:
            problems.append(f"{name}: differs")
    left_out = "durations and run keys" if args.ignore_run_keys else "durations"
    print(f"{same} of {len(files_a)} result files equal ({left_out} left out); report.md: "
          f"{'differs' if report else 'equal'} outside its "
          f"timing lines")
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
