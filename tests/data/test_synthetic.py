"""Synthetic tasks: seeded determinism, answers recomputed from the text, difficulty, splits, choice.

The checks re-read the rendered problem and solution with their own parsers and arithmetic, so a
generator that renders text and solution from different operations, or miscomputes, fails here.
"""

import itertools
import random
import re
from collections import Counter

import pytest

from selfdistill.data.benchmarks import Problem
from selfdistill.data.synthetic import (
    ChainInstruction,
    OperationChain,
    arithmetic_word_problems,
    number_sums,
    operation_chains,
    sample_operation_chain,
)
from selfdistill.grading import last_boxed
from tests.data.helpers import parse_chain_solution

WORD_EQUATION = re.compile(r"(\d+) ([+\-*]) (\d+) = (\d+)")


CHAIN_PROBLEM = re.compile(r"(?:Work modulo (\d+)\. )?Start with (\d+)\. (.+\.) What is the result\?")


CHAIN_INSTRUCTION = re.compile(r"(Add|Subtract|Multiply by) (\d+(?:, \d+)*(?: and \d+)?)")


OPERATOR_OF_WORD = {"Add": "+", "Subtract": "-", "Multiply by": "*"}


def compute(left: int, operator: str, right: int, modulus: int | None = None) -> int:
    value = {"+": left + right, "-": left - right, "*": left * right}[operator]
    return value % modulus if modulus else value


def parse_chain_problem(text: str) -> tuple[int | None, int, list[tuple[str, list[int]]]]:
    """(modulus, start, [(operator, operands in text order)]) read back from a problem's text."""
    match = CHAIN_PROBLEM.fullmatch(text)
    assert match, text
    modulus = int(match.group(1)) if match.group(1) else None
    instructions = []
    for sentence in match.group(3)[:-1].split(". "):
        parsed = CHAIN_INSTRUCTION.fullmatch(sentence)
        assert parsed, sentence
        instructions.append((OPERATOR_OF_WORD[parsed.group(1)], [int(x) for x in re.findall(r"\d+", parsed.group(2))]))
    return modulus, int(match.group(2)), instructions


def check_chain_problem(problem: Problem) -> list[list[int]]:
    """Assert the solution is a correct run of the problem's operations; return each block's order.

    The order of a block is the positions (in the text) of its operands, as the solution applied them.
    """
    modulus, start, instructions = parse_chain_problem(problem.problem)
    steps, boxed = parse_chain_solution(problem.solution)

    expected = start  # an independent interpreter of the text, in text order
    for operator, operands in instructions:
        for operand in operands:
            expected = compute(expected, operator, operand, modulus)
    assert problem.answer == boxed == str(expected)

    value = start
    remaining_steps = iter(steps)
    block_orders = []
    for operator, operands in instructions:
        applied = [next(remaining_steps) for _ in operands]
        for left, step_operator, right, result in applied:
            assert (left, step_operator) == (value, operator)
            assert result == compute(left, operator, right, modulus), (left, operator, right, result)
            assert 0 <= result <= 99
            value = result
        rights = [right for _, _, right, _ in applied]
        assert sorted(rights) == sorted(operands), "a step must use exactly the instruction's operands"
        if len(operands) > 1:
            block_orders.append([operands.index(right) for right in rights])
    assert next(remaining_steps, None) is None
    assert str(value) == problem.answer
    return block_orders


@pytest.mark.parametrize("generate", [arithmetic_word_problems, operation_chains])
def test_same_seed_same_problems_and_other_seed_other_problems(generate):
    first = generate(40, seed=3)
    assert first == generate(40, seed=3)
    other = generate(40, seed=4)
    assert len({p.problem for p in first} & {p.problem for p in other}) < 5
    assert generate(10, seed=3) == first[:10], "a longer request extends the same stream"


@pytest.mark.parametrize("generate", [arithmetic_word_problems, operation_chains])
def test_generators_do_not_touch_the_global_random_state(generate):
    random.seed(123)
    state = random.getstate()
    generate(20, seed=0)
    assert random.getstate() == state


def test_invalid_options_are_rejected():
    for bad in [
        lambda: arithmetic_word_problems(5, seed=0, steps=(3,)),
        lambda: arithmetic_word_problems(5, seed=0, steps=()),
        lambda: arithmetic_word_problems(5, seed=0, max_value=1),
        lambda: arithmetic_word_problems(-1, seed=0),
        lambda: operation_chains(5, seed=0, length=(0, 2)),
        lambda: operation_chains(5, seed=0, length=(5, 3)),
        lambda: operation_chains(5, seed=0, modulus=2),
        lambda: operation_chains(5, seed=0, modulus=101),
        lambda: operation_chains(5, seed=0, block_probability=1.5),
    ]:
        with pytest.raises(ValueError):
            bad()


def test_too_few_distinct_problems_raises_instead_of_repeating():
    # Length-1 chains starting at 1..20: fewer than 700 distinct problem texts exist.
    assert len(operation_chains(300, seed=0, length=1)) == 300
    with pytest.raises(ValueError, match="distinct problems"):
        operation_chains(1000, seed=0, length=1)


def word_equations(problem: Problem) -> list[tuple[int, str, int, int]]:
    return [(int(a), op, int(b), int(c)) for a, op, b, c in WORD_EQUATION.findall(problem.solution)]


def test_word_problem_solutions_recompute_from_the_problem_numbers():
    for problem in arithmetic_word_problems(300, seed=1):
        equations = word_equations(problem)
        assert equations
        for left, operator, right, result in equations:
            assert compute(left, operator, right) == result >= 0
        for previous, current in itertools.pairwise(equations):
            assert current[0] == previous[3], "each step continues from the previous result"
        assert problem.answer == str(equations[-1][3]) == last_boxed(problem.solution)
        # The numbers of the text, in order, are exactly the operands the solution uses.
        operands = [equations[0][0]] + [right for _, _, right, _ in equations]
        assert [int(x) for x in re.findall(r"\d+", problem.problem)] == operands
        assert problem.problem.endswith("?")
        assert problem.solution.startswith(problem.problem.split(" ")[0]), "the solution names the same person"


def test_word_problem_difficulty_and_value_bounds():
    one_step = arithmetic_word_problems(100, seed=2, steps=(1,))
    assert all(len(word_equations(p)) == 1 and "*" not in p.solution for p in one_step)
    two_step = arithmetic_word_problems(150, seed=2, steps=(2,))
    assert all(len(word_equations(p)) == 2 for p in two_step)
    multiplications = [p for p in two_step if word_equations(p)[0][1] == "*"]
    assert 20 <= len(multiplications) <= 80, "about a third open with a multiplication"
    assert all(2 <= word_equations(p)[0][0] <= 5 for p in multiplications), "multiplier is small"
    mixed = Counter(len(word_equations(p)) for p in arithmetic_word_problems(200, seed=2))
    assert set(mixed) == {1, 2} and min(mixed.values()) > 60
    for max_value in (3, 8, 20):
        for problem in arithmetic_word_problems(150, seed=5, max_value=max_value):
            assert max(int(x) for x in re.findall(r"\d+", problem.problem)) <= max_value
            assert int(problem.answer) >= 0


def test_word_problems_vary_names_objects_and_verbs():
    problems = arithmetic_word_problems(300, seed=4)
    names = {p.problem.split(" ")[0] for p in problems}
    objects = {re.search(r"How many (\w+)", p.problem).group(1) for p in problems}
    verbs = {re.search(r"(?:He|She) (\w+)", p.problem).group(1) for p in problems}
    assert len(names) >= 12 and len(objects) >= 10
    assert {"buys", "finds", "gives", "loses", "sells"} <= verbs
    assert {word_equations(p)[-1][1] for p in problems} == {"+", "-"}


def test_chain_solutions_are_correct_runs_of_the_problem_text():
    problems = operation_chains(400, seed=11)
    operators = Counter()
    for problem in problems:
        check_chain_problem(problem)
        operators.update(line[1] for line in parse_chain_solution(problem.solution)[0])
        assert len(problem.problem) + len(problem.solution) < 200
    assert min(operators[op] for op in "+-*") > 100


def test_chain_length_is_the_number_of_steps():
    lengths = Counter(len(parse_chain_solution(p.solution)[0]) for p in operation_chains(300, seed=0))
    assert set(lengths) == {3, 4, 5, 6} and min(lengths.values()) > 40
    assert {len(parse_chain_solution(p.solution)[0]) for p in operation_chains(50, seed=0, length=4)} == {4}
    assert {len(parse_chain_solution(p.solution)[0]) for p in operation_chains(50, seed=0, length=(7, 8))} == {7, 8}


def test_chains_with_a_modulus_compute_modulo_it():
    problems = operation_chains(200, seed=5, modulus=13, length=(3, 6))
    wrapped = 0
    for problem in problems:
        assert problem.problem.startswith("Work modulo 13. ")
        check_chain_problem(problem)
        for left, operator, right, result in parse_chain_solution(problem.solution)[0]:
            assert 0 <= result < 13
            wrapped += compute(left, operator, right) != result
        assert len(problem.problem) + len(problem.solution) < 200
    assert wrapped > 50, "the modulus is exercised, not just stated"


def test_block_order_is_a_real_choice_that_varies_across_problems():
    orders_by_size: dict[int, Counter] = {2: Counter(), 3: Counter()}
    problems = operation_chains(400, seed=9)
    with_block = 0
    for problem in problems:
        orders = check_chain_problem(problem)
        with_block += bool(orders)
        for order in orders:
            orders_by_size[len(order)][tuple(order)] += 1
    assert 0.3 * len(problems) < with_block < 0.95 * len(problems), "some problems have a choice, some do not"
    assert set(orders_by_size[2]) == {(0, 1), (1, 0)}
    assert len(orders_by_size[3]) == 6, "every order of a three-term block occurs"
    assert max(orders_by_size[2].values()) < 0.7 * sum(orders_by_size[2].values()), "no order dominates"
    assert all(check_chain_problem(p) == [] for p in operation_chains(50, seed=9, block_probability=0.0))


def test_only_block_steps_are_free_choices():
    rng = random.Random(0)
    chains = [sample_operation_chain(rng, length=6) for _ in range(100)]
    for chain in chains:
        renderings = [chain.worked_steps(random.Random(k)) for k in range(30)]
        assert {steps[-1].result for steps in renderings} == {chain.result}
        texts = {OperationChain.solution_text(steps) for steps in renderings}
        flags = [step.free_choice for step in renderings[0]]
        expected_flags = [i < len(ins.operands) - 1 for ins in chain.instructions for i in range(len(ins.operands))]
        assert flags == expected_flags
        if not any(ins.is_block for ins in chain.instructions):
            assert len(texts) == 1, "with no block the solution is fully forced"
            continue
        assert len(texts) > 1
        # Lines of single operations, and the value after each block, are the same in every rendering.
        boundaries = list(itertools.accumulate(len(ins.operands) for ins in chain.instructions))
        for steps in renderings[1:]:
            assert [steps[i - 1].result for i in boundaries] == [renderings[0][i - 1].result for i in boundaries]


def test_chain_instructions_validate_their_arithmetic():
    with pytest.raises(ValueError, match="multiplication"):
        ChainInstruction("*", (2, 3))
    with pytest.raises(ValueError, match="below zero"):
        OperationChain(5, (ChainInstruction("-", (3, 4)),))
    chain = OperationChain(4, (ChainInstruction("+", (7,)), ChainInstruction("*", (2,)), ChainInstruction("-", (5, 1))))
    assert chain.problem_text() == "Start with 4. Add 7. Multiply by 2. Subtract 5 and 1. What is the result?"
    assert chain.result == 16 and chain.length == 4
    assert OperationChain(90, (ChainInstruction("+", (15,)),), modulus=100).result == 5


def test_number_sums_are_correct_distinct_and_seeded():
    problems = number_sums(60, seed=3, terms=(2, 3), max_value=20)
    assert problems == number_sums(60, seed=3, terms=(2, 3), max_value=20)
    assert problems != number_sums(60, seed=4, terms=(2, 3), max_value=20)
    assert len({p.problem for p in problems}) == 60
    seen_terms = set()
    for p in problems:
        operands = [int(x) for x in p.problem.removeprefix("What is ").removesuffix("?").split(" + ")]
        seen_terms.add(len(operands))
        assert all(1 <= x <= 20 for x in operands)
        assert p.answer == str(sum(operands)) == last_boxed(p.solution)
        for line in p.solution.split(". The answer")[0].split(", then "):
            left, right = line.lower().split(" = ")
            a, b = (int(x) for x in left.split(" + "))
            assert a + b == int(right)
    assert seen_terms == {2, 3}
    with pytest.raises(ValueError, match="terms"):
        number_sums(3, seed=0, terms=(1,))
