"""selfdistill.study.task: splits, chain parsing, solution steps and the free-choice tokens."""

import random

import pytest

from selfdistill.data.synthetic import OperationChain, sample_operation_chain
from selfdistill.study.task import StudyTask, free_choice_spans, parse_chain, solution_steps, solution_token_labels
from tests.study.helpers import TINY_TASK


def test_splits_are_disjoint_and_stable_when_later_parts_grow():
    held_out, ood, rl, sft, validation = TINY_TASK.splits()
    assert (len(held_out), len(ood), len(rl), len(sft), len(validation)) == (4, 0, 6, 12, 0)
    texts = [{p.problem for p in part} for part in (held_out, rl, sft)]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    bigger = StudyTask(n_eval=4, n_rl=6, n_sft=40).splits()
    assert [p.problem for p in bigger.held_out] == [p.problem for p in held_out]
    assert [p.problem for p in bigger.rl_train] == [p.problem for p in rl]


@pytest.mark.parametrize("modulus", [None, 10, 97])
def test_parse_chain_and_solution_steps_invert_the_generator(modulus):
    rng = random.Random(modulus or 1)
    for _ in range(50):
        chain = sample_operation_chain(rng, length=rng.randint(1, 7), modulus=modulus, block_probability=0.6)
        steps = chain.worked_steps(rng)
        assert parse_chain(chain.problem_text()) == chain
        assert solution_steps(chain, OperationChain.solution_text(steps)) == steps  # free_choice flags included


def test_solution_steps_rejects_a_solution_that_skips_the_chain():
    chain = parse_chain("Work modulo 10. Start with 4. Add 3 and 5. What is the result?")
    with pytest.raises(ValueError, match="does not apply"):
        solution_steps(chain, "4+3=7\n7+3=0\n\\boxed{0}")  # 3 used twice
    with pytest.raises(ValueError, match="fewer steps"):
        solution_steps(chain, "4+3=7\n\\boxed{7}")


def test_free_choice_tokens_are_exactly_the_early_block_operands(tokenizer):
    held_out = StudyTask(n_eval=40, n_rl=1, n_sft=1).splits().held_out
    labelled_any = False
    for problem in held_out:
        chain = parse_chain(problem.problem)
        steps = solution_steps(chain, problem.solution)
        ids, labels = solution_token_labels(tokenizer, problem)
        assert tokenizer.decode(ids) == problem.solution
        free_text = "".join(tokenizer.decode([i]) for i, free in zip(ids, labels, strict=True) if free)
        assert free_text == "".join(str(s.right) for s in steps if s.free_choice)
        assert len(free_choice_spans(problem)) == sum(s.free_choice for s in steps)
        labelled_any |= any(labels)
    assert labelled_any, "40 problems without a single block: the check above tested nothing"
