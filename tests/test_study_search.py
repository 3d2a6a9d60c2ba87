"""The study on the search task: the task's study interface (warm-start examples, drill, token kinds,
StepAcc of samples), the settings per task, the premise check and the run configs of its methods."""

import random
from types import SimpleNamespace

import pytest

from selfdistill.models import build_tiny_model, build_tiny_tokenizer
from selfdistill.prompts import PromptBuilder
from selfdistill.study.probes import token_entropy
from selfdistill.study.runner import RunJob, StudyPremiseError, check_premise, run_config
from selfdistill.study.search_task import (
    SearchStudyTask,
    analyse_completion,
    guided_trace,
    parse_search_puzzle,
    solution_token_kinds,
)
from selfdistill.study.settings import (
    METHODS,
    QUICK_METHODS,
    SWEEP_METHODS,
    StudySettings,
    method_parts,
)
from selfdistill.study.task import StudyTask

TASK = SearchStudyTask(n_eval=8, n_ood=6, n_rl=8, n_sft=24)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


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


def test_sft_examples_student_targets_the_search_and_teacher_sees_a_view():
    rng = random.Random(1)
    problem = TASK.splits().sft_train[0]
    view, shown, target = TASK.sft_example(problem, False, rng)
    assert view is None and shown == problem and target == problem.solution
    views = set()
    for _ in range(40):
        view, shown, target = TASK.sft_example(problem, True, rng)
        views.add(view)
        assert shown.solution == parse_search_puzzle(problem.problem).direct_solution()
        assert analyse_completion(problem, target).answer_correct
    assert views == {"rich", "weak"}
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
    records = [SimpleNamespace(problem_id=p.id, completion=p.solution) for p in problems]
    metrics = TASK.trace_metrics(problems, records)
    assert metrics["step_acc"] == 1.0
    assert metrics["recoveries_per_response"] == metrics["failed_checks_per_response"]
    puzzle = parse_search_puzzle(problems[0].problem)
    wrong = puzzle.direct_solution().replace(" yes", " no")
    metrics = TASK.trace_metrics(problems[:1], [SimpleNamespace(problem_id=problems[0].id, completion=wrong)])
    assert metrics["step_acc"] == 0.0 and metrics["first_try_right"] == 1.0


def test_token_entropy_counts_every_token_by_kind(tokenizer):
    model = build_tiny_model(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    problems = TASK.splits().held_out
    for role, template in (("student", "opsd_mild"), ("teacher", "opsd_mild"), ("teacher", "answer_only")):
        result = token_entropy(model, tokenizer, TASK, problems, PromptBuilder(tokenizer, template=template),
                               role=role, batch_size=3)
        kinds = [solution_token_kinds(tokenizer, p)[1] for p in problems]
        assert result.tokens["fork"] == sum(row.count("fork") for row in kinds)
        assert result.tokens["marker"] == sum(row.count("marker") for row in kinds)
        assert result.tokens["forced"] == sum(row.count("forced") + 1 for row in kinds)  # + EOS
        assert all(0 < value < 7.0 for value in result.entropy.values())
    chains = StudyTask(n_eval=4, n_rl=1, n_sft=1)
    result = token_entropy(model, tokenizer, chains, chains.splits().held_out, PromptBuilder(tokenizer))
    assert set(result.entropy) == {"free", "forced"}


def test_settings_follow_the_task():
    search = StudySettings()
    assert search.task.name == "search" and "opsd_weak" in search.methods
    assert (search.max_new_tokens, search.ood_max_new_tokens) == (128, 224)
    assert search.views == {"rich": "opsd_mild", "weak": "answer_only"}
    chains = StudySettings.for_task("chains")
    assert chains.max_new_tokens == 48 and "opsd_weak" not in chains.methods and chains.views == {"rich": "opsd_mild"}
    with pytest.raises(ValueError, match="teacher view"):
        StudySettings.for_task("chains", methods=("opsd_weak",))
    quick = StudySettings.for_task("search", quick=True)
    assert quick.methods == QUICK_METHODS and quick.eval_limit == 16 and quick.task == SearchStudyTask()
    held_out, ood = quick.held_out()
    assert len(held_out) == len(ood) == 16 and held_out == SearchStudyTask().splits().held_out[:16]
    with pytest.raises(ValueError, match="unknown study task"):
        StudySettings.for_task("sums")
    assert set(SWEEP_METHODS) <= set(METHODS)
    # the sweep's variants each change one thing from dasd
    for name in SWEEP_METHODS:
        objective, optim, view = method_parts(name)
        changed = {k: v for k, v in objective.items() if k != "name"}
        assert objective["name"] == "dasd" and view == "rich" and len(changed) + len(optim) == 1


def _job(method: str, settings: StudySettings) -> RunJob:
    return RunJob(name=f"{method}-seed0", method=method, seed=0, folder="unused", key="k", warm_start_dir="w",
                  train_file="t.jsonl", settings=settings)


def test_run_configs_of_teacher_views_and_ppo_epochs():
    settings = StudySettings(methods=("opsd", "opsd_weak", "dasd_ppo4"))
    assert run_config(_job("opsd", settings))["data"]["template"] == "opsd_mild"
    weak = run_config(_job("opsd_weak", settings))
    assert weak["data"]["template"] == "answer_only" and weak["objective"] == {"name": "opsd", "teacher": "frozen"}
    ppo = run_config(_job("dasd_ppo4", settings))
    assert ppo["optim"]["ppo_epochs"] == 4 and ppo["objective"]["name"] == "dasd"
    assert run_config(_job("opsd", settings))["rollout"]["max_new_tokens"] == 128


def _base(student: float, **teachers: float) -> dict:
    base = {"student": {"summary": {"avg@n": student}}}
    base.update({f"teacher_{view}": {"summary": {"avg@n": value}} for view, value in teachers.items()})
    return base


def test_premise_check_needs_every_used_teacher_view_to_beat_the_student_by_the_margin():
    settings = StudySettings(methods=("grpo", "opsd", "opsd_weak"), premise_margin=0.1)
    lines = check_premise(_base(0.2, rich=0.7, weak=0.31), settings)
    assert len(lines) == 2 and all(line.endswith("holds") for line in lines)
    with pytest.raises(StudyPremiseError, match="weak teacher Avg@16 0.290 vs student 0.200"):
        check_premise(_base(0.2, rich=0.7, weak=0.29), settings)
    # a view no method uses is not checked
    only_rich = StudySettings(methods=("grpo", "opsd"), premise_margin=0.1)
    assert len(check_premise(_base(0.2, rich=0.7, weak=0.0), only_rich)) == 1
    with pytest.raises(StudyPremiseError, match="FAILS"):  # the other machine's first-task warm start
        check_premise(_base(0.257, rich=0.221), StudySettings.for_task("chains"))


def test_a_changed_knob_default_is_a_new_run(monkeypatch):
    from selfdistill.objectives import OBJECTIVES

    settings = StudySettings(methods=("dasd",))
    before = settings.run_key("dasd", 0)
    dasd = OBJECTIVES["dasd"]
    monkeypatch.setattr(type(dasd), "knob_defaults", lambda self: {"beta": 0.1} if self is dasd else {})
    assert settings.run_key("dasd", 0) != before
