"""`selfdistill study`: the command is registered, and (slow) `study --quick` end to end."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from selfdistill.study.plots import PLOTS
from selfdistill.study.settings import StudySettings

REPO = Path(__file__).resolve().parents[2]


def test_cli_registers_the_study_command():
    from selfdistill.cli import build_parser

    args = build_parser().parse_args(["study", "--quick", "--seeds", "2", "--methods", "grpo,dasd", "--out", "x"])
    assert args.quick and args.seeds == 2 and args.methods == ["grpo,dasd"] and args.out == "x"


def test_cli_evaluation_flags_reach_the_settings(tmp_path, monkeypatch):
    """--eval-samples and --curves set the settings the runs use (the default: 8 samples, no curves)."""
    import selfdistill.study.runner as runner
    from selfdistill.cli import build_parser

    seen = []
    monkeypatch.setattr(runner, "run_study", lambda settings, out, **_: seen.append(settings))
    for argv, expected in ((["--no-tuning"], (8, 0)), (["--eval-samples", "16", "--curves", "10"], (16, 10))):
        args = build_parser().parse_args(["study", "--out", str(tmp_path), *argv])
        assert args.func(args) == 0
        assert (seen[-1].eval_samples, seen[-1].eval_every) == expected
    args = build_parser().parse_args(["study", "--out", str(tmp_path), "--eval-samples", "0"])
    assert args.func(args) == 2  # refused with the setting named, before any run


@pytest.mark.slow
def test_study_quick_end_to_end(tmp_path):
    out = tmp_path / "study"
    env = {**os.environ, "SELFDISTILL_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "selfdistill", "study", "--quick", "--out", str(out), "--no-progress"],
                   check=True, env=env, cwd=REPO, timeout=600)
    report = (out / "report.md").read_text()
    assert "## Warm start" in report and "## Registered claims" in report and "No tuning runs" in report
    assert "| D1 |" in report and "**not run** |" in report  # --quick runs 3 methods: most claims are not run
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
        assert all(0 <= point["ood_breadth_avg@n"] <= 1 and point["n"] == settings.curve_samples for point in curve)
        for row in rows:
            for name in ("loss", "reward", "entropy", "grad_norm"):
                assert math.isfinite(row[name]), (method, name, row)
        evaluation = json.loads((run / "eval.json").read_text())
        student = evaluation["student"]
        for split in (student["summary"], student["ood"]["breadth"], student["ood"]["depth"]):
            assert split["n"] == settings.eval_samples and split["problems"] == settings.eval_limit
            assert 0 <= split["avg@n"] <= 1 and 0 <= split["step_acc"] <= 1
        assert set(student["per_problem"]) == {"avg", "epistemic", "step_acc", "ood_breadth", "ood_depth"}
        assert all(len(scores) == settings.eval_limit for scores in student["per_problem"].values())
        assert set(evaluation["student"]["token_entropy"]["entropy"]) == {"fork", "marker", "forced"}
    base = json.loads((out / "base" / "eval.json").read_text())
    assert set(base) >= {"student", "teacher_rich", "teacher_weak"}
    study = json.loads((out / "study.json").read_text())
    # the rich view (the only one --quick's methods use), the checks' verification, the student above chance
    assert study["warm_start_source"] == "shipped" and study["premise_holds"] and len(study["premise"]) == 3
    assert len(study["preregistration"]["sha256"]) == 64
