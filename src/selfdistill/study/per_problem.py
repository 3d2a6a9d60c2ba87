"""Per-problem scores of one evaluation, the unit the pre-registered claims are judged on.

`per_problem_scores` turns the graded samples of a held-out split into `{metric: [one value per problem]}`, the
problems in the split's order, under the metric names of `study.preregistration`: "avg" (the problem's Avg@k:
the share of its k samples graded right) and "epistemic" (the share of its k samples with at least one E(y)
marker). A runner stacks one run per seed into the `[seeds, problems]` arrays that `preregistration.judge` reads.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from selfdistill.evaluation.metrics import epistemic_markers


def per_problem_scores(problems: Sequence[Any], records: Sequence[Any]) -> dict[str, list[float]]:
    """{"avg": [...], "epistemic": [...]}, one value per problem of `problems` (in their order), from its samples
    among `records` (`SampleRecord`s with `problem_id`, `correct` and `completion`). Raises ValueError when a
    problem has no sample."""
    by_problem: dict[str, list[Any]] = {}
    for record in records:
        by_problem.setdefault(record.problem_id, []).append(record)
    missing = [problem.id for problem in problems if problem.id not in by_problem]
    if missing:
        raise ValueError(f"no samples of the problems {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    samples = [by_problem[problem.id] for problem in problems]
    return {
        "avg": [statistics.fmean(float(r.correct) for r in group) for group in samples],
        "epistemic": [statistics.fmean(float(epistemic_markers(r.completion) > 0) for r in group) for group in samples],
    }
