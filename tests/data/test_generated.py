"""selfdistill.data.generated: the registered synthetic tasks and their seeded, disjoint splits."""

import pytest

from selfdistill.data.benchmarks import Problem
from selfdistill.data.generated import SYNTHETIC_TASKS, make_splits
from selfdistill.data.synthetic import operation_chains
from tests.data.helpers import parse_chain_solution


@pytest.mark.parametrize("name", sorted(SYNTHETIC_TASKS))
def test_ids_sources_and_distinct_texts(name):
    problems = SYNTHETIC_TASKS[name](200, seed=7)
    assert [p.id for p in problems] == [f"{name}-7-{i}" for i in range(200)]
    assert {p.source for p in problems} == {name}
    assert len({p.problem for p in problems}) == 200
    for problem in problems:
        assert problem.answer.strip() and problem.answer.isdigit()
        assert problem.solution.endswith(
            f"\\boxed{{{problem.answer}}}" + ("." if name in ("arithmetic_word_problems", "number_sums") else "")
        )


@pytest.mark.parametrize("name", sorted(SYNTHETIC_TASKS))
def test_splits_are_disjoint_sized_and_stable(name):
    train, held_out = make_splits(name, 150, 50, seed=2)
    assert (len(train), len(held_out)) == (150, 50)
    assert not {p.problem for p in train} & {p.problem for p in held_out}
    assert len({p.id for p in train + held_out}) == 200
    assert make_splits(name, 150, 50, seed=2) == (train, held_out)
    bigger_train, same_held_out = make_splits(name, 300, 50, seed=2)
    assert same_held_out == held_out and bigger_train[:150] == train
    assert make_splits(name, 150, 50, seed=3)[1] != held_out


def test_splits_pass_options_and_accept_a_generator():
    train, held_out = make_splits(operation_chains, 40, 20, seed=0, length=3, modulus=50)
    assert all(p.problem.startswith("Work modulo 50.") for p in train + held_out)
    assert {len(parse_chain_solution(p.solution)[0]) for p in train + held_out} == {3}
    with pytest.raises(ValueError, match="unknown synthetic task"):
        make_splits("gsm8k", 10, 10, seed=0)

    def repeating(n, *, seed):
        return [Problem(f"r-{i}", "same text", "1", None, "r") for i in range(n)]

    with pytest.raises(ValueError, match="overlap"):
        make_splits(repeating, 2, 2, seed=0)
