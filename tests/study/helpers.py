"""Helpers of the tests of selfdistill.study: tiny task and warm-start settings, fake finished studies."""

import json
from pathlib import Path

from selfdistill.study.results import RunResult, StudyResults
from selfdistill.study.search_task import SearchStudyTask
from selfdistill.study.settings import StudySettings, WarmStartSettings
from selfdistill.study.task import StudyTask

TASK = SearchStudyTask(n_eval=8, n_ood=6, n_validation=6, n_rl=8, n_sft=24)
TINY_TASK = StudyTask(n_eval=4, n_rl=6, n_sft=12)
TINY_WARM_START = WarmStartSettings(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, steps=3,
                                    drill_steps=2, drill_facts=6, batch_size=4, warmup_steps=1)


def _fake_part(task, n, avg=0.3, h=0.8, e=0.5, step_acc=0.8, ood=0.2, length=20.0, problems=4, shift=0.0):
    """A model under one prompt, as eval.json has it: summary, token entropy and (search) the OOD rows and
    the per-problem scores (`problems` of them, spread around `avg` / `ood`, all moved by `shift`)."""
    def passes(accuracy):
        return {f"pass@{k}": min(1.0, accuracy * (1 + 0.2 * (k - 1))) for k in range(1, n + 1)}

    summary = {"problems": problems, "n": n, "avg@n": avg, "mean_length": length, "mean_entropy": 0.3,
               "epistemic_per_response": e, "epistemic_per_1k": 1000 * e / length, "truncation_rate": 0.0,
               **passes(avg)}
    kinds = ("fork", "marker", "forced") if task == "search" else ("free", "forced")
    part = {"summary": summary, "token_entropy": {"entropy": {k: h if k in ("fork", "free") else 0.1 for k in kinds},
                                                  "tokens": {k: 5 for k in kinds}}}
    if task == "search":
        summary.update(step_acc=step_acc, marker_rate=e, yes_on_answer=0.9, yes_on_wrong=0.2, verification_gap=0.7,
                       unlisted_share=0.05, chance_avg=0.33)
        part["ood"] = {split: {**summary, "avg@n": ood, **passes(ood), "mean_length": 2 * length,
                               "step_acc": step_acc / 2, "chance_avg": 0.2}
                       for split in ("breadth", "depth")}
        spread = [(i - (problems - 1) / 2) * 0.02 for i in range(problems)]
        part["per_problem"] = {"avg": [avg + d + shift for d in spread], "epistemic": [e] * problems,
                               "step_acc": [step_acc] * problems,
                               "ood_breadth": [ood + d + shift for d in spread], "ood_depth": [0.1 + d for d in spread]}
    return part


def _fake_eval(method, seed, task, n, **values):
    curve = values.pop("curve", [1.0, 0.9, 0.8])
    student = _fake_part(task, n, **values)
    point = {"step": 2, "avg@n": (0.3 + student["summary"]["avg@n"]) / 2, f"pass@{n}": 0.5, "marker_rate": 0.4}
    if task == "search":
        point.update({"step_acc": 0.7, "ood_breadth_avg@n": 0.1, "ood_depth_avg@n": 0.05})
    evaluation = {"key": "x", "method": method, "seed": seed, "train_seconds": 10.0, "eval_seconds": 2.0,
                  "curve_eval_seconds": 1.0, "student": student, "held_out_curve": [point]}
    metrics = [{"step": i + 1, "entropy": h, "reward": 0.1 * i, "clip_fraction": 0.01 * i} for i, h in enumerate(curve)]
    return evaluation, metrics


def _fake_study(folder: Path | None, values: dict[str, list[dict]], n: int = 4, task: str = "search",
                tuning: dict | None = None):
    """values: method -> per seed, `_fake_part` keyword arguments (and "curve": the training entropy); tuning:
    the tuning.json to write. Writes the study folder when `folder` is given; returns the `StudyResults`."""
    settings = StudySettings.for_task(task, methods=tuple(values), seeds=max(len(v) for v in values.values()),
                                      eval_samples=n).to_json()
    record = {"settings": WarmStartSettings().__dict__, "parameters": 1234, "train_seconds": 5.0,
              "final_loss": 0.5, "stage1_final_loss": 0.2}
    views = ("rich", "weak") if task == "search" else ("rich",)
    base = {"key": "x", "method": None, "seed": 0, "train_seconds": 0.0, "eval_seconds": 2.0,
            "student": _fake_part(task, n, avg=0.3, h=0.9),
            **{f"teacher_{view}": {key: value for key, value in _fake_part(task, n, avg=0.7, h=0.2).items()
                                   if key not in ("ood", "per_problem")} for view in views}}  # teachers: ID only
    study = {"settings": settings, "warm_start": record, "warm_start_source": "shipped", "warm_start_sha256": "ab",
             "workers": 2, "premise": ["rich teacher Avg@4 0.700 vs student 0.300 (needs +0.1): holds"],
             "wall_seconds": 60.0, "preregistration": {"sha256": "cd", "commit": "0123abc", "modified": False}}
    results = StudyResults(folder=folder, study=study, base=base, tuning=tuning or {})
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
        if tuning:
            (folder / "tuning.json").write_text(json.dumps(tuning))
    return results
