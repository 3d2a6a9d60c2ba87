"""selfdistill.study.runner: run configs, the job plan, the premise check, the sweep and reproducible runs."""

import json
from pathlib import Path

import pytest

from selfdistill.config import config_from_dict
from selfdistill.study.report import build_report
from selfdistill.study.runner import (
    EVAL_FILE,
    RunJob,
    StudyPremiseError,
    check_premise,
    execute_job,
    plan_jobs,
    read_finished,
    run_config,
)
from selfdistill.study.settings import METHODS, StudySettings
from selfdistill.study.warmstart import warm_start_dir
from tests.study.helpers import TINY_TASK, TINY_WARM_START, _fake_study


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


def test_sweep_selects_on_the_in_distribution_split(tmp_path):
    _fake_study(tmp_path, {
        "grpo": [dict(avg=0.4), dict(avg=0.4)],
        "dasd": [dict(avg=0.40, ood=0.20), dict(avg=0.42, ood=0.22)],
        "dasd_beta0.1": [dict(avg=0.50, ood=0.10), dict(avg=0.52, ood=0.12)],  # best ID, worse OOD
        "dasd_ppo2": [dict(avg=0.30, ood=0.40), dict(avg=0.32, ood=0.42)],  # best OOD: must not be chosen
    })
    text = build_report(tmp_path).read_text()
    sweep = text[text.index("## DASD's sweep"):text.index("## Plots")]
    assert "Selected on the in-distribution split: **dasd_beta0.1**" in sweep
    assert "dasd_beta0.1 − dasd OOD Avg@4 = -0.100 ± 0.000" in sweep and "**does not hold**" in sweep
    assert "| dasd_ppo2 (2) | ppo_epochs = 2 |" in sweep and "| dasd (2) | reference |" in sweep
    assert "dasd_beta0.1" not in text[:text.index("## DASD's sweep")]  # kept out of the main tables
