"""The second study task, `search_checks` (selfdistill.data.search and selfdistill.study.search_task):
generation, verification, StepAcc, markers, forks, guided traces, splits.

The checks re-read problems and traces with this file's own regular expressions and arithmetic, so a
bug in the generator cannot hide behind the same bug in the checker."""

import math
import random
import re
from collections import Counter
from statistics import mean
from types import SimpleNamespace

import pytest

from selfdistill.data import SYNTHETIC_TASKS, Problem, search_checks
from selfdistill.data.search import (
    SEARCH_CHECKS,
    SEARCH_IN_DISTRIBUTION,
    SEARCH_OOD_BREADTH,
    SEARCH_OOD_DEPTH,
    SearchPuzzle,
    sample_search_puzzle,
)
from selfdistill.data.synthetic import ChainInstruction
from selfdistill.evaluation.metrics import EPISTEMIC_MARKERS, epistemic_markers
from selfdistill.prompts import PromptBuilder
from selfdistill.study.search_task import (
    SearchStudyTask,
    analyse_completion,
    completion_token_kinds,
    guided_trace,
    parse_search_puzzle,
    pooled_step_acc,
    solution_token_kinds,
    teacher_view,
)
from selfdistill.study.task import StudyTask
from tests.study.helpers import TASK

PROBLEM = re.compile(
    r"Work modulo (\d+)\. Start with x\. (.+?)The result is (\d+)\. Which of (.+) is x\?"
)


OPERATION = re.compile(r"(Add|Subtract|Multiply by) (\d+)\. ")


LINE = re.compile(r"(?:(\w+), )?try (\d+): (.+) vs (\d+) (yes|no)")


SYMBOL = {"Add": "+", "Subtract": "-", "Multiply by": "*"}


def read_problem(text):
    """(modulus, [(operator, operand)], target, candidates), read with this file's own expressions."""
    modulus, operations, target, listed = PROBLEM.fullmatch(text).groups()
    ops = [(SYMBOL[word], int(n)) for word, n in OPERATION.findall(operations)]
    return int(modulus), ops, int(target), [int(n) for n in re.split(r", | and ", listed)]


def run(x, ops, modulus):
    values = [x]
    for operator, operand in ops:
        value = {"+": values[-1] + operand, "-": values[-1] - operand, "*": values[-1] * operand}[operator]
        values.append(value % modulus)
    return values


@pytest.fixture(scope="module")
def in_distribution():
    return search_checks(400, seed=11)


@pytest.fixture(scope="module")
def breadth():
    return search_checks(400, seed=11, **SEARCH_OOD_BREADTH)


@pytest.fixture(scope="module")
def depth():
    return search_checks(400, seed=11, **SEARCH_OOD_DEPTH)


@pytest.fixture(scope="module")
def out_of_distribution(breadth, depth):
    return breadth[:200] + depth[:200]


def test_registered_seeded_and_distinct():
    assert SYNTHETIC_TASKS[SEARCH_CHECKS] is search_checks
    first = search_checks(60, seed=5)
    assert first == search_checks(60, seed=5)
    assert search_checks(20, seed=5) == first[:20], "a longer request extends the same stream"
    other = search_checks(60, seed=6)
    assert len({p.problem for p in first} & {p.problem for p in other}) < 6
    assert len({p.problem for p in first}) == 60
    assert [p.id for p in first] == [f"search_checks-5-{i}" for i in range(60)]
    random.seed(9)
    state = random.getstate()
    search_checks(30, seed=1, marker_rate=0.5, **SEARCH_OOD_BREADTH)
    assert random.getstate() == state


@pytest.mark.parametrize("split", ["in_distribution", "out_of_distribution"])
def test_every_solution_is_a_true_search_ending_at_the_one_passing_candidate(split, request):
    for problem in request.getfixturevalue(split):
        modulus, ops, target, candidates = read_problem(problem.problem)
        passing = [c for c in candidates if run(c, ops, modulus)[-1] == target]
        assert passing == [int(problem.answer)], problem.problem
        *lines, boxed = problem.solution.split("\n")
        assert boxed == f"\\boxed{{{problem.answer}}}"
        tried = []
        for index, line in enumerate(lines):
            marker, candidate, arithmetic, stated_target, verdict = LINE.fullmatch(line).groups()
            candidate = int(candidate)
            values = run(candidate, ops, modulus)
            expected = ", ".join(f"{values[i]}{op}{n}={values[i + 1]}" for i, (op, n) in enumerate(ops))
            assert arithmetic == expected and int(stated_target) == target
            assert verdict == ("yes" if candidate == int(problem.answer) else "no")
            assert (marker is not None) == (index > 0)
            tried.append(candidate)
        assert tried[-1] == int(problem.answer) and len(set(tried)) == len(tried) and set(tried) <= set(candidates)

        analysis = analyse_completion(problem, problem.solution)
        assert analysis.step_acc == 1.0 and analysis.answer_correct
        assert analysis.steps == analysis.checks == len(lines)
        assert analysis.failed_checks == analysis.recoveries == len(lines) - 1
        assert analysis.unmarked_retries == analysis.misplaced_markers == 0


def test_first_try_is_uninformed_so_the_student_format_must_search(in_distribution):
    """The worked traces pick the first candidate at random: it is the answer about 1/k of the time,
    and the number of failed checks spreads over 0..k-1."""
    four = [p for p in in_distribution if len(read_problem(p.problem)[3]) == 4]
    assert len(four) > 80
    first_is_answer = mean(LINE.match(p.solution).group(2) == p.answer for p in four)
    assert 0.12 < first_is_answer < 0.40
    failures = Counter(p.solution.count(" no\n") for p in four)
    assert set(failures) == {0, 1, 2, 3}


def test_markers_follow_only_failed_checks_and_are_optional_at_the_asked_rate():
    problems = search_checks(200, seed=2, markers=("wait", "maybe", "check"))
    seen = Counter()
    for problem in problems:
        lines = problem.solution.split("\n")
        for previous, line in zip(lines[:-2], lines[1:-1], strict=True):
            opening = LINE.fullmatch(line).group(1)
            assert previous.endswith(" no") and opening in ("wait", "maybe", "check")
            seen[opening] += 1
        failed = problem.solution.count(" no\n")
        assert epistemic_markers(problem.solution) == failed  # rate 1: one marker per failed check
    assert set(seen) == {"wait", "maybe", "check"}
    said = chances = 0
    for problem in search_checks(600, seed=2, marker_rate=0.5):
        analysis = analyse_completion(problem, problem.solution)
        assert analysis.misplaced_markers == 0
        assert analysis.recoveries + analysis.unmarked_retries == analysis.failed_checks
        said, chances = said + analysis.recoveries, chances + analysis.failed_checks
    assert chances > 400 and abs(said / chances - 0.5) < 0.06
    with pytest.raises(ValueError, match="marker_rate"):
        search_checks(3, seed=0, marker_rate=1.5)


def test_out_of_distribution_is_wider_in_breadth_and_longer_in_depth(in_distribution, breadth, depth, tokenizer):
    def measure(problems):
        listed = [len(read_problem(p.problem)[3]) for p in problems]
        ops = [len(read_problem(p.problem)[1]) for p in problems]
        checks = [p.solution.count("\n") for p in problems]
        tokens = [len(tokenizer.encode(p.solution, add_special_tokens=False)) for p in problems]
        return listed, ops, checks, tokens

    id_listed, id_ops, id_checks, id_tokens = measure(in_distribution)
    wide_listed, wide_ops, wide_checks, wide_tokens = measure(breadth)
    deep_listed, deep_ops, deep_checks, deep_tokens = measure(depth)
    assert min(wide_listed) > max(id_listed) and set(wide_ops) == set(id_ops)
    assert mean(wide_checks) > mean(id_checks) + 1.0 and max(wide_checks) > max(id_checks)
    assert set(deep_listed) == set(id_listed) and min(deep_ops) > max(id_ops)
    assert abs(mean(deep_checks) - mean(id_checks)) < 0.3
    assert mean(wide_tokens) > 1.5 * mean(id_tokens) and mean(deep_tokens) > 1.2 * mean(id_tokens)
    for ood in (breadth, depth):
        assert {p.problem for p in in_distribution}.isdisjoint(p.problem for p in ood)


def test_invalid_options_and_puzzles_are_rejected():
    for bad in [
        lambda: search_checks(3, seed=0, candidates=1),
        lambda: search_checks(3, seed=0, candidates=(4, 2)),
        lambda: search_checks(3, seed=0, candidates=11),
        lambda: search_checks(3, seed=0, length=0),
        lambda: search_checks(3, seed=0, modulus=2),
        lambda: search_checks(3, seed=0, markers=()),
        lambda: search_checks(3, seed=0, markers=("oops",)),
        lambda: search_checks(3, seed=0, marker_rate=-0.1),
        lambda: search_checks(-1, seed=0),
    ]:
        with pytest.raises(ValueError):
            bad()
    times_two = (ChainInstruction("*", (2,)),)
    with pytest.raises(ValueError, match="exactly one candidate"):
        SearchPuzzle((1, 6), times_two, 2)  # 1*2 = 6*2 = 2 modulo 10: two candidates pass
    with pytest.raises(ValueError, match="single operand"):
        SearchPuzzle((1, 3), (ChainInstruction("+", (1, 2)),), 4)
    puzzle = SearchPuzzle((1, 3), times_two, 2)
    with pytest.raises(ValueError):
        puzzle.trace([1, 3], ["wait"])  # ends at a failing candidate (1*2=2 passes, 3*2=6 does not)
    with pytest.raises(ValueError):
        puzzle.trace([3, 1], [])  # a failed check needs an opening (a marker, or None for none)
    with pytest.raises(ValueError):
        SearchStudyTask(breadth_candidates=(4, 6))  # overlaps the in-distribution breadth
    with pytest.raises(ValueError):
        SearchStudyTask(depth_length=(2, 3))  # overlaps the in-distribution length
    with pytest.raises(ValueError, match="marker_rate"):
        SearchStudyTask(marker_rate=2.0)
    with pytest.raises(ValueError):
        parse_search_puzzle("Work modulo 10. Start with 4. Add 7. What is the result?")


def test_sample_search_puzzle_draws_exactly_the_asked_shape():
    rng = random.Random(0)
    for candidates in range(2, 11):
        puzzle = sample_search_puzzle(rng, candidates=candidates, length=3)
        assert len(puzzle.candidates) == candidates and puzzle.length == 3
        assert parse_search_puzzle(puzzle.problem_text()) == puzzle


def test_corrupted_lines_lower_step_acc_by_exactly_one_line():
    problem = next(p for p in search_checks(200, seed=4) if p.solution.count("\n") >= 3)
    lines = problem.solution.split("\n")
    n = len(lines) - 1
    assert analyse_completion(problem, problem.solution).step_acc == 1.0

    def corrupt(index, change):
        edited = list(lines)
        edited[index] = change(edited[index])
        return "\n".join(edited)

    flip_digit = lambda line: re.sub(  # noqa: E731  the last result
        r"=(\d) vs", lambda m: f"={(int(m.group(1)) + 1) % 10} vs", line
    )
    flip_verdict = lambda line: line[:-3] + " yes" if line.endswith(" no") else line[:-4] + " no"  # noqa: E731
    wrong_left = lambda line: re.sub(r": (\d)", lambda m: f": {(int(m.group(1)) + 1) % 10}", line)  # noqa: E731
    for index in range(n):
        for change in (flip_digit, flip_verdict, wrong_left):
            analysis = analyse_completion(problem, corrupt(index, change))
            assert analysis.steps == n
            assert analysis.step_acc == pytest.approx((n - 1) / n), (index, corrupt(index, change))
    garbage = corrupt(1, lambda line: "wait, so the answer is close")
    assert analyse_completion(problem, garbage).step_acc == pytest.approx((n - 1) / n)
    unlisted = read_problem(problem.problem)[3]
    outsider = next(v for v in range(10) if v not in unlisted)
    puzzle = parse_search_puzzle(problem.problem)
    bogus = "\n".join([puzzle.check_line(outsider), *lines])  # a true check of a value not listed
    assert analyse_completion(problem, bogus).step_acc == pytest.approx(n / (n + 1))
    after_answer = problem.solution + "\nwait, try 1: 1+1=2 vs 3 no"
    wrong_target = corrupt(0, lambda line: re.sub(r"vs (\d)", lambda m: f"vs {(int(m.group(1)) + 1) % 10}", line))
    assert analyse_completion(problem, wrong_target).step_acc == pytest.approx((n - 1) / n)
    assert analyse_completion(problem, after_answer).step_acc == pytest.approx(n / (n + 1))
    assert analyse_completion(problem, "\\boxed{3}").step_acc is None


def test_pooled_step_acc_and_answer_grading():
    problems = search_checks(30, seed=8)
    analyses = [analyse_completion(p, p.solution) for p in problems]
    assert pooled_step_acc(analyses) == 1.0
    wrong = analyse_completion(problems[0], problems[0].solution.rsplit("\n", 1)[0] + "\n\\boxed{99}")
    assert not wrong.answer_correct and wrong.step_acc == 1.0
    pooled = pooled_step_acc([*analyses, analyse_completion(problems[0], "try 5: nonsense vs 1 no")])
    assert pooled == pytest.approx(sum(a.steps for a in analyses) / (sum(a.steps for a in analyses) + 1))
    assert pooled_step_acc([]) is None


def test_recoveries_unmarked_retries_and_misplaced_markers():
    problem = next(p for p in search_checks(200, seed=3) if p.solution.count("\n") >= 3)
    lines = problem.solution.split("\n")
    unmarked = "\n".join([lines[0], lines[1].split(", ", 1)[1], *lines[2:]])
    analysis = analyse_completion(problem, unmarked)
    assert analysis.step_acc == 1.0  # StepAcc reads arithmetic and verdicts, not markers
    assert analysis.unmarked_retries == 1 and analysis.recoveries == analysis.failed_checks - 1
    assert analysis.marker_rate == pytest.approx((analysis.failed_checks - 1) / analysis.failed_checks)
    misplaced = "\n".join(["maybe, " + lines[0], *lines[1:]])
    assert analyse_completion(problem, misplaced).misplaced_markers == 1
    not_a_marker = "\n".join([lines[0], lines[1].replace("wait", "okay", 1), *lines[2:]])
    assert analyse_completion(problem, not_a_marker).recoveries == analysis.failed_checks - 1
    assert analyse_completion(problem, "\\boxed{1}").marker_rate is None


def test_tiny_tokenizer_round_trips_traces_and_spells_each_value_as_one_token(
    tokenizer, in_distribution, out_of_distribution
):
    for problem in in_distribution[:150] + out_of_distribution[:150]:
        direct = parse_search_puzzle(problem.problem).direct_solution()
        for text in (problem.solution, direct, problem.problem):
            ids = tokenizer.encode(text, add_special_tokens=False)
            assert tokenizer.decode(ids) == text
        pieces = [tokenizer.decode([i]) for i in tokenizer.encode(problem.solution, add_special_tokens=False)]
        assert all(len(p) == 1 for p in pieces if p.strip().isdigit())


def test_fork_and_marker_tokens_line_up_with_the_choices(tokenizer, in_distribution, out_of_distribution):
    forks_seen = forced_seen = 0
    for problem in in_distribution[:120] + out_of_distribution[:120]:
        listed = read_problem(problem.problem)[3]
        expected_forks, expected_markers, tried = [], [], []
        for line in problem.solution.split("\n")[:-1]:
            marker, candidate, _, _, _ = LINE.fullmatch(line).groups()
            if len(set(listed) - set(tried)) >= 2:
                expected_forks.append(candidate)
            else:
                forced_seen += 1
            if marker:
                expected_markers.append(marker)
            tried.append(int(candidate))
        ids, kinds = solution_token_kinds(tokenizer, problem)
        assert len(ids) == len(kinds) and tokenizer.decode(ids) == problem.solution
        fork_tokens = [tokenizer.decode([i]).strip() for i, k in zip(ids, kinds, strict=True) if k == "fork"]
        assert fork_tokens == expected_forks
        marker_text = "".join(tokenizer.decode([i]) for i, k in zip(ids, kinds, strict=True) if k == "marker")
        assert marker_text.replace(" ", "") == "".join(expected_markers)
        forks_seen += len(expected_forks)
        assert completion_token_kinds(tokenizer, problem, ids) == kinds  # from sampled ids, same labels
    assert forks_seen > 200 and forced_seen > 20


def test_completion_kinds_mark_choice_points_even_when_the_pick_is_wrong(tokenizer):
    problem = next(p for p in search_checks(100, seed=1) if len(read_problem(p.problem)[3]) == 3)
    listed = read_problem(problem.problem)[3]
    answer = int(problem.answer)
    wrong = [c for c in listed if c != answer]
    puzzle = parse_search_puzzle(problem.problem)
    # tries a failing candidate twice (a repeat), then the other, then the answer (forced: one left)
    text = "\n".join([
        puzzle.check_line(wrong[0]), puzzle.check_line(wrong[0], "wait"),
        puzzle.check_line(wrong[1], "wait"), puzzle.check_line(answer, "wait"), f"\\boxed{{{answer}}}",
    ])
    analysis = analyse_completion(problem, text)
    assert [line.fork for line in analysis.lines] == [True, True, True, False]
    assert [line.repeated for line in analysis.lines] == [False, True, False, False]
    assert analysis.recoveries == 3 and analysis.answer_correct and analysis.step_acc == 1.0
    ids = tokenizer.encode(text, add_special_tokens=False)
    kinds = completion_token_kinds(tokenizer, problem, ids)
    picked = [tokenizer.decode([i]).strip() for i, k in zip(ids, kinds, strict=True) if k == "fork"]
    assert picked == [str(wrong[0]), str(wrong[0]), str(wrong[1])]


def test_rich_teacher_sees_the_full_search_and_weak_only_the_answer(tokenizer):
    problem = next(p for p in search_checks(100, seed=7) if p.solution.count("\n") >= 3)
    failed_lines = [line for line in problem.solution.split("\n") if line.endswith(" no")]
    rich, rich_template = teacher_view(problem, "rich")
    weak, weak_template = teacher_view(problem, "weak")
    assert rich == weak == problem
    rich_text = PromptBuilder(tokenizer, template=rich_template).teacher_text(rich)
    weak_text = PromptBuilder(tokenizer, template=weak_template).teacher_text(weak)
    student_text = PromptBuilder(tokenizer, template=rich_template).student_text(rich)
    assert problem.solution in rich_text and all(line in rich_text for line in failed_lines)
    check_line = re.compile(r"try \d: ")
    assert not check_line.search(weak_text) and f"final answer to this problem is: {problem.answer}" in weak_text
    assert not check_line.search(student_text) and "boxed{" + problem.answer not in student_text
    assert student_text == PromptBuilder(tokenizer, template=weak_template).student_text(problem)
    with pytest.raises(ValueError):
        teacher_view(problem, "sibling")


def test_study_splits_are_disjoint_sized_with_a_validation_slice_and_two_ood_sets():
    task = SearchStudyTask(n_eval=20, n_ood=20, n_validation=10, n_rl=40, n_sft=60)
    splits = task.splits()
    held_out, ood, rl, sft, validation = splits
    assert [len(part) for part in (held_out, ood["breadth"], ood["depth"], validation, rl, sft)] == [
        20, 20, 20, 10, 40, 60]
    parts = (held_out, ood["breadth"], ood["depth"], validation, rl, sft)
    texts = [p.problem for part in parts for p in part]
    ids = [p.id for part in parts for p in part]
    assert len(set(texts)) == len(texts) and len(set(ids)) == len(ids)
    assert all(p.id.startswith("search_checks_breadth-") for p in ood["breadth"])
    assert all(p.id.startswith("search_checks_depth-") for p in ood["depth"])
    low, high = SEARCH_IN_DISTRIBUTION["candidates"]
    assert all(low <= len(read_problem(p.problem)[3]) <= high for p in held_out + rl + sft + list(validation))
    assert all(len(read_problem(p.problem)[3]) > high for p in ood["breadth"])
    assert all(len(read_problem(p.problem)[1]) > SEARCH_IN_DISTRIBUTION["length"][1] for p in ood["depth"])
    # each part stays the same when the parts after it change size
    smaller = SearchStudyTask(n_eval=20, n_ood=20, n_validation=10, n_rl=5, n_sft=5).splits()
    assert smaller.held_out == held_out and smaller.validation == validation and smaller.rl_train == rl[:5]
    assert task.to_json()["breadth_candidates"] == list(SEARCH_OOD_BREADTH["candidates"])
    assert isinstance(held_out[0], Problem) and set(EPISTEMIC_MARKERS) >= set(task.markers)
    assert task.chance_avg(held_out) == pytest.approx(mean(1 / len(read_problem(p.problem)[3]) for p in held_out))


def test_guided_trace_follows_the_guidance():
    rng = random.Random(0)
    for problem in TASK.splits().sft_train:
        puzzle = parse_search_puzzle(problem.problem)
        assert guided_trace(puzzle, rng, 1.0, ("wait",)) == puzzle.direct_solution()
        unguided = guided_trace(puzzle, rng, 0.0, ("wait",))
        analysis = analyse_completion(problem, unguided)
        assert analysis.answer_correct and analysis.step_acc == 1.0 and analysis.recoveries == analysis.failed_checks
    # guidance 0.8 on three candidates: the first try is the answer with probability 0.8 + 0.2 / 3
    puzzle = next(parse_search_puzzle(p.problem) for p in TASK.splits().sft_train
                  if len(parse_search_puzzle(p.problem).candidates) == 3)
    first = [guided_trace(puzzle, rng, 0.8, ("wait",)).startswith(f"try {puzzle.answer}:") for _ in range(3000)]
    assert abs(sum(first) / len(first) - (0.8 + 0.2 / 3)) < 0.03


def test_sft_examples_student_and_rich_copy_the_search_weak_goes_for_the_answer():
    rng = random.Random(1)
    problem = next(p for p in TASK.splits().sft_train if p.solution.count("\n") >= 2)
    view, shown, target = TASK.sft_example(problem, False, rng)
    assert view is None and shown == problem and target == problem.solution
    views = Counter()
    for _ in range(200):
        view, shown, target = TASK.sft_example(problem, True, rng)
        views[view] += 1
        assert shown == problem and analyse_completion(problem, target).answer_correct
        if view == "rich":
            assert target == problem.solution
    assert set(views) == {"rich", "weak"} and 60 < views["weak"] < 140
    # the first task's examples draw nothing from the generator (its shipped warm start stays the same)
    chains = StudyTask(n_eval=2, n_rl=2, n_sft=2)
    state = rng.getstate()
    chains_problem = chains.splits().sft_train[0]
    assert chains.sft_example(chains_problem, True, rng) == ("rich", chains_problem, chains_problem.solution)
    assert rng.getstate() == state


def test_drill_steps_are_true_operations_modulo_ten():
    rng = random.Random(2)
    for _ in range(200):
        step = TASK.drill_step(rng)
        expected = {"+": step.left + step.right, "-": step.left - step.right, "*": step.left * step.right}
        assert 0 <= step.left < 10 and step.result == expected[step.operator] % 10


def test_trace_metrics_of_worked_solutions_and_of_a_wrong_line():
    problems = TASK.splits().held_out
    records = [SimpleNamespace(problem_id=p.id, completion=p.solution, correct=1.0) for p in problems]
    metrics = TASK.trace_metrics(problems, records)
    assert metrics["step_acc"] == 1.0 and metrics["unlisted_share"] == 0.0
    assert metrics["recoveries_per_response"] <= metrics["failed_checks_per_response"]
    if metrics["yes_on_wrong"] is not None:  # true checks: yes exactly on the answer
        assert metrics["yes_on_answer"] == 1.0 and metrics["yes_on_wrong"] == 0.0 and metrics["verification_gap"] == 1.0
    puzzle = parse_search_puzzle(problems[0].problem)
    wrong = puzzle.direct_solution().replace(" yes", " no")
    metrics = TASK.trace_metrics(problems[:1], [SimpleNamespace(problem_id=problems[0].id, completion=wrong)])
    assert metrics["step_acc"] == 0.0 and metrics["first_try_right"] == 1.0
    assert metrics["yes_on_answer"] == 0.0 and metrics["yes_on_wrong"] is None and metrics["verification_gap"] is None


def test_verification_gap_counts_yes_on_the_answer_against_yes_on_wrong_listed_candidates():
    problem = next(p for p in TASK.splits().held_out if len(parse_search_puzzle(p.problem).candidates) >= 3)
    puzzle = parse_search_puzzle(problem.problem)
    wrong = [c for c in puzzle.candidates if c != puzzle.answer]
    outsider = next(v for v in range(10) if v not in puzzle.candidates)
    says_yes = puzzle.check_line(wrong[0]).replace(" no", " yes")  # a wrong candidate passed: a failed verification
    completions = [f"{says_yes}\n\\boxed{{{wrong[0]}}}",
                   f"{puzzle.check_line(wrong[1])}\n{puzzle.check_line(puzzle.answer)}\n\\boxed{{{puzzle.answer}}}",
                   f"{puzzle.check_line(outsider)}\n\\boxed{{{outsider}}}"]
    records = [SimpleNamespace(problem_id=problem.id, completion=c, correct=float(i == 1))
               for i, c in enumerate(completions)]
    metrics = TASK.trace_metrics([problem], records)
    assert metrics["yes_on_answer"] == 1.0 and metrics["yes_on_wrong"] == 0.5 and metrics["verification_gap"] == 0.5
    assert metrics["unlisted_share"] == pytest.approx(1 / 4)
    scores = TASK.per_problem([problem], records)
    assert scores["avg"] == [pytest.approx(1 / 3)] and scores["step_acc"] == [pytest.approx(2 / 4)]
    assert scores["epistemic"] == [0.0]  # one retry after a failure, without a marker
    silent = TASK.per_problem([problem], records[:1])  # no failure followed by another try: no chance to say one
    assert math.isnan(silent["epistemic"][0])
