"""The method study: task labelling, the cached warm start, run configs, the report builder, and (slow)
`selfdistill study --quick` end to end."""

import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from selfdistill.config import config_from_dict
from selfdistill.data.synthetic import OperationChain, sample_operation_chain
from selfdistill.models import build_tiny_model, build_tiny_tokenizer, load_model
from selfdistill.prompts import PromptBuilder
from selfdistill.study.claims import CLAIMS, DOES_NOT_HOLD, HOLDS, INCONCLUSIVE, judge
from selfdistill.study.plots import PLOTS
from selfdistill.study.report import build_report
from selfdistill.study.results import RunResult, Spread, StudyResults, load_results, paired_difference, verdict
from selfdistill.study.runner import EVAL_FILE, RunJob, execute_job, plan_jobs, read_finished, run_config
from selfdistill.study.settings import METHODS, TASKS, StudySettings, WarmStartSettings
from selfdistill.study.task import StudyTask, free_choice_spans, parse_chain, solution_steps, solution_token_labels
from selfdistill.study.warmstart import (
    FIRST_LOSSES,
    SHIPPED_DIR,
    ShippedWarmStartError,
    drill_loss,
    drill_sequences,
    file_digests,
    read_shipped_index,
    read_warm_start_record,
    sft_loss,
    ship_warm_start,
    shipped_warm_start,
    train_warm_start,
    warm_start_dir,
    warm_start_key,
)

REPO = Path(__file__).resolve().parents[1]
TINY_TASK = StudyTask(n_eval=4, n_rl=6, n_sft=12)
TINY_WARM_START = WarmStartSettings(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, steps=3,
                                    drill_steps=2, drill_facts=6, batch_size=4, warmup_steps=1)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


# ----------------------------------------------------------------------------------------------
# the task


def test_splits_are_disjoint_and_stable_when_later_parts_grow():
    held_out, ood, rl, sft = TINY_TASK.splits()
    assert (len(held_out), len(ood), len(rl), len(sft)) == (4, 0, 6, 12)
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


# ----------------------------------------------------------------------------------------------
# the warm start


def test_sft_loss_is_the_mean_response_token_nll(tokenizer):
    model = build_tiny_model(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    prompts = [[1, 40, 41, 42, 43], [1, 50]]
    responses = [[60, 61, 2], [70, 2]]
    expected_sum, count = 0.0, 0
    with torch.no_grad():
        for prompt, response in zip(prompts, responses, strict=True):
            ids = torch.tensor([prompt + response])
            log_probs = model(input_ids=ids).logits[0].log_softmax(-1)  # [L, V]
            for t, token in enumerate(response):
                expected_sum -= float(log_probs[len(prompt) - 1 + t, token])
                count += 1
        loss = sft_loss(model, prompts, responses, pad_id=tokenizer.pad_token_id)
    assert float(loss) == pytest.approx(expected_sum / count, rel=1e-4)


@pytest.mark.parametrize("modulus", [10, None])
def test_drill_sequences_are_true_operations_in_the_solution_format(tokenizer, modulus):
    task = StudyTask(modulus=modulus)
    sequences, masks = drill_sequences(tokenizer, task, random.Random(0), num_facts=40, max_lines=5)
    lines = []
    for ids, mask in zip(sequences, masks, strict=True):
        text = tokenizer.decode(ids)
        assert text.startswith("\n") and text.endswith("\n") and list(tokenizer.encode(text)) == ids
        seq_lines = text.strip("\n").split("\n")
        assert 1 <= len(seq_lines) <= 5
        results = "".join(tokenizer.decode([i]) for i, is_result in zip(ids, mask, strict=True) if is_result)
        assert results == "".join(line.split("=")[1] for line in seq_lines)
        lines += seq_lines
    assert len(lines) == 40
    for line in lines:
        match = re.fullmatch(r"(\d+)([+*-])(\d+)=(\d+)", line)
        assert match, line
        a, operator, b, result = int(match[1]), match[2], int(match[3]), int(match[4])
        value = {"+": a + b, "-": a - b, "*": a * b}[operator]
        assert result == (value % modulus if modulus else value)
        assert modulus is None or a < modulus


def test_drill_loss_counts_result_tokens_only(tokenizer):
    model = build_tiny_model(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    sequences = [[40, 41, 42, 43, 44], [50, 51, 52]]
    masks = [[False, False, True, False, True], [False, True, False]]
    with torch.no_grad():
        expected = []
        for ids, mask in zip(sequences, masks, strict=True):
            log_probs = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)  # [L, V]
            expected += [-float(log_probs[j - 1, ids[j]]) for j in range(1, len(ids)) if mask[j]]
        loss = drill_loss(model, sequences, masks, pad_id=tokenizer.pad_token_id)
    assert float(loss) == pytest.approx(sum(expected) / len(expected), rel=1e-4)


def test_warm_start_is_cached_by_its_settings(tmp_path):
    steps_seen = []
    folder = warm_start_dir(TINY_TASK, TINY_WARM_START, cache=tmp_path, on_step=lambda s, loss: steps_seen.append(s))
    assert steps_seen == [1, 2, 3, 4, 5]  # 3 task steps, then 2 task + drill steps
    record = read_warm_start_record(folder)
    assert record["settings"]["steps"] == 3 and list(record["loss_curve"]) == ["5"]
    assert all(math.isfinite(v) for v in record["loss_curve"].values())
    model, tok = load_model(folder)  # a standard HF folder
    assert sum(p.numel() for p in model.parameters()) == record["parameters"]

    again = warm_start_dir(TINY_TASK, TINY_WARM_START, cache=tmp_path, on_step=lambda s, loss: steps_seen.append(s))
    assert again == folder and steps_seen == [1, 2, 3, 4, 5]  # reused, not retrained
    other = WarmStartSettings(**{**TINY_WARM_START.__dict__, "teacher_fraction": 0.0})
    assert warm_start_key(TINY_TASK, other) != warm_start_key(TINY_TASK, TINY_WARM_START)
    assert warm_start_key(StudyTask(n_eval=4, n_rl=6, n_sft=13), TINY_WARM_START) != folder.name[-12:]


def test_shipped_warm_start_is_used_when_its_digests_match_and_skipped_on_rebuild(tmp_path):
    built = warm_start_dir(TINY_TASK, TINY_WARM_START, cache=tmp_path / "cache")
    key = warm_start_key(TINY_TASK, TINY_WARM_START)
    shipped = tmp_path / "assets"
    target = ship_warm_start(built, key, shipped=shipped)
    assert read_shipped_index(shipped)[key]["sha256"] == file_digests(target)
    assert "model.safetensors" in file_digests(target) and "selfdistill-complete.json" not in file_digests(target)
    steps = []
    found = warm_start_dir(TINY_TASK, TINY_WARM_START, cache=tmp_path / "other", shipped=shipped,
                           on_step=lambda s, loss: steps.append(s))
    assert found == target and steps == [] and not (tmp_path / "other").exists()  # no training, no cache
    rebuilt = warm_start_dir(TINY_TASK, TINY_WARM_START, cache=tmp_path / "other", shipped=shipped, rebuild=True,
                             on_step=lambda s, loss: steps.append(s))
    assert rebuilt.parent == tmp_path / "other" and steps == [1, 2, 3, 4, 5]
    # the same training on the same machine gives the same bytes
    assert file_digests(rebuilt)["model.safetensors"] == file_digests(target)["model.safetensors"]
    other = WarmStartSettings(**{**TINY_WARM_START.__dict__, "seed": 1})
    assert shipped_warm_start(warm_start_key(TINY_TASK, other), shipped) is None  # other settings: not shipped
    (target / "model.safetensors").write_bytes(b"not the weights")
    with pytest.raises(ShippedWarmStartError, match="model.safetensors"):
        warm_start_dir(TINY_TASK, TINY_WARM_START, cache=tmp_path / "other", shipped=shipped)


@pytest.mark.parametrize("task_name", sorted(TASKS))
def test_the_package_ships_the_study_warm_start_of_the_current_code(task_name):
    """Each task's default study warm start is shipped, its files match their digests, its record holds the
    current settings, and the current code reproduces its first training steps: a change to the settings,
    the task, the tiny model or the warm-start procedure fails here (then rebuild and ship it, docs/study.md)."""
    study = StudySettings.for_task(task_name)
    task, settings = study.task, study.warm_start
    key = warm_start_key(task, settings)
    index = read_shipped_index()
    assert key in index, f"no shipped warm start for key {key}; shipped: {sorted(index)}"
    folder = shipped_warm_start(key)  # checks every file's SHA-256
    assert folder is not None and folder.parent == SHIPPED_DIR
    assert set(index[key]["sha256"]) >= {"model.safetensors", "config.json", "tokenizer.json", "warm_start.json"}
    assert (folder / "model.safetensors").stat().st_size < 4_000_000
    record = read_warm_start_record(folder)
    assert record["settings"] == WarmStartSettings().__dict__ and record["task"] == task.to_json()
    model, tokenizer = load_model(folder)
    assert sum(p.numel() for p in model.parameters()) == record["parameters"]
    built = build_tiny_tokenizer()  # the warm start trains with this one; the study loads the saved one
    problems = task.splits().held_out[:8]
    for template in {settings.template, *task.teacher_views(settings.template).values()}:
        for role in ("student", "teacher"):
            ids = [getattr(PromptBuilder(tok, template=template), f"{role}_ids")(task.teacher_problem(p))
                   for p in problems for tok in (tokenizer, built)]
            assert ids[0::2] == ids[1::2]
    # the weights were trained with the built tokenizer (the saved one gains an unused <|endoftext|>)
    tokenizer = built
    # retrain the first steps from scratch: the losses agree with the shipped build's to float noise
    fresh = build_tiny_model(tokenizer, hidden_size=settings.hidden_size, num_layers=settings.num_layers,
                             num_heads=settings.num_heads, intermediate_size=settings.intermediate_size,
                             seed=settings.seed)
    steps = 3
    assert len(record["first_losses"]) == FIRST_LOSSES >= steps
    losses = train_warm_start(fresh, tokenizer, task, task.splits().sft_train, settings, stop_after=steps)
    # another CPU's kernels move these by ~1e-6 (docs/study.md); a change to the procedure moves them more
    assert losses == pytest.approx(record["first_losses"][:steps], abs=2e-5)


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


# ----------------------------------------------------------------------------------------------
# the runner's plan


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


# ----------------------------------------------------------------------------------------------
# the report


def _fake_part(task, n, avg=0.3, h=0.8, e=0.5, step_acc=0.8, ood=0.2, length=20.0):
    """A model under one prompt, as eval.json has it: summary, token entropy and (search) the OOD row."""
    def passes(accuracy):
        return {f"pass@{k}": min(1.0, accuracy * (1 + 0.2 * (k - 1))) for k in range(1, n + 1)}

    summary = {"problems": 4, "n": n, "avg@n": avg, "mean_length": length, "mean_entropy": 0.3,
               "epistemic_per_response": e, "epistemic_per_1k": 1000 * e / length, "truncation_rate": 0.0,
               **passes(avg)}
    kinds = ("fork", "marker", "forced") if task == "search" else ("free", "forced")
    part = {"summary": summary, "token_entropy": {"entropy": {k: h if k in ("fork", "free") else 0.1 for k in kinds},
                                                  "tokens": {k: 5 for k in kinds}}}
    if task == "search":
        summary["step_acc"] = step_acc
        part["ood"] = {**summary, "avg@n": ood, **passes(ood), "mean_length": 2 * length, "step_acc": step_acc / 2}
    return part


def _fake_eval(method, seed, task, n, **values):
    curve = values.pop("curve", [1.0, 0.9, 0.8])
    student = _fake_part(task, n, **values)
    point = {"step": 2, "avg@n": (0.3 + student["summary"]["avg@n"]) / 2, f"pass@{n}": 0.5,
             "epistemic_per_response": 0.4}
    if task == "search":
        point.update({"step_acc": 0.7, "ood_avg@n": 0.1, "ood_epistemic_per_response": 0.3})
    evaluation = {"key": "x", "method": method, "seed": seed, "train_seconds": 10.0, "eval_seconds": 2.0,
                  "curve_eval_seconds": 1.0, "student": student, "held_out_curve": [point]}
    metrics = [{"step": i + 1, "entropy": h, "reward": 0.1 * i, "clip_fraction": 0.01 * i} for i, h in enumerate(curve)]
    return evaluation, metrics


def _fake_study(folder: Path | None, values: dict[str, list[dict]], n: int = 4, task: str = "search"):
    """values: method -> per seed, `_fake_part` keyword arguments (and "curve": the training entropy).
    Writes the study folder when `folder` is given; returns the `StudyResults` either way."""
    settings = StudySettings.for_task(task, methods=tuple(values), seeds=max(len(v) for v in values.values()),
                                      eval_samples=n).to_json()
    record = {"settings": WarmStartSettings().__dict__, "parameters": 1234, "train_seconds": 5.0,
              "final_loss": 0.5, "stage1_final_loss": 0.2}
    views = ("rich", "weak") if task == "search" else ("rich",)
    base = {"key": "x", "method": None, "seed": 0, "train_seconds": 0.0, "eval_seconds": 2.0,
            "student": _fake_part(task, n, avg=0.3, h=0.9),
            **{f"teacher_{view}": {key: value for key, value in _fake_part(task, n, avg=0.7, h=0.2).items()
                                   if key != "ood"} for view in views}}  # teachers: in distribution only
    study = {"settings": settings, "warm_start": record, "warm_start_source": "shipped", "warm_start_sha256": "ab",
             "workers": 2, "premise": ["rich teacher Avg@4 0.700 vs student 0.300 (needs +0.1): holds"],
             "wall_seconds": 60.0}
    results = StudyResults(folder=folder, study=study, base=base)
    for method, per_seed in values.items():
        for seed, kwargs in enumerate(per_seed):
            evaluation, metrics = _fake_eval(method, seed, task, n, **kwargs)
            results.runs.setdefault(method, []).append(RunResult(method, seed, evaluation, metrics))
            if folder is not None:
                run = folder / "runs" / f"{method}-seed{seed}"
                run.mkdir(parents=True)
                (run / "eval.json").write_text(json.dumps(evaluation))
                (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    if folder is not None:
        (folder / "base").mkdir(parents=True)
        (folder / "base" / "eval.json").write_text(json.dumps(base))
        (folder / "study.json").write_text(json.dumps(study))
    return results


def test_report_tables_plots_and_paired_differences(tmp_path):
    _fake_study(tmp_path, {
        "grpo": [dict(avg=0.40, h=0.8, e=0.5, ood=0.2), dict(avg=0.44, h=0.7, e=0.6, ood=0.3, curve=[1.0, 0.9, 0.7])],
        "opsd": [dict(avg=0.30, h=0.2, e=0.1, curve=[1.0, 0.5, 0.2]), dict(avg=0.36, h=0.1, e=0.2,
                                                                             curve=[1.0, 0.4, 0.1])],
        "dasd": [dict(avg=0.42, h=0.9, curve=[1.0, 1.0, 1.0]), dict(avg=0.38, h=0.8, curve=[1.0, 0.9, 0.9])],
    })
    text = build_report(tmp_path).read_text()
    assert text.startswith("# Method study on search with verified checks (search task)")
    for heading in ("## Warm start", "## In distribution", "## Out of distribution", "## Paired differences",
                    "## Claims", "## Plots", "## Budget and timing"):
        assert f"\n{heading}" in text
    assert "| grpo (2) | 0.420 ± 0.028 |" in text  # mean and sample std of 0.40, 0.44
    assert "| base (warm start) | 0.300 |" in text
    assert "| teacher, weak view (problem + answer only) | 0.700 |" in text
    assert "- rich teacher Avg@4 0.700 vs student 0.300" in text
    assert "| grpo (2) | 0.250 ± 0.071 |" in text  # out of distribution: 0.2, 0.3
    assert "opsd − grpo" in text and "dasd − opsd" in text and "| H fork (held-out) |" in text
    assert "224 out of distribution" in text and "not reported" not in text
    for name in PLOTS:
        assert (tmp_path / name).stat().st_size < 200_000
        assert f"]({name})" in text
    results = load_results(tmp_path)
    grpo = results.runs["grpo"][0]
    # held-out curves: the warm start at step 0, the evaluation at step 2, the final one at step 3
    assert grpo.held_out_curve("avg@n", 0.3) == ([0, 2, 3], [0.3, pytest.approx(0.35), 0.40])
    assert grpo.held_out_curve("epistemic_per_response", 0.5) == ([0, 2, 3], [0.5, 0.4, 0.5])
    assert grpo.held_out_curve("ood_avg@n", 0.2) == ([0, 2, 3], [0.2, 0.1, 0.2])
    scalars = grpo.scalars()
    assert scalars["H_fork"] == 0.8 and scalars["ood_avg"] == 0.2 and scalars["ood_step_acc"] == 0.4
    assert scalars["step_acc"] == 0.8 and scalars["ood_pass@4"] == pytest.approx(0.32)
    assert scalars["train_clip_fraction"] == pytest.approx(0.01)
    # final training entropy: mean of the last steps of each curve; OPSD lower than GRPO in both seeds
    diff = paired_difference(results.runs["opsd"], results.runs["grpo"], "train_entropy_final")
    assert diff.values == pytest.approx([(1.0 + 0.5 + 0.2) / 3 - 0.9, (1.0 + 0.4 + 0.1) / 3 - (2.6 / 3)])
    assert verdict(diff) == "lower in every seed"
    # DASD vs GRPO on Avg@4: +0.02 and −0.06 -> the signs differ
    assert verdict(paired_difference(results.runs["dasd"], results.runs["grpo"], "avg")) == (
        "within seed noise (signs differ)")


def test_report_on_the_chains_task_has_no_out_of_distribution_part(tmp_path):
    _fake_study(tmp_path, {"grpo": [dict(avg=0.4), dict(avg=0.5)], "opsd": [dict(avg=0.3), dict(avg=0.35)]},
                task="chains")
    text = build_report(tmp_path).read_text()
    assert text.startswith("# Method study on operation chains (chains task)")
    assert "## Out of distribution" not in text and "OOD Avg" not in text and "| StepAcc" not in text
    assert "| H free | H forced |" in text and "| opsd − grpo | H free (held-out) |" in text
    assert "need the search task" in text
    assert "teacher, weak view" not in text
    assert not (tmp_path / "ood_avg_at_k.png").exists() and (tmp_path / "token_entropy.png").exists()
    results = load_results(tmp_path)
    assert results.task == "chains" and not results.has_ood and results.token_kinds == ["free", "forced"]
    assert "ood_avg" not in results.runs["grpo"][0].scalars()


def test_verdict_needs_agreeing_seeds_and_a_clear_mean():
    assert verdict(Spread([0.1])) == "one seed: no spread"
    assert verdict(Spread([0.0, 0.0])) == "identical in every seed"
    assert verdict(Spread([0.10, 0.12, 0.11])) == "higher in every seed"
    assert verdict(Spread([0.01, 0.5, 0.01])) == "same sign in all 3 seeds, but within 2 SE"
    assert verdict(Spread([-0.1, 0.1, 0.05])) == "within seed noise (signs differ)"


def _claim(name):
    return next(claim for claim in CLAIMS if claim.name == name)


@pytest.mark.parametrize(("opsd_e", "expected"), [
    ((0.1, 0.2, 0.15), HOLDS),  # lower than GRPO's 0.5 in every seed
    ((0.1, 0.9, 0.15), INCONCLUSIVE),  # mixed signs
    ((0.6, 0.7, 0.65), DOES_NOT_HOLD),  # higher in every seed
])
def test_claim_k1_is_judged_on_the_paired_difference(opsd_e, expected):
    results = _fake_study(None, {"grpo": [dict(e=0.5)] * 3, "opsd": [dict(e=e) for e in opsd_e]})
    result = judge(_claim("K1"), results)
    assert result.verdict == expected and result.against == "grpo"
    assert result.diff.values == pytest.approx([e - 0.5 for e in opsd_e])


def test_claims_need_the_methods_and_two_seeds():
    one_seed = _fake_study(None, {"grpo": [dict(e=0.5)], "opsd": [dict(e=0.1)]})
    assert judge(_claim("K1"), one_seed).verdict == INCONCLUSIVE
    missing = judge(_claim("K5"), one_seed)
    assert missing.verdict == INCONCLUSIVE and missing.note == "opsd_weak did not run"


def test_not_lower_and_best_claims():
    grpo = [dict(avg=0.40, e=0.5, step_acc=0.8), dict(avg=0.44, e=0.5, step_acc=0.8)]
    noisy = _fake_study(None, {"grpo": grpo, "dasd": [dict(avg=0.5, e=0.6, step_acc=0.7),
                                                      dict(avg=0.6, e=0.4, step_acc=0.6)]})
    assert judge(_claim("D3"), noisy).verdict == HOLDS  # E(y): +0.1, −0.1: no clear drop
    assert judge(_claim("D4"), noisy).verdict == DOES_NOT_HOLD  # StepAcc: −0.1, −0.2
    assert judge(_claim("D5"), noisy).verdict == HOLDS  # +0.10, +0.16 over the runner-up grpo
    opsd = [dict(avg=0.55), dict(avg=0.45)]  # mean 0.50: below dasd's 0.55, above it in one seed
    close = _fake_study(None, {"grpo": grpo, "opsd": opsd, "dasd": [dict(avg=0.5), dict(avg=0.6)]})
    result = judge(_claim("D5"), close)
    assert result.verdict == INCONCLUSIVE and result.against == "opsd"
    beaten = _fake_study(None, {"grpo": grpo, "dasd": [dict(avg=0.3), dict(avg=0.35)]})
    assert judge(_claim("D5"), beaten).verdict == DOES_NOT_HOLD
    # the sweep variants are no rivals of the "best" claims
    swept = _fake_study(None, {"grpo": grpo, "dasd": [dict(avg=0.5), dict(avg=0.6)],
                               "dasd_beta0.1": [dict(avg=0.9), dict(avg=0.9)]})
    assert judge(_claim("D5"), swept).verdict == HOLDS


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


def test_cli_registers_the_study_command():
    from selfdistill.cli import build_parser

    args = build_parser().parse_args(["study", "--quick", "--seeds", "2", "--methods", "grpo,dasd", "--out", "x"])
    assert args.quick and args.seeds == 2 and args.methods == ["grpo,dasd"] and args.out == "x"


# ----------------------------------------------------------------------------------------------
# end to end


@pytest.mark.slow
def test_study_quick_end_to_end(tmp_path):
    out = tmp_path / "study"
    env = {**os.environ, "SELFDISTILL_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "selfdistill", "study", "--quick", "--out", str(out), "--no-progress"],
                   check=True, env=env, cwd=REPO, timeout=600)
    report = (out / "report.md").read_text()
    assert "## Warm start" in report and "## Paired differences" in report
    for name in PLOTS:
        assert 0 < (out / name).stat().st_size < 200_000
    settings = StudySettings.for_task("search", quick=True)
    for method in settings.methods:
        run = out / "runs" / f"{method}-seed0"
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == settings.steps
        curve = json.loads((run / "eval.json").read_text())["held_out_curve"]
        assert [point["step"] for point in curve] == list(range(settings.eval_every, settings.steps,
                                                                 settings.eval_every))
        assert all(0 <= point["ood_avg@n"] <= 1 and point["n"] == settings.curve_samples for point in curve)
        for row in rows:
            for name in ("loss", "reward", "entropy", "grad_norm"):
                assert math.isfinite(row[name]), (method, name, row)
        evaluation = json.loads((run / "eval.json").read_text())
        for split in (evaluation["student"]["summary"], evaluation["student"]["ood"]):
            assert split["n"] == settings.eval_samples and split["problems"] == settings.eval_limit
            assert 0 <= split["avg@n"] <= 1 and 0 <= split["step_acc"] <= 1
        assert set(evaluation["student"]["token_entropy"]["entropy"]) == {"fork", "marker", "forced"}
    base = json.loads((out / "base" / "eval.json").read_text())
    assert set(base) >= {"student", "teacher_rich", "teacher_weak"}
    study = json.loads((out / "study.json").read_text())
    assert study["warm_start_source"] == "shipped" and study["premise_holds"]
