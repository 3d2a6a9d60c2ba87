"""Procedurally generated math problems with worked solutions, reproducible from a seed.

Three task families here, each a function returning a list of `Problem`:

- `arithmetic_word_problems`: one- and two-step word problems in plain English ("Tom has 7
  apples. He buys 5 more. ...") pitched at a 135M-parameter instruct model.
- `number_sums`: sums of a few numbers ("What is 12 + 7 + 5?"), for the smallest pretrained models.
- `operation_chains`: a start value and a chain of 3-6 operations in a compact format, the study
  task for a tiny model trained from scratch. Its worked solutions have forced tokens (each step's
  arithmetic, the format) and genuine choices: a commutative block such as "Add 3, 5 and 9." may
  be summed in any order, and the worked solution picks one order at random.

The fourth, `search_checks` (which listed candidate satisfies a chain of operations, solved by a
search with checks), is in `selfdistill.data.search`, built on the chains' instructions and steps;
`selfdistill.data.generated` names all four (`SYNTHETIC_TASKS`) and cuts one task's stream into
splits (`make_splits`).

Every generator draws from its own `random.Random(seed)` (never the global state), returns
problems with distinct texts (`distinct_problems`), and numbers them `f"{task}-{seed}-{i}"`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from selfdistill.data.benchmarks import Problem

ARITHMETIC_WORD_PROBLEMS = "arithmetic_word_problems"
NUMBER_SUMS = "number_sums"
OPERATION_CHAINS = "operation_chains"

# Draws that may be spent per requested problem before a generator gives up finding distinct texts.
_DRAWS_PER_PROBLEM = 20
_EXTRA_DRAWS = 200


def check_count(n: int, name: str = "n") -> None:
    """Raise ValueError unless `n` (a number of problems, called `name`) is a non-negative int."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {n!r}")


def distinct_problems(task: str, n: int, seed: int, draw: Callable[[], tuple[str, str, str]]) -> list[Problem]:
    """Call `draw() -> (problem, solution, answer)` until `n` distinct problem texts are found.

    Repeated texts are skipped (the draw still advances the seeded stream, so the result is a pure
    function of the seed). Raises ValueError when the task's options allow too few distinct problems.
    """
    check_count(n)
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
    return distinct_problems(
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
    return distinct_problems(NUMBER_SUMS, n, seed, lambda: _number_sum(rng, rng.choice(allowed_terms), max_value))


# --------------------------------------------------------------------------------------------
# Operation chains

_OPERATOR_WORDS = {"+": "Add", "-": "Subtract", "*": "Multiply by"}
_UNBOUNDED_CEILING = 99  # without a modulus every value stays in 0..99
_MAX_START = 20
_MAX_ADDEND = 20  # operands of "+" and "-"
_MAX_FACTOR = 5  # operands of "*" are 2..5
_MAX_BLOCK_SIZE = 3
_BLOCK_DRAW_TRIES = 20


def apply_operation(value: int, operator: str, operand: int, modulus: int | None) -> int:
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
        return apply_operation(value, operator, operand, self.modulus)

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
            value = apply_operation(value, instruction.operator, operand, modulus)
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

    return distinct_problems(OPERATION_CHAINS, n, seed, draw)
