"""The generated tasks by name, `SYNTHETIC_TASKS` (what `data.dataset: synthetic:<task>` names), and
`make_splits`, which cuts one task's seeded stream into a held-out prefix and a training remainder, so
the two never share a problem text. The generators are in `selfdistill.data.synthetic` and
`selfdistill.data.search`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from selfdistill.data.benchmarks import Problem
from selfdistill.data.search import SEARCH_CHECKS, search_checks
from selfdistill.data.synthetic import (
    ARITHMETIC_WORD_PROBLEMS,
    NUMBER_SUMS,
    OPERATION_CHAINS,
    arithmetic_word_problems,
    check_count,
    number_sums,
    operation_chains,
)

SYNTHETIC_TASKS: dict[str, Callable[..., list[Problem]]] = {
    ARITHMETIC_WORD_PROBLEMS: arithmetic_word_problems,
    NUMBER_SUMS: number_sums,
    OPERATION_CHAINS: operation_chains,
    SEARCH_CHECKS: search_checks,
}


def make_splits(
    task: str | Callable[..., list[Problem]], n_train: int, n_eval: int, seed: int, **task_options: Any
) -> tuple[list[Problem], list[Problem]]:
    """(train, eval) problems of one task, never sharing a problem text.

    Both come from one seeded stream of distinct problems: eval is its first `n_eval` problems and
    train the next `n_train`, so the eval set does not change when `n_train` does, and ids are
    unique across the two. task: a name in `SYNTHETIC_TASKS` or a generator with the signature
    `(n, *, seed, **options)`; task_options are passed to it (e.g. `length=(3, 4)`).
    """
    check_count(n_train, "n_train")
    check_count(n_eval, "n_eval")
    if isinstance(task, str):
        if task not in SYNTHETIC_TASKS:
            raise ValueError(f"unknown synthetic task {task!r}; known: {sorted(SYNTHETIC_TASKS)}")
        generate = SYNTHETIC_TASKS[task]
    else:
        generate = task
    stream = generate(n_eval + n_train, seed=seed, **task_options)
    held_out, train = stream[:n_eval], stream[n_eval:]
    shared = {problem.problem for problem in held_out} & {problem.problem for problem in train}
    if shared:  # only a custom generator that repeats texts can reach this
        raise ValueError(f"the generator repeated {len(shared)} problem texts; splits would overlap")
    return train, held_out
