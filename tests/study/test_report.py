"""selfdistill.study.report: the tables, plots and paired differences of a finished study."""

import pytest

from selfdistill.study.plots import PLOTS
from selfdistill.study.report import build_report
from selfdistill.study.results import load_results, paired_difference, verdict
from tests.study.helpers import _fake_study


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
