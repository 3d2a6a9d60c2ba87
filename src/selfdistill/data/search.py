"""The `search_checks` task: find which of a few listed candidates x satisfies a short operation
chain modulo 10 ("Start with x. Multiply by 3. Add 4. The result is 7."). The worked solution is a
search: try a candidate, check it on one line that ends by setting the value reached beside the target
("... 5+4=9 vs 7 no"), and after a failed check try another, sometimes saying "wait" first (the
epistemic marker is optional: the writer chooses whether to verbalize doubt). The order of the
candidates is the free choice; every check line is verifiable arithmetic.

The puzzle (`SearchPuzzle`, drawn by `sample_search_puzzle`) is built from the operation chains'
instructions and steps (`selfdistill.data.synthetic`); `search_checks` renders puzzles as problems.
`SEARCH_IN_DISTRIBUTION`, `SEARCH_OOD_BREADTH` and `SEARCH_OOD_DEPTH` are the study's three
configurations; its readers and analysers are in `selfdistill.study.search_task`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from selfdistill.data.benchmarks import Problem
from selfdistill.data.markers import EPISTEMIC_MARKERS
from selfdistill.data.synthetic import ChainInstruction, ChainStep, apply_operation, distinct_problems

SEARCH_CHECKS = "search_checks"
SEARCH_MODULUS = 10
SEARCH_IN_DISTRIBUTION: dict[str, Any] = {"candidates": (2, 4), "length": (1, 2)}
"""Options of `search_checks` for training and the in-distribution held-out set."""
SEARCH_OOD_BREADTH: dict[str, Any] = {"candidates": (5, 6), "length": (1, 2)}
"""Out of distribution in breadth: more candidates to search through than any in-distribution problem,
check lines as long as in distribution."""
SEARCH_OOD_DEPTH: dict[str, Any] = {"candidates": (2, 4), "length": (3, 3)}
"""Out of distribution in depth: as many candidates as in distribution, longer check lines than any
in-distribution problem."""
SEARCH_MARKERS = ("wait",)
"""The epistemic marker that may open the line after a failed check (one word by default; several
words make the marker's wording a second, inconsequential, choice)."""
SEARCH_MARKER_RATE = 1.0
"""Default chance that the line after a failed check opens with a marker (the study uses 0.5, so that
saying it is the model's choice)."""
_SEARCH_DRAW_TRIES = 50


@dataclass(frozen=True)
class SearchPuzzle:
    """"Which of these candidates is x?", where x sent through a chain of operations gives `target`.

    candidates: distinct values in 0..modulus-1, listed in increasing order. operations: single-operand
    instructions ("Multiply by 3.", "Add 4."), applied to x in turn, modulo `modulus`. Exactly one
    candidate reaches `target` (other values outside the list may; they are not asked about).
    """

    candidates: tuple[int, ...]
    operations: tuple[ChainInstruction, ...]
    target: int
    modulus: int = SEARCH_MODULUS

    def __post_init__(self) -> None:
        if self.modulus < 2:
            raise ValueError(f"modulus must be at least 2, got {self.modulus}")
        if len(self.candidates) < 2 or len(set(self.candidates)) != len(self.candidates):
            raise ValueError(f"candidates must be at least two distinct values, got {self.candidates}")
        if list(self.candidates) != sorted(self.candidates):
            raise ValueError(f"candidates must be listed in increasing order, got {self.candidates}")
        if not all(0 <= c < self.modulus for c in self.candidates):
            raise ValueError(f"candidates must lie in 0..{self.modulus - 1}, got {self.candidates}")
        if not self.operations or any(instruction.is_block for instruction in self.operations):
            raise ValueError("a search puzzle needs at least one operation, each with a single operand")
        if not 0 <= self.target < self.modulus:
            raise ValueError(f"target must lie in 0..{self.modulus - 1}, got {self.target}")
        solutions = [c for c in self.candidates if self.value(c) == self.target]
        if len(solutions) != 1:
            raise ValueError(f"exactly one candidate must reach {self.target}; these do: {solutions}")

    def check_steps(self, x: int) -> list[ChainStep]:
        """The arithmetic of checking candidate `x`: one `left op right = result` step per operation."""
        steps = []
        value = x
        for instruction in self.operations:
            operand = instruction.operands[0]
            result = apply_operation(value, instruction.operator, operand, self.modulus)
            steps.append(ChainStep(value, instruction.operator, operand, result, free_choice=False))
            value = result
        return steps

    def value(self, x: int) -> int:
        """Where `x` ends after the operations."""
        return self.check_steps(x)[-1].result

    def passes(self, x: int) -> bool:
        return self.value(x) == self.target

    @property
    def answer(self) -> int:
        """The one candidate that passes."""
        return next(c for c in self.candidates if self.passes(c))

    @property
    def length(self) -> int:
        """Operations per check (arithmetic steps on each check line)."""
        return len(self.operations)

    def problem_text(self) -> str:
        """E.g. "Work modulo 10. Start with x. Multiply by 3. Add 4. The result is 7. Which of 2, 5, 8
        and 9 is x?"."""
        numbers = [str(c) for c in self.candidates]
        listed = f"{', '.join(numbers[:-1])} and {numbers[-1]}"
        parts = [f"Work modulo {self.modulus}.", "Start with x."]
        parts.extend(instruction.text() for instruction in self.operations)
        parts.append(f"The result is {self.target}.")
        parts.append(f"Which of {listed} is x?")
        return " ".join(parts)

    def check_line(self, x: int, marker: str | None = None) -> str:
        """One verified check: "try 5: 5*3=5, 5+4=9 vs 7 no" (the value reached beside the target, then the
        verdict), or after a failed check "wait, try 8: ... vs 7 yes" when a marker opens it."""
        arithmetic = ", ".join(step.line() for step in self.check_steps(x))
        verdict = "yes" if self.passes(x) else "no"
        opening = f"{marker}, " if marker is not None else ""
        return f"{opening}try {x}: {arithmetic} vs {self.target} {verdict}"

    def trace(self, order: Sequence[int], markers: Sequence[str | None]) -> str:
        """The search trace that tries `order` (listed, distinct, ending at the answer, which alone
        passes): one check line each, the line after the i-th failed check opened by `markers[i]` (None:
        no marker), then the boxed answer."""
        if not order or order[-1] != self.answer:
            raise ValueError(f"the order must end at the answer {self.answer}, got {list(order)}")
        if len(set(order)) != len(order) or not set(order) <= set(self.candidates):
            raise ValueError(f"the order must try distinct listed candidates, got {list(order)}")
        if len(markers) != len(order) - 1:
            raise ValueError(f"{len(order) - 1} failed checks need as many markers, got {len(markers)}")
        lines = [self.check_line(x, None if i == 0 else markers[i - 1]) for i, x in enumerate(order)]
        return "\n".join([*lines, f"\\boxed{{{self.answer}}}"])

    def direct_solution(self) -> str:
        """The worked solution that skips the search: the answer's check line and the boxed answer."""
        return self.trace([self.answer], [])


def _search_operation(rng: random.Random, modulus: int) -> ChainInstruction:
    operator = rng.choice("+-*")
    low = 2 if operator == "*" else 1
    return ChainInstruction(operator, (rng.randint(low, modulus - 1),))


def sample_search_puzzle(
    rng: random.Random, *, candidates: int, length: int, modulus: int = SEARCH_MODULUS
) -> SearchPuzzle:
    """Draw a puzzle with `candidates` listed values and `length` operations from `rng`.

    Operations are "+" or "-" by 1..m-1 or "*" by 2..m-1 (m the modulus), drawn uniformly. The answer
    is drawn uniformly from 0..m-1 and the other candidates from the values that do not reach the
    same target; operations that leave too few such values (e.g. "Multiply by 5." modulo 10 sends
    every value to 0 or 5) are drawn again.
    """
    if not 2 <= candidates <= modulus:
        raise ValueError(f"candidates must lie in 2..{modulus} (the modulus), got {candidates}")
    if length < 1:
        raise ValueError(f"length must be at least 1, got {length}")
    for _ in range(_SEARCH_DRAW_TRIES):
        operations = tuple(_search_operation(rng, modulus) for _ in range(length))
        images = []
        for x in range(modulus):
            for instruction in operations:
                x = apply_operation(x, instruction.operator, instruction.operands[0], modulus)
            images.append(x)
        answer = rng.randrange(modulus)
        decoys = [y for y in range(modulus) if images[y] != images[answer]]
        if len(decoys) >= candidates - 1:
            listed = tuple(sorted([answer, *rng.sample(decoys, candidates - 1)]))
            return SearchPuzzle(listed, operations, images[answer], modulus)
    raise ValueError(f"no puzzle with {candidates} candidates found in {_SEARCH_DRAW_TRIES} draws")


def draw_marker(rng: random.Random, markers: Sequence[str], marker_rate: float) -> str | None:
    """The opening of a line after a failed check: a marker drawn from `markers` with probability
    `marker_rate`, else None. Always two draws from `rng` when the rate is strictly between 0 and 1."""
    if marker_rate >= 1.0:
        return rng.choice(markers)
    if marker_rate <= 0.0:
        return None
    said = rng.random() < marker_rate
    marker = rng.choice(markers)
    return marker if said else None


def _int_range(value: int | tuple[int, int], name: str, minimum: int) -> tuple[int, int]:
    low, high = (value, value) if isinstance(value, int) and not isinstance(value, bool) else tuple(value)
    if not minimum <= low <= high:
        raise ValueError(f"{name} must be an int >= {minimum} or a range (min, max) with {minimum} <= min <= max, "
                         f"got {value!r}")
    return low, high


def search_checks(
    n: int,
    *,
    seed: int,
    candidates: int | tuple[int, int] = SEARCH_IN_DISTRIBUTION["candidates"],
    length: int | tuple[int, int] = SEARCH_IN_DISTRIBUTION["length"],
    modulus: int = SEARCH_MODULUS,
    markers: Sequence[str] = SEARCH_MARKERS,
    marker_rate: float = SEARCH_MARKER_RATE,
) -> list[Problem]:
    """`n` distinct search problems whose worked solutions try candidates until one checks out.

    Problem: "Work modulo 10. Start with x. Add 5. Multiply by 9. The result is 9. Which of 4, 6 and
    8 is x?"; solution (the student-format search trace; candidates tried in an order drawn at random):
    "try 8: 8+5=3, 3*9=7 vs 9 no\\nwait, try 4: 4+5=9, 9*9=1 vs 9 no\\ntry 6: 6+5=1, 1*9=9 vs 9 yes\\n\\boxed{6}";
    answer "6". The number of failed checks is uniform in 0..k-1 for k candidates, and the line after
    each failed check opens with a marker with probability `marker_rate`.
    `SearchPuzzle.direct_solution()` is the search-free solution ("try 6: 6+5=1, 1*9=9 vs 9 yes\\n
    \\boxed{6}"). `SEARCH_IN_DISTRIBUTION`, `SEARCH_OOD_BREADTH` and `SEARCH_OOD_DEPTH` are the study's
    configurations.

    candidates: how many values are listed (the breadth of the search), an int or an inclusive range.
    length: operations per check (steps on each check line), an int or an inclusive range.
    modulus: all arithmetic is modulo it; 10 keeps every value one digit (one token of the tiny
        tokenizer). markers: the words that may open the line after a failed check, drawn at random
        when several; each must be one of SPEC's epistemic markers (`EPISTEMIC_MARKERS`).
    marker_rate: the chance, in [0, 1], that a line after a failed check opens with a marker.
    """
    low_k, high_k = _int_range(candidates, "candidates", 2)
    low_len, high_len = _int_range(length, "length", 1)
    if isinstance(modulus, bool) or not isinstance(modulus, int) or not 3 <= modulus <= 100:
        raise ValueError(f"modulus must be an integer in 3..100, got {modulus!r}")
    if high_k > modulus:
        raise ValueError(f"at most {modulus} candidates fit modulo {modulus}, got {candidates!r}")
    markers = tuple(markers)
    if not markers or any(marker not in EPISTEMIC_MARKERS for marker in markers):
        raise ValueError(f"markers must be a non-empty choice from {EPISTEMIC_MARKERS}, got {markers!r}")
    if not 0.0 <= marker_rate <= 1.0:
        raise ValueError(f"marker_rate must lie in [0, 1], got {marker_rate!r}")
    rng = random.Random(seed)

    def draw() -> tuple[str, str, str]:
        puzzle = sample_search_puzzle(
            rng, candidates=rng.randint(low_k, high_k), length=rng.randint(low_len, high_len), modulus=modulus
        )
        order = list(puzzle.candidates)
        rng.shuffle(order)
        order = order[: order.index(puzzle.answer) + 1]
        failure_markers = [draw_marker(rng, markers, marker_rate) for _ in order[:-1]]
        return puzzle.problem_text(), puzzle.trace(order, failure_markers), str(puzzle.answer)

    return distinct_problems(SEARCH_CHECKS, n, seed, draw)
