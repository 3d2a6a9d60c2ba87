"""selfdistill.study.runner: run configs, the job plan, the premise checks, tuning and reproducible runs."""

import json
from pathlib import Path

import pytest

from selfdistill.config import config_from_dict
from selfdistill.objectives import DasdKnobs
from selfdistill.study.preregistration import TUNING_SEEDS, choose_tuned
from selfdistill.study.runner import (
    EVAL_FILE,
    RunJob,
    StudyPremiseError,
    check_premise,
    choose_from_tuning,
    execute_job,
    plan_jobs,
    plan_tuning_jobs,
    read_finished,
    run_config,
    tuned_overrides,
)
from selfdistill.study.settings import METHODS, StudySettings
from selfdistill.study.warmstart import warm_start_dir
from tests.study.helpers import TINY_TASK, TINY_WARM_START


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
    assert run_config(_job("opsd", settings))["rollout"]["max_new_tokens"] == 160


def _base(student: float, **teachers: float) -> dict:
    base = {"student": {"summary": {"avg@n": student}}}
    base.update({f"teacher_{view}": {"summary": {"avg@n": value}} for view, value in teachers.items()})
    return base


def test_premise_check_needs_every_used_teacher_view_to_beat_the_student_by_the_margin():
    settings = StudySettings(methods=("grpo", "opsd", "opsd_weak"), premise_margin=0.1)
    lines = check_premise(_base(0.2, rich=0.7, weak=0.31), settings)
    assert len(lines) == 2 and all(line.endswith("holds") for line in lines)
    with pytest.raises(StudyPremiseError, match="weak teacher Avg@8 0.290 vs student 0.200"):
        check_premise(_base(0.2, rich=0.7, weak=0.29), settings)
    # a view no method uses is not checked
    only_rich = StudySettings(methods=("grpo", "opsd"), premise_margin=0.1)
    assert len(check_premise(_base(0.2, rich=0.7, weak=0.0), only_rich)) == 1
    with pytest.raises(StudyPremiseError, match="FAILS"):  # the other machine's first-task warm start
        check_premise(_base(0.257, rich=0.221), StudySettings.for_task("chains"))


def test_premise_needs_checks_that_verify_and_a_student_above_chance():
    settings = StudySettings(methods=("grpo", "opsd"), premise_margin=0.1, verification_margin=0.3)
    base = _base(0.5, rich=0.9)
    base["student"]["summary"].update(yes_on_answer=0.8, yes_on_wrong=0.3, verification_gap=0.5, chance_avg=0.33)
    lines = check_premise(base, settings)
    assert len(lines) == 3 and "= 0.500 (needs 0.3): holds" in lines[1] and "at random 0.330" in lines[2]
    base["student"]["summary"].update(yes_on_answer=0.51, yes_on_wrong=0.51, verification_gap=0.0)
    with pytest.raises(StudyPremiseError, match="checks verify.*FAILS"):  # the second study's warm start
        check_premise(base, settings)
    base["student"]["summary"].update(yes_on_answer=0.9, yes_on_wrong=None, verification_gap=None)
    with pytest.raises(StudyPremiseError, match="no check line"):
        check_premise(base, settings)
    base["student"]["summary"].update(yes_on_wrong=0.1, verification_gap=0.8, chance_avg=0.5)
    with pytest.raises(StudyPremiseError, match="must beat it.: FAILS"):  # 0.5 does not beat 0.5
        check_premise(base, settings)


def test_a_changed_knob_default_is_a_new_run(monkeypatch):
    from selfdistill.objectives import OBJECTIVES

    settings = StudySettings(methods=("dasd",))
    before = settings.run_key("dasd", 0)
    dasd = OBJECTIVES["dasd"]
    monkeypatch.setattr(type(dasd), "knob_defaults", lambda self: {"beta": 0.1} if self is dasd else {})
    assert settings.run_key("dasd", 0) != before


def test_the_same_study_run_twice_gives_identical_metrics(tmp_path):
    """One study job (train, evaluate during and after) run twice from the same warm start: the same
    eval.json and metrics.jsonl, timings aside."""
    settings = StudySettings(methods=("grpo",), seeds=1, steps=2, prompts_per_step=2, group_size=2,
                             max_new_tokens=8, eval_samples=2, curve_samples=2, eval_every=1, task=TINY_TASK,
                             warm_start=TINY_WARM_START)
    warm = warm_start_dir(TINY_TASK, TINY_WARM_START, cache=tmp_path / "cache")
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps({"id": p.id, "problem": p.problem, "answer": p.answer,
                                              "solution": p.solution}) + "\n" for p in TINY_TASK.splits().rl_train))
    results = []
    for copy in ("a", "b"):
        job = plan_jobs(settings, tmp_path / copy, warm, train_file)[1]
        execute_job(job)
        evaluation = json.loads((Path(job.folder) / EVAL_FILE).read_text())
        metrics = [json.loads(line) for line in (Path(job.folder) / "metrics.jsonl").read_text().splitlines()]
        timing = {"train_seconds", "eval_seconds", "curve_eval_seconds"}
        results.append(({k: v for k, v in evaluation.items() if k not in timing},
                        [{k: v for k, v in row.items() if "second" not in k and "time" not in k} for row in metrics]))
    assert results[0] == results[1]
    assert len(results[0][1]) == 2 and len(results[0][0]["held_out_curve"]) == 1


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_study_method_makes_a_valid_trainer_config(method, tmp_path):
    settings = StudySettings(methods=tuple(METHODS))
    job = RunJob(name=f"{method}-seed1", method=method, seed=1, folder=str(tmp_path), key="k",
                 warm_start_dir=str(tmp_path), train_file=str(tmp_path / "train.jsonl"), settings=settings)
    config = config_from_dict(run_config(job))
    assert config.objective.name == METHODS[method]["name"]
    assert config.objective.teacher == "frozen" and config.optim.seed == 1
    assert config.optim.ppo_epochs == METHODS[method].get("optim", {}).get("ppo_epochs", 1)
    if method in ("conform", "novelty"):
        assert config.objective.knobs["direction"] == method
    # the same budget and optimizer for every method
    assert (config.optim.steps, config.rollout.prompts_per_step, config.rollout.group_size, config.optim.lr) == (
        settings.steps, settings.prompts_per_step, settings.group_size, settings.lr)


def test_plan_has_one_job_per_method_and_seed_and_reuses_only_matching_results(tmp_path):
    settings = StudySettings(methods=("grpo", "dasd"), seeds=2)
    jobs = plan_jobs(settings, tmp_path, tmp_path / "warm", tmp_path / "train.jsonl")
    assert [job.name for job in jobs] == ["base", "grpo-seed0", "dasd-seed0", "grpo-seed1", "dasd-seed1"]
    assert len({job.key for job in jobs}) == len(jobs)
    folder = Path(jobs[1].folder)
    folder.mkdir(parents=True)
    (folder / "eval.json").write_text(json.dumps({"key": jobs[1].key}))
    assert read_finished(folder, jobs[1].key) is not None
    changed = StudySettings(methods=("grpo", "dasd"), seeds=2, lr=2e-3)
    assert read_finished(folder, plan_jobs(changed, tmp_path, tmp_path / "warm", tmp_path / "t")[1].key) is None
    other_weights = plan_jobs(settings, tmp_path, tmp_path / "warm2", tmp_path / "train.jsonl")
    assert read_finished(folder, other_weights[1].key) is None
    with pytest.raises(ValueError, match="unknown study methods"):
        StudySettings(methods=("grpo", "ppo"))


def test_tuning_runs_use_their_own_seeds_and_the_validation_slice_and_feed_the_dasd_family(tmp_path):
    settings = StudySettings(methods=("grpo", "dasd", "conform", "dasd_shuffled", "opsd"), seeds=2)
    tuning = plan_tuning_jobs(settings, tmp_path, tmp_path / "warm", tmp_path / "train.jsonl")
    assert {job.seed for job in tuning} == set(TUNING_SEEDS) and {job.evaluation for job in tuning} == {"validation"}
    assert {job.method for job in tuning} == set(settings.tuning) and all("/tuning/" in job.folder for job in tuning)
    assert not set(TUNING_SEEDS) & set(range(settings.seeds))
    # the grid's order: beta 0.01, 0.03, 0.1, each with floor 0 then 0.1
    assert settings.tuning == ("dasd_beta0.01_floor0", "dasd_beta0.01_floor0.1", "dasd_beta0.03_floor0",
                               "dasd_beta0.03_floor0.1", "dasd_beta0.1_floor0", "dasd_beta0.1_floor0.1")
    for job, result in zip(tuning, [0.45, 0.45, 0.45, 0.40, 0.30, 0.30] * len(TUNING_SEEDS), strict=True):
        Path(job.folder).mkdir(parents=True)
        (Path(job.folder) / EVAL_FILE).write_text(json.dumps({"key": job.key, "student": {"summary": {
            "avg@n": result}}}))
    record = choose_from_tuning(settings, tuning)
    # three tie at 0.45: the smaller beta (0.01) wins, then, between its two floors, the larger one
    tuned = {"beta": 0.01, "scale_floor": 0.1}
    assert record["chosen"] == "dasd_beta0.01_floor0.1" and record["tuned"] == tuned
    assert record["methods"]["dasd_beta0.03_floor0.1"] == {"validation_avg": [0.40] * 3, "beta": 0.03,
                                                           "scale_floor": 0.1}
    claims = plan_jobs(settings, tmp_path, tmp_path / "warm", tmp_path / "train.jsonl", record["tuned"])[1:]
    given = {job.method: job.overrides for job in claims}
    assert given == {"grpo": {}, "dasd": tuned, "conform": tuned, "dasd_shuffled": tuned, "opsd": {}}
    assert {job.evaluation for job in claims} == {"test"}
    dasd = next(job for job in claims if job.method == "dasd")
    assert run_config(dasd)["objective"] == {"name": "dasd", **tuned, "teacher": "frozen"}
    # a higher mean wins whatever the knobs
    values = {"a": {"beta": 1.0, "scale_floor": 0.0}, "b": {"beta": 0.01, "scale_floor": 0.1}}
    assert choose_tuned({"a": [0.5, 0.7], "b": [0.59, 0.6]}, values) == "a"
    # a tuning method that leaves a knob to the library gets its default, read from the loss's knobs
    by_default = plan_tuning_jobs(StudySettings(tuning=("dasd",)), tmp_path / "defaults", tmp_path / "warm",
                                  tmp_path / "train.jsonl")
    for job in by_default:
        Path(job.folder).mkdir(parents=True)
        (Path(job.folder) / EVAL_FILE).write_text(json.dumps({"key": job.key, "student": {"summary": {
            "avg@n": 0.5}}}))
    defaults = DasdKnobs()
    assert choose_from_tuning(settings, by_default)["tuned"] == {"beta": defaults.beta,
                                                               "scale_floor": defaults.scale_floor}
    assert tuned_overrides("dasd_beta1", tuned) == {}  # a method that sets a tuned knob keeps its own
    assert choose_from_tuning(settings, []) == {"methods": {}, "chosen": None, "tuned": {}}
    with pytest.raises(ValueError):
        choose_tuned({}, {})
