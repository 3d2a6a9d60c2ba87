"""Procedurally generated math problems with worked solutions, reproducible from a seed.

Two task families, each a function returning a list of `Problem`:

- `arithmetic_word_problems`: one- and two-step word problems in plain English ("Tom has 7
  apples. He buys 5 more. ...") pitched at a 135M-parameter instruct model.
- `operation_chains`: a start value and a chain of 3-6 operations in a compact format, the study
  task for a tiny model trained from scratch. Its worked solutions have forced tokens (each step's
  arithmetic, the format) and genuine choices: a commutative block such as "Add 3, 5 and 9." may
  be summed in any order, and the worked solution picks one order at random.
- `search_checks`: find which of a few listed candidates x satisfies a short operation chain
  modulo 10 ("Start with x. Multiply by 3. Add 4. The result is 7."). The worked solution is a
  search: try a candidate, check it line by line, and on a failed check say "wait" and try another.
  The order of the candidates is the free choice; every check line is verifiable arithmetic.

Every generator draws from its own `random.Random(seed)` (never the global state), returns
problems with distinct texts, and numbers them `f"{task}-{seed}-{i}"`. `make_splits` cuts one
such stream into a held-out prefix and a training remainder, so the two never share a problem text.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from selfdistill.data.benchmarks import Problem
from selfdistill.evaluation.metrics import EPISTEMIC_MARKERS

ARITHMETIC_WORD_PROBLEMS = "arithmetic_word_problems"
NUMBER_SUMS = "number_sums"
OPERATION_CHAINS = "operation_chains"
SEARCH_CHECKS = "search_checks"

# Draws that may be spent per requested problem before a generator gives up finding distinct texts.
_DRAWS_PER_PROBLEM = 20
_EXTRA_DRAWS = 200


def _check_count(n: int, name: str = "n") -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {n!r}")


def _distinct_problems(task: str, n: int, seed: int, draw: Callable[[], tuple[str, str, str]]) -> list[Problem]:
    """Call `draw() -> (problem, solution, answer)` until `n` distinct problem texts are found.

    Repeated texts are skipped (the draw still advances the seeded stream, so the result is a pure
    function of the seed). Raises ValueError when the task's options allow too few distinct problems.
    """
    _check_count(n)
    problems: list[Problem] = []
    seen_texts: set[str] = set()
    max_draws = _DRAWS_PER_PROBLEM * n + _EXTRA_DRAWS
    draws = 0
    while len(problems) < n:
        if draws == max_draws:
            raise ValueError(
                f"{task}: found only {len(problems)} distinct problems in {draws} draws, {n} requested; "
                "widen the task's options (more steps, larger values) or ask for fewer problems"
            )
        draws += 1
        text, solution, answer = draw()
        if text in seen_texts:
            continue
        seen_texts.add(text)
        problems.append(
            Problem(id=f"{task}-{seed}-{len(problems)}", problem=text, answer=answer, solution=solution, source=task)
        )
    return problems


# --------------------------------------------------------------------------------------------
# Arithmetic word problems


@dataclass(frozen=True)
class _Person:
    name: str
    subject: str  # "He" / "She"


@dataclass(frozen=True)
class _Item:
    plural: str
    edible: bool


_HE_NAMES = ("Tom", "Ben", "Sam", "Leo", "Omar", "Ravi", "Kenji", "Max")
_SHE_NAMES = ("Anna", "Lily", "Mia", "Emma", "Zoe", "Sara", "Lucia", "Nina")
_PEOPLE = tuple(_Person(name, "He") for name in _HE_NAMES) + tuple(_Person(name, "She") for name in _SHE_NAMES)
_EDIBLE_ITEMS = ("apples", "oranges", "cookies", "candies", "carrots")
_OTHER_ITEMS = ("pencils", "stickers", "marbles", "books", "coins", "cards", "shells", "balloons", "stamps")
_ITEMS = tuple(_Item(plural, True) for plural in _EDIBLE_ITEMS) + tuple(_Item(plural, False) for plural in _OTHER_ITEMS)
_CONTAINERS = ("bags", "boxes", "baskets", "packs", "jars")

# Clauses in the third person present; {n} is the operand, {friend} another person's name.
_GAIN_CLAUSES = ("buys {n} more", "finds {n} more", "gets {n} more from {friend}", "wins {n} more")
_LOSS_CLAUSES = ("gives {n} to {friend}", "loses {n}", "sells {n}")
_EDIBLE_LOSS_CLAUSES = ("eats {n}",)
_ITEM_LOSS_CLAUSES = ("gives away {n}",)

_GROUPS_PROBABILITY = 1 / 3  # share of two-step problems that open with a multiplication
_MAX_GROUPS = 5  # the small multiplier: at most 5 bags / boxes / ...
_MAX_GROUP_SIZE = 10


def _arithmetic_word_problem(rng: random.Random, n_steps: int, max_value: int) -> tuple[str, str, str]:
    """One word problem with `n_steps` arithmetic steps: (problem, worked solution, answer).

    A two-step problem may open with "N containers with M items in each" (a multiplication by a
    small N); every other step adds or subtracts an operand of at most `max_value`, never going
    below zero.
    """
    person = rng.choice(_PEOPLE)
    friend = rng.choice([other for other in _PEOPLE if other != person])
    item = rng.choice(_ITEMS)
    pronoun = person.subject.lower()

    problem_sentences: list[str] = []
    solution_sentences: list[str] = []
    additive_steps = n_steps
    if n_steps == 2 and rng.random() < _GROUPS_PROBABILITY:
        groups = rng.randint(2, min(_MAX_GROUPS, max_value))
        group_size = rng.randint(2, min(_MAX_GROUP_SIZE, max_value))
        container = rng.choice(_CONTAINERS)
        total = groups * group_size
        problem_sentences.append(f"{person.name} has {groups} {container} with {group_size} {item.plural} in each.")
        solution_sentences.append(
            f"{person.name} has {groups} {container} of {group_size} {item.plural}, "
            f"so {groups} * {group_size} = {total}."
        )
        additive_steps -= 1
    else:
        total = rng.randint(2, max_value)
        problem_sentences.append(f"{person.name} has {total} {item.plural}.")
        solution_sentences.append(f"{person.name} starts with {total} {item.plural}.")

    operator = "+"
    for step in range(additive_steps):
        operator = "-" if total > 0 and rng.random() < 0.5 else "+"
        if operator == "+":
            operand = rng.randint(1, max_value)
            clauses = _GAIN_CLAUSES
            new_total = total + operand
        else:
            operand = rng.randint(1, min(total, max_value))
            clauses = _LOSS_CLAUSES + (_EDIBLE_LOSS_CLAUSES if item.edible else _ITEM_LOSS_CLAUSES)
            new_total = total - operand
        clause = rng.choice(clauses).format(n=operand, friend=friend.name)
        subject = person.subject if step == 0 else f"Then {pronoun}"
        problem_sentences.append(f"{subject} {clause}.")
        solution_sentences.append(f"{subject} {clause}, so {total} {operator} {operand} = {new_total}.")
        total = new_total

    ending = rng.choice(("now", "left") if operator == "-" else ("now", "in total"))
    problem_sentences.append(f"How many {item.plural} does {person.name} have {ending}?")
    solution_sentences.append(f"The answer is \\boxed{{{total}}}.")
    return " ".join(problem_sentences), " ".join(solution_sentences), str(total)


def arithmetic_word_problems(n: int, *, seed: int, steps: Iterable[int] = (1, 2), max_value: int = 20) -> list[Problem]:
    """`n` distinct one- and two-step arithmetic word problems with worked solutions.

    Each problem names a person, an object and verbs drawn from small lists, e.g. "Tom has 7
    apples. He buys 5 more. How many apples does Tom have now?", solved as "Tom starts with 7
    apples. He buys 5 more, so 7 + 5 = 12. The answer is \\boxed{12}." with answer "12".

    steps: the allowed numbers of arithmetic steps (the difficulty), a subset of {1, 2}; each
        problem draws one uniformly. One-step problems add or subtract; two-step problems chain
        two of those, or open with a multiplication by a small number (2-5 groups of a few items).
    max_value: bound on every operand in the text (start value, amounts added or taken away,
        group count and size); at least 2. Results are non-negative integers.
    """
    allowed_steps = sorted(set(steps))
    if not allowed_steps or any(s not in (1, 2) for s in allowed_steps):
        raise ValueError(f"steps must be a non-empty subset of (1, 2), got {tuple(steps)!r}")
    if isinstance(max_value, bool) or not isinstance(max_value, int) or max_value < 2:
        raise ValueError(f"max_value must be an integer of at least 2, got {max_value!r}")
    rng = random.Random(seed)
    return _distinct_problems(
        ARITHMETIC_WORD_PROBLEMS,
        n,
        seed,
        lambda: _arithmetic_word_problem(rng, rng.choice(allowed_steps), max_value),
    )


# --------------------------------------------------------------------------------------------
# Sums of a few numbers


def _number_sum(rng: random.Random, terms: int, max_value: int) -> tuple[str, str, str]:
    operands = [rng.randint(1, max_value) for _ in range(terms)]
    steps, total = [], operands[0]
    for operand in operands[1:]:
        steps.append(f"{total} + {operand} = {total + operand}")
        total += operand
    problem = f"What is {' + '.join(map(str, operands))}?"
    solution = ", then ".join(steps) + f". The answer is \\boxed{{{total}}}."
    return problem, solution[0].upper() + solution[1:], str(total)


def number_sums(n: int, *, seed: int, terms: Iterable[int] = (2, 3), max_value: int = 20) -> list[Problem]:
    """`n` distinct sums such as "What is 12 + 7 + 5?", solved as "12 + 7 = 19, then 19 + 5 = 24.
    The answer is \\boxed{24}." — the easiest task here, for the smallest pretrained models.

    terms: the allowed numbers of terms (each at least 2); max_value: the largest term (terms are >= 1).
    """
    allowed_terms = sorted(set(terms))
    if not allowed_terms or any(isinstance(t, bool) or not isinstance(t, int) or t < 2 for t in allowed_terms):
        raise ValueError(f"terms must be integers of at least 2, got {tuple(terms)!r}")
    if isinstance(max_value, bool) or not isinstance(max_value, int) or max_value < 1:
        raise ValueError(f"max_value must be a positive integer, got {max_value!r}")
    rng = random.Random(seed)
    return _distinct_problems(NUMBER_SUMS, n, seed, lambda: _number_sum(rng, rng.choice(allowed_terms), max_value))


# --------------------------------------------------------------------------------------------
# Operation chains

_OPERATOR_WORDS = {"+": "Add", "-": "Subtract", "*": "Multiply by"}
_UNBOUNDED_CEILING = 99  # without a modulus every value stays in 0..99
_MAX_START = 20
_MAX_ADDEND = 20  # operands of "+" and "-"
_MAX_FACTOR = 5  # operands of "*" are 2..5
_MAX_BLOCK_SIZE = 3
_BLOCK_DRAW_TRIES = 20


def _apply(value: int, operator: str, operand: int, modulus: int | None) -> int:
    """`value operator operand`, reduced modulo `modulus` unless it is None."""
    if operator == "+":
        result = value + operand
    elif operator == "-":
        result = value - operand
    else:
        result = value * operand
    return result % modulus if modulus is not None else result


@dataclass(frozen=True)
class ChainInstruction:
    """One instruction of an operation chain: an operator and its operand(s).

    Several operands (only for "+" and "-") form a commutative block, "Add 3, 5 and 9.", that
    the worked solution may apply in any order; each operand is one step of the chain.
    """

    operator: str
    operands: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.operator not in _OPERATOR_WORDS:
            raise ValueError(f"operator must be one of {sorted(_OPERATOR_WORDS)}, got {self.operator!r}")
        if not self.operands:
            raise ValueError("an instruction needs at least one operand")
        if self.operator == "*" and len(self.operands) != 1:
            raise ValueError("a multiplication takes exactly one operand")

    @property
    def is_block(self) -> bool:
        """Whether the operands may be applied in several orders."""
        return len(self.operands) > 1

    def text(self) -> str:
        """The instruction as a sentence: "Multiply by 2.", "Add 3 and 5.", "Subtract 1, 4 and 2."."""
        numbers = [str(operand) for operand in self.operands]
        listed = numbers[0] if len(numbers) == 1 else f"{', '.join(numbers[:-1])} and {numbers[-1]}"
        return f"{_OPERATOR_WORDS[self.operator]} {listed}."


@dataclass(frozen=True)
class ChainStep:
    """One line of a worked solution, `left operator right = result`.

    free_choice: True where `right` was one of several operands that were valid at this point (an
    early step of a commutative block); False where the step is forced by the problem and the
    steps before it (a single operation, or the last operand left in a block).
    """

    left: int
    operator: str
    right: int
    result: int
    free_choice: bool

    def line(self) -> str:
        return f"{self.left}{self.operator}{self.right}={self.result}"


@dataclass(frozen=True)
class OperationChain:
    """A start value and a sequence of instructions; with a modulus, all arithmetic is modulo it.

    Without a modulus the sampler keeps every value in 0..99 in any order of a block; this class
    checks that values never go negative.
    """

    start: int
    instructions: tuple[ChainInstruction, ...]
    modulus: int | None = None

    def __post_init__(self) -> None:
        if self.modulus is not None and self.modulus < 2:
            raise ValueError(f"modulus must be at least 2, got {self.modulus}")
        if self.modulus is None and self.start < 0:
            raise ValueError(f"start must be non-negative, got {self.start}")
        value = self.start
        for instruction in self.instructions:
            if self.modulus is None and instruction.operator == "-" and sum(instruction.operands) > value:
                raise ValueError(f"{instruction.text()!r} takes {value} below zero")
            for operand in instruction.operands:
                value = self.apply(value, instruction.operator, operand)

    @property
    def length(self) -> int:
        """The number of arithmetic steps (solution lines before the boxed answer): the difficulty."""
        return sum(len(instruction.operands) for instruction in self.instructions)

    def apply(self, value: int, operator: str, operand: int) -> int:
        """`value operator operand`, reduced modulo the modulus when there is one."""
        return _apply(value, operator, operand, self.modulus)

    @property
    def result(self) -> int:
        """The final value (the same for every order of every block)."""
        value = self.start
        for instruction in self.instructions:
            for operand in instruction.operands:
                value = self.apply(value, instruction.operator, operand)
        return value

    def problem_text(self) -> str:
        """E.g. "Start with 4. Add 7. Multiply by 2. Add 3 and 5. What is the result?"."""
        parts = [f"Work modulo {self.modulus}."] if self.modulus is not None else []
        parts.append(f"Start with {self.start}.")
        parts.extend(instruction.text() for instruction in self.instructions)
        parts.append("What is the result?")
        return " ".join(parts)

    def worked_steps(self, rng: random.Random) -> list[ChainStep]:
        """The solution's steps, applying each block's operands in an order drawn from `rng`."""
        steps: list[ChainStep] = []
        value = self.start
        for instruction in self.instructions:
            order = list(instruction.operands)
            rng.shuffle(order)
            for position, operand in enumerate(order):
                result = self.apply(value, instruction.operator, operand)
                free_choice = position < len(order) - 1
                steps.append(ChainStep(value, instruction.operator, operand, result, free_choice))
                value = result
        return steps

    @staticmethod
    def solution_text(steps: list[ChainStep]) -> str:
        """One line per step, then the boxed final value: "4+7=11\\n11*2=22\\n\\boxed{22}"."""
        if not steps:
            raise ValueError("a solution needs at least one step")
        return "\n".join([step.line() for step in steps] + [f"\\boxed{{{steps[-1].result}}}"])


def _distinct_operands(
    rng: random.Random, count: int, largest: int, total_budget: int | None
) -> tuple[int, ...] | None:
    """`count` distinct operands in 1..largest summing to at most `total_budget` (None: no limit).

    Returns None when no such draw is found, so the caller falls back to a single operation.
    """
    if largest < count:
        return None
    if total_budget is not None and total_budget < count * (count + 1) // 2:
        return None
    for _ in range(_BLOCK_DRAW_TRIES):
        operands = tuple(rng.sample(range(1, largest + 1), count))
        if total_budget is None or sum(operands) <= total_budget:
            return operands
    return None


def _block_instruction(rng: random.Random, value: int, remaining: int, modulus: int | None) -> ChainInstruction | None:
    """A commutative "+" or "-" block of 2..3 distinct operands, or None if none fits at `value`."""
    size = rng.randint(2, min(_MAX_BLOCK_SIZE, remaining))
    if modulus is not None:
        operator = rng.choice("+-")
        operands = _distinct_operands(rng, size, min(_MAX_ADDEND, modulus - 1), None)
    else:
        headroom = {"+": _UNBOUNDED_CEILING - value, "-": value}
        operator = rng.choice([op for op, room in headroom.items() if room >= size * (size + 1) // 2] or ["+"])
        operands = _distinct_operands(rng, size, _MAX_ADDEND, headroom[operator])
    return ChainInstruction(operator, operands) if operands is not None else None


def _single_instruction(rng: random.Random, value: int, modulus: int | None) -> ChainInstruction:
    """One "+", "-" or "*" operation valid at `value` (no result outside 0..99 without a modulus)."""
    ceiling = modulus - 1 if modulus is not None else _UNBOUNDED_CEILING
    feasible: list[str] = []
    if modulus is not None or value < ceiling:
        feasible.append("+")
    if modulus is not None or value > 0:
        feasible.append("-")
    if value > 0 and (modulus is not None or 2 * value <= ceiling):
        feasible.append("*")
    operator = rng.choice(feasible)
    if operator == "*":
        largest = min(_MAX_FACTOR, ceiling) if modulus is not None else min(_MAX_FACTOR, ceiling // value)
        return ChainInstruction("*", (rng.randint(2, largest),))
    if modulus is not None:
        largest = min(_MAX_ADDEND, modulus - 1)
    else:
        largest = min(_MAX_ADDEND, ceiling - value if operator == "+" else value)
    return ChainInstruction(operator, (rng.randint(1, largest),))


def sample_operation_chain(
    rng: random.Random, *, length: int, modulus: int | None = None, block_probability: float = 0.4
) -> OperationChain:
    """Draw a chain of exactly `length` steps from `rng`.

    At each point, with probability `block_probability` (and at least two steps left) the next
    instruction is a commutative block of 2-3 distinct operands; otherwise a single add (1..20),
    subtract (1..20) or multiply (2..5). Without a modulus, operands are drawn so that every value,
    in every order of a block, stays in 0..99; with one, values are reduced modulo it.
    """
    if length < 1:
        raise ValueError(f"length must be at least 1, got {length}")
    if modulus is not None and not 3 <= modulus <= 100:
        raise ValueError(f"modulus must lie in 3..100 (numbers stay below 100), got {modulus}")
    if not 0.0 <= block_probability <= 1.0:
        raise ValueError(f"block_probability must lie in [0, 1], got {block_probability}")
    value = rng.randint(0, modulus - 1) if modulus is not None else rng.randint(1, _MAX_START)
    start = value
    instructions: list[ChainInstruction] = []
    remaining = length
    while remaining > 0:
        instruction = None
        if remaining >= 2 and rng.random() < block_probability:
            instruction = _block_instruction(rng, value, remaining, modulus)
        if instruction is None:
            instruction = _single_instruction(rng, value, modulus)
        instructions.append(instruction)
        remaining -= len(instruction.operands)
        for operand in instruction.operands:
            value = _apply(value, instruction.operator, operand, modulus)
    return OperationChain(start, tuple(instructions), modulus)


def _length_range(length: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(length, int) and not isinstance(length, bool):
        shortest = longest = length
    else:
        shortest, longest = length
    if not 1 <= shortest <= longest:
        raise ValueError(f"length must be a positive int or a range (min, max) with 1 <= min <= max, got {length!r}")
    return shortest, longest


def operation_chains(
    n: int,
    *,
    seed: int,
    length: int | tuple[int, int] = (3, 6),
    modulus: int | None = None,
    block_probability: float = 0.4,
) -> list[Problem]:
    """`n` distinct operation-chain problems with one-line-per-step worked solutions.

    Problem: "Start with 4. Add 7. Multiply by 2. Add 3, 5 and 9. What is the result?"; solution:
    "4+7=11\\n11*2=22\\n22+9=31\\n31+3=34\\n34+5=39\\n\\boxed{39}"; answer "39". A block ("Add 3, 5
    and 9.") is applied in an order drawn at random for each problem, so a model trained on the
    solutions faces a real choice at those steps and none elsewhere (see `ChainStep.free_choice`).

    length: the number of steps (solution lines), the difficulty: an int, or an inclusive range
        (min, max) from which each problem draws one uniformly. A block of k operands is k steps.
    modulus: None keeps all values in 0..99 by construction; an int in 3..100 makes all arithmetic
        modulo it (the problem says "Work modulo m.") and lets operations be drawn freely.
    block_probability: chance that an instruction (with two or more steps left) is a block.
    """
    shortest, longest = _length_range(length)
    rng = random.Random(seed)

    def draw() -> tuple[str, str, str]:
        chain = sample_operation_chain(
            rng, length=rng.randint(shortest, longest), modulus=modulus, block_probability=block_probability
        )
        return chain.problem_text(), OperationChain.solution_text(chain.worked_steps(rng)), str(chain.result)

    return _distinct_problems(OPERATION_CHAINS, n, seed, draw)


# --------------------------------------------------------------------------------------------
# Search with checks

SEARCH_MODULUS = 10
SEARCH_IN_DISTRIBUTION: dict[str, Any] = {"candidates": (2, 4), "length": (1, 2)}
"""Options of `search_checks` for training and the in-distribution held-out set."""
SEARCH_OUT_OF_DISTRIBUTION: dict[str, Any] = {"candidates": (5, 7), "length": (3, 4)}
"""Options of `search_checks` for the out-of-distribution set: more candidates to search through and
longer check lines than any in-distribution problem."""
SEARCH_MARKERS = ("wait",)
"""The epistemic marker that opens the line after a failed check (by default one word, so it is
forced; several words make the marker a second, inconsequential, choice)."""
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
            result = _apply(value, instruction.operator, operand, self.modulus)
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
        """One verified check: "try 5: 5*3=5, 5+4=9 no", or after a failed check "wait, try 8: ... yes"."""
        arithmetic = ", ".join(step.line() for step in self.check_steps(x))
        verdict = "yes" if self.passes(x) else "no"
        opening = f"{marker}, " if marker is not None else ""
        return f"{opening}try {x}: {arithmetic} {verdict}"

    def trace(self, order: Sequence[int], markers: Sequence[str]) -> str:
        """The search trace that tries `order` (listed, distinct, ending at the answer, which alone
        passes): one check line each, the i-th failed check followed by `markers[i]`, then the boxed
        answer."""
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
                x = _apply(x, instruction.operator, instruction.operands[0], modulus)
            images.append(x)
        answer = rng.randrange(modulus)
        decoys = [y for y in range(modulus) if images[y] != images[answer]]
        if len(decoys) >= candidates - 1:
            listed = tuple(sorted([answer, *rng.sample(decoys, candidates - 1)]))
            return SearchPuzzle(listed, operations, images[answer], modulus)
    raise ValueError(f"no puzzle with {candidates} candidates found in {_SEARCH_DRAW_TRIES} draws")


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
) -> list[Problem]:
    """`n` distinct search problems whose worked solutions try candidates until one checks out.

    Problem: "Work modulo 10. Start with x. Add 5. Multiply by 9. The result is 9. Which of 4, 6 and
    8 is x?"; solution (the student-format search trace; candidates tried in an order drawn at random):
    "try 8: 8+5=3, 3*9=7 no\\nwait, try 4: 4+5=9, 9*9=1 no\\nwait, try 6: 6+5=1, 1*9=9 yes\\n\\boxed{6}";
    answer "6". The number of failed checks is uniform in 0..k-1 for k candidates, and each failed
    check is followed by a marker. `SearchPuzzle.direct_solution()` is the search-free solution
    ("try 6: 6+5=1, 1*9=9 yes\\n\\boxed{6}"), the teacher's rich context (see
    `selfdistill.study.search_task.teacher_view`). `SEARCH_IN_DISTRIBUTION` and
    `SEARCH_OUT_OF_DISTRIBUTION` are the two configurations of the study.

    candidates: how many values are listed (the breadth of the search), an int or an inclusive range.
    length: operations per check (steps on each check line), an int or an inclusive range.
    modulus: all arithmetic is modulo it; 10 keeps every value one digit (one token of the tiny
        tokenizer). markers: the words that open the line after a failed check, drawn at random when
        several; each must be one of SPEC's epistemic markers (`EPISTEMIC_MARKERS`).
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
    rng = random.Random(seed)

    def draw() -> tuple[str, str, str]:
        puzzle = sample_search_puzzle(
            rng, candidates=rng.randint(low_k, high_k), length=rng.randint(low_len, high_len), modulus=modulus
        )
        order = list(puzzle.candidates)
        rng.shuffle(order)
        order = order[: order.index(puzzle.answer) + 1]
        failure_markers = [rng.choice(markers) for _ in order[:-1]]
        return puzzle.problem_text(), puzzle.trace(order, failure_markers), str(puzzle.answer)

    return _distinct_problems(SEARCH_CHECKS, n, seed, draw)


# --------------------------------------------------------------------------------------------
# Splits

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
    _check_count(n_train, "n_train")
    _check_count(n_eval, "n_eval")
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
