"""selfdistill.study.report: the pre-registration, tuning, claims, tables and plots of a finished study."""

import json

import pytest

from selfdistill.study.plots import PLOTS
from selfdistill.study.report import build_report
from selfdistill.study.results import load_results
from tests.study.helpers import _fake_study

TUNING = {"methods": {"dasd_beta0.03_floor0.1": {"validation_avg": [0.40, 0.42, 0.41], "beta": 0.03,
                                                "scale_floor": 0.1},
                      "dasd_beta0.1_floor0": {"validation_avg": [0.45, 0.44, 0.46], "beta": 0.1, "scale_floor": 0.0}},
          "chosen": "dasd_beta0.1_floor0", "tuned": {"beta": 0.1, "scale_floor": 0.0}}


def _seeds(count, **values):
    return [dict(values, curve=[1.0, 0.9 - 0.01 * s, 0.8]) for s in range(count)]


def test_report_judges_the_registered_claims_with_chance_rows_tuning_and_plots(tmp_path):
    # dasd beats its matched control on OOD breadth by 0.05 in every seed and problem (D1 should hold); it
    # equals it in distribution (D4, "keeps" within 0.02, should hold); OOD depth is the same (D2 not shown)
    _fake_study(tmp_path, {
        "grpo_token_mean": _seeds(5, avg=0.40, ood=0.20),
        "dasd": _seeds(5, avg=0.40, ood=0.25),
        "grpo": _seeds(5, avg=0.42, ood=0.20),
    }, tuning=TUNING)
    text = build_report(tmp_path).read_text()
    assert text.startswith("# Method study on search with verified checks (search task)")
    for heading in ("## Pre-registration", "## Warm start", "## Tuning", "## Registered claims", "## In distribution",
                    "## Out of distribution: breadth", "## Out of distribution: depth", "## Plots",
                    "## Budget and timing"):
        assert f"\n{heading}" in text
    assert "commit `0123abc`" in text and "SHA-256 `cd`" in text
    assert "Chosen: **dasd_beta0.1_floor0**" in text and "used beta = 0.1, scale_floor = 0." in text
    assert "| dasd_beta0.03_floor0.1 | 0.03 | 0.1 | 0.410 ± 0.010 |" in text
    assert "| tuning run | beta | scale_floor | validation Avg@" in text
    assert "| a listed candidate at random | 0.330 |" in text and "| a listed candidate at random | 0.200 |" in text
    assert "| base (warm start) | 0.300 |" in text and "| grpo (5) | 0.420 ± 0.000 |" in text
    assert "| teacher, weak view (problem + answer only) | 0.700 |" in text
    lines = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| D")
             or line.startswith("| K")}
    assert lines["D1"].endswith("**holds** |") and "+0.050" in lines["D1"]
    assert lines["D4"].endswith("**holds** |")
    assert lines["D2"].endswith("**not shown** |")  # depth is the same for both
    assert lines["D3"].endswith("**not run** |") and lines["K1"].endswith("**not run** |")
    for name in PLOTS:
        if name != "ood_avg_at_k.png":
            assert (tmp_path / name).stat().st_size < 200_000
            assert f"]({name})" in text
    results = load_results(tmp_path)
    grpo = results.runs["grpo"][0]
    # held-out curves: the warm start at step 0, the evaluation at step 2, the final one at step 3
    assert grpo.held_out_curve("avg@n", 0.3) == ([0, 2, 3], [0.3, pytest.approx(0.36), 0.42])
    assert grpo.held_out_curve("marker_rate", 0.5) == ([0, 2, 3], [0.5, 0.4, 0.5])
    assert grpo.held_out_curve("ood_breadth_avg@n", 0.2) == ([0, 2, 3], [0.2, 0.1, 0.2])
    scalars = grpo.scalars()
    assert scalars["H_fork"] == 0.8 and scalars["ood_breadth_avg"] == 0.2 and scalars["ood_depth_step_acc"] == 0.4
    assert scalars["step_acc"] == 0.8 and scalars["ood_breadth_pass@4"] == pytest.approx(0.32)
    assert scalars["verification_gap"] == 0.7 and scalars["ood_depth_chance_avg"] == 0.2
    scores = results.per_problem_scores()
    assert scores[("dasd", "ood_breadth")].shape == (5, 4)
    assert "Incomplete" not in text
    del results.runs["grpo"][3:]
    (tmp_path / "runs" / "grpo-seed4" / "eval.json").unlink()
    assert "**Incomplete: not the registered plan.** The claims below are judged on the seeds every method " \
           "finished (0, 1, 2, 3 of 0..4)" in build_report(tmp_path).read_text()
    import json  # an interrupted invocation: study.json was written before the runs, without a wall time

    study = json.loads((tmp_path / "study.json").read_text())
    (tmp_path / "study.json").write_text(json.dumps({**study, "wall_seconds": None}))
    assert "the invocation did not finish" in build_report(tmp_path).read_text()


def test_report_without_tuning_and_on_the_chains_task(tmp_path):
    _fake_study(tmp_path, {"grpo": [dict(avg=0.4), dict(avg=0.5)], "opsd": [dict(avg=0.3), dict(avg=0.35)]},
                task="chains")
    text = build_report(tmp_path).read_text()
    assert text.startswith("# Method study on operation chains (chains task)")
    assert "## Out of distribution" not in text and "OOD" not in text and "| StepAcc" not in text
    assert "| H free | H forced |" in text and "No tuning runs" in text
    assert "a listed candidate at random" not in text and "teacher, weak view" not in text
    assert "the registered claims are not judged" in text  # no per-problem scores on this task
    assert not (tmp_path / "ood_breadth_avg_at_k.png").exists() and (tmp_path / "token_entropy.png").exists()
    results = load_results(tmp_path)
    assert results.task == "chains" and not results.ood_sets and results.token_kinds == ["free", "forced"]


def test_report_leaves_out_the_held_out_curves_when_no_run_measured_them(tmp_path):
    """With `eval_every` 0 (the default) runs have no held-out curve: no plot draws one as a line from the warm start
    to the end."""
    _fake_study(tmp_path, {"grpo": _seeds(2, avg=0.42, ood=0.20), "dasd": _seeds(2, avg=0.40, ood=0.25)})
    for path in tmp_path.glob("runs/*/eval.json"):
        evaluation = json.loads(path.read_text())
        path.write_text(json.dumps({**evaluation, "held_out_curve": []}))
    text = build_report(tmp_path).read_text()
    for name in ("avg_at_k.png", "marker_rate.png", "ood_breadth_avg_at_k.png", "ood_depth_avg_at_k.png"):
        assert not (tmp_path / name).exists() and f"]({name})" not in text
    for name in ("entropy.png", "reward.png", "pass_at_k.png", "token_entropy.png"):
        assert (tmp_path / name).stat().st_size > 0 and f"]({name})" in text
