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
from selfdistill.study.probes import choice_entropy
from selfdistill.study.report import (
    PLOTS,
    Spread,
    _verdict,
    build_report,
    load_results,
    paired_difference,
)
from selfdistill.study.runner import EVAL_FILE, RunJob, execute_job, plan_jobs, read_finished, run_config
from selfdistill.study.settings import METHODS, StudySettings, WarmStartSettings
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
    held_out, rl, sft = TINY_TASK.splits()
    assert (len(held_out), len(rl), len(sft)) == (4, 6, 12)
    texts = [{p.problem for p in part} for part in (held_out, rl, sft)]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    bigger = StudyTask(n_eval=4, n_rl=6, n_sft=40).splits()
    assert [p.problem for p in bigger[0]] == [p.problem for p in held_out]
    assert [p.problem for p in bigger[1]] == [p.problem for p in rl]


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
    held_out, _, _ = StudyTask(n_eval=40, n_rl=1, n_sft=1).splits()
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


def test_the_package_ships_the_study_warm_start_of_the_current_code():
    """The default study's warm start is shipped, its files match their digests, its record holds the
    current settings, and the current code reproduces its first training steps: a change to the settings,
    the task, the tiny model or the warm-start procedure fails here (then rebuild and ship it, docs/study.md)."""
    task, settings = StudyTask(), WarmStartSettings()
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
    problems = task.splits()[0][:8]
    for role in ("student", "teacher"):
        ids = [getattr(PromptBuilder(tok, template=settings.template), f"{role}_ids")(p) for p in problems
               for tok in (tokenizer, built)]
        assert ids[0::2] == ids[1::2]
    # the weights were trained with the built tokenizer (the saved one gains an unused <|endoftext|>)
    tokenizer = built
    # retrain the first steps from scratch: the losses agree with the shipped build's to float noise
    fresh = build_tiny_model(tokenizer, hidden_size=settings.hidden_size, num_layers=settings.num_layers,
                             num_heads=settings.num_heads, intermediate_size=settings.intermediate_size,
                             seed=settings.seed)
    steps = 3
    assert len(record["first_losses"]) == FIRST_LOSSES >= steps
    losses = train_warm_start(fresh, tokenizer, task, task.splits()[2], settings, stop_after=steps)
    # another CPU's kernels move these by ~1e-6 (docs/study.md); a change to the procedure moves them more
    assert losses == pytest.approx(record["first_losses"][:steps], abs=2e-5)


def test_the_same_study_run_twice_gives_identical_metrics(tmp_path):
    """One study job (train, evaluate during and after) run twice from the same warm start: the same
    eval.json and metrics.jsonl, timings aside."""
    settings = StudySettings(methods=("grpo",), seeds=1, steps=2, prompts_per_step=2, group_size=2,
                             max_new_tokens=8, eval_samples=2, eval_every=1, task=TINY_TASK,
                             warm_start=TINY_WARM_START)
    warm = warm_start_dir(TINY_TASK, TINY_WARM_START, cache=tmp_path / "cache")
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps({"id": p.id, "problem": p.problem, "answer": p.answer,
                                              "solution": p.solution}) + "\n" for p in TINY_TASK.splits()[1]))
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


def test_choice_entropy_counts_every_solution_token(tokenizer):
    model = build_tiny_model(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    problems = StudyTask(n_eval=6, n_rl=1, n_sft=1).splits()[0]
    builder = PromptBuilder(tokenizer)
    for role in ("student", "teacher"):
        result = choice_entropy(model, tokenizer, problems, builder, role=role, batch_size=4)
        labels = [solution_token_labels(tokenizer, p)[1] for p in problems]
        assert result.free_tokens == sum(sum(row) for row in labels)
        assert result.forced_tokens == sum(len(row) + 1 - sum(row) for row in labels)  # + EOS
        assert 0 < result.forced < math.log(len(tokenizer)) + 1e-4


# ----------------------------------------------------------------------------------------------
# the runner's plan


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_study_method_makes_a_valid_trainer_config(method, tmp_path):
    settings = StudySettings()
    job = RunJob(name=f"{method}-seed1", method=method, seed=1, folder=str(tmp_path), key="k",
                 warm_start_dir=str(tmp_path), train_file=str(tmp_path / "train.jsonl"), settings=settings)
    config = config_from_dict(run_config(job))
    assert config.objective.method == METHODS[method]["method"]
    assert config.objective.teacher == "frozen" and config.optim.seed == 1
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


def _fake_eval(method, seed, avg, free, n=4):
    summary = {"avg@n": avg, "mean_length": 20.0 + seed, "mean_entropy": 0.3,
               **{f"pass@{k}": min(1.0, avg * (1 + 0.2 * (k - 1))) for k in range(1, n + 1)}}
    return {"key": "x", "method": method, "seed": seed, "train_seconds": 10.0, "eval_seconds": 2.0,
            "student": {"summary": summary, "choice_entropy": {"free": free, "forced": 0.1, "free_tokens": 5,
                                                               "forced_tokens": 100}}}


def _fake_study(folder: Path, values: dict[str, list[tuple[float, float, list[float]]]], n: int = 4) -> None:
    """values: method -> per seed (avg, free entropy, entropy curve)."""
    settings = StudySettings(methods=tuple(values), seeds=max(len(v) for v in values.values()),
                             eval_samples=n).to_json()
    record = {"settings": WarmStartSettings().__dict__, "parameters": 1234, "train_seconds": 5.0,
              "final_loss": 0.5, "stage1_final_loss": 0.2}
    (folder / "base").mkdir(parents=True)
    base = _fake_eval(None, 0, 0.3, 0.9, n)
    base["teacher"] = _fake_eval(None, 0, 0.7, 0.2, n)["student"]
    (folder / "base" / "eval.json").write_text(json.dumps(base))
    (folder / "study.json").write_text(json.dumps({"settings": settings, "warm_start": record, "workers": 2,
                                                   "wall_seconds": 60.0}))
    for method, per_seed in values.items():
        for seed, (avg, free, curve) in enumerate(per_seed):
            run = folder / "runs" / f"{method}-seed{seed}"
            run.mkdir(parents=True)
            evaluation = _fake_eval(method, seed, avg, free, n)
            evaluation["held_out_curve"] = [{"step": 2, "avg@n": (0.3 + avg) / 2, f"pass@{n}": 0.5}]
            (run / "eval.json").write_text(json.dumps(evaluation))
            rows = [{"step": i + 1, "entropy": h, "reward": 0.1 * i} for i, h in enumerate(curve)]
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_tables_plots_and_paired_differences(tmp_path):
    _fake_study(tmp_path, {
        "grpo": [(0.40, 0.8, [1.0, 0.9, 0.8]), (0.44, 0.7, [1.0, 0.9, 0.7])],
        "opsd": [(0.30, 0.2, [1.0, 0.5, 0.2]), (0.36, 0.1, [1.0, 0.4, 0.1])],
        "dasd": [(0.42, 0.9, [1.0, 1.0, 1.0]), (0.38, 0.8, [1.0, 0.9, 0.9])],
    })
    path = build_report(tmp_path)
    text = path.read_text()
    assert "| grpo (2) | 0.420 ± 0.028 |" in text  # mean and sample std of 0.40, 0.44
    assert "| base (warm start) | 0.300 |" in text
    assert "opsd − grpo" in text and "dasd − opsd" in text
    for name in PLOTS:
        assert (tmp_path / name).stat().st_size < 200_000
        assert f"]({name})" in text
    results = load_results(tmp_path)
    # held-out Avg@k vs step: the warm start at step 0, the evaluation at step 2, the final one at step 3
    assert results.runs["grpo"][0].held_out_curve(0.3) == ([0, 2, 3], [0.3, pytest.approx(0.35), 0.40])
    # final training entropy: mean of the last steps of each curve; OPSD lower than GRPO in both seeds
    diff = paired_difference(results.runs["opsd"], results.runs["grpo"], "train_entropy_final", results.ks)
    assert diff.values == pytest.approx([(1.0 + 0.5 + 0.2) / 3 - 0.9, (1.0 + 0.4 + 0.1) / 3 - (2.6 / 3)])
    assert _verdict(diff) == "lower in every seed"
    # DASD vs GRPO on Avg@4: +0.02 and −0.06 -> the signs differ
    assert _verdict(paired_difference(results.runs["dasd"], results.runs["grpo"], "avg", results.ks)) == (
        "within seed noise (signs differ)")


def test_verdict_needs_agreeing_seeds_and_a_clear_mean():
    assert _verdict(Spread([0.1])) == "one seed: no spread"
    assert _verdict(Spread([0.0, 0.0])) == "identical in every seed"
    assert _verdict(Spread([0.10, 0.12, 0.11])) == "higher in every seed"
    assert _verdict(Spread([0.01, 0.5, 0.01])) == "same sign in all 3 seeds, but within 2 SE"
    assert _verdict(Spread([-0.1, 0.1, 0.05])) == "within seed noise (signs differ)"


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
    settings = StudySettings.quick()
    for method in settings.methods:
        run = out / "runs" / f"{method}-seed0"
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == settings.steps
        curve = json.loads((run / "eval.json").read_text())["held_out_curve"]
        assert [point["step"] for point in curve] == list(range(settings.eval_every, settings.steps,
                                                                 settings.eval_every))
        for row in rows:
            for name in ("loss", "reward", "entropy", "grad_norm"):
                assert math.isfinite(row[name]), (method, name, row)
        evaluation = json.loads((run / "eval.json").read_text())
        summary = evaluation["student"]["summary"]
        assert summary["n"] == settings.eval_samples and 0 <= summary["avg@n"] <= 1
        assert all(math.isfinite(v) for v in evaluation["student"]["choice_entropy"].values())
    base = json.loads((out / "base" / "eval.json").read_text())
    assert set(base) >= {"student", "teacher"}
