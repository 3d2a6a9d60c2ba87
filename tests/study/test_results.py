"""selfdistill.study.results: spreads over seeds and the per-problem scores the claims are judged on."""

import math

import numpy as np
import pytest

from selfdistill.study.results import Spread, evaluation_scalars, metric_label
from tests.study.helpers import _fake_study


def test_spread_is_the_sample_spread_over_seeds():
    assert Spread([0.1]).text() == "0.100" and Spread([0.1]).std == 0.0
    spread = Spread([0.40, 0.44])
    assert spread.mean == pytest.approx(0.42) and spread.std == pytest.approx(math.sqrt(0.0008))
    assert spread.range_text() == "0.400–0.440"


def test_scalars_read_every_out_of_distribution_set_and_drop_what_is_not_measured():
    part = {"summary": {"avg@n": 0.5, "pass@1": 0.5, "mean_length": 10.0, "marker_rate": None, "step_acc": 0.9},
            "ood": {"breadth": {"avg@n": 0.2, "pass@1": 0.2, "mean_length": 30.0, "chance_avg": 0.18}}}
    values = evaluation_scalars(part)
    assert values["avg"] == 0.5 and values["step_acc"] == 0.9 and "marker_rate" not in values
    assert values["ood_breadth_avg"] == 0.2 and values["ood_breadth_chance_avg"] == 0.18
    assert metric_label("ood_breadth_avg", 16) == "OOD breadth Avg@16"


def test_per_problem_scores_stack_the_common_seeds_in_order():
    results = _fake_study(None, {"dasd": [dict(avg=0.4), dict(avg=0.5, shift=0.1)],
                                 "grpo": [dict(avg=0.3), dict(avg=0.3)]})
    scores = results.per_problem_scores()
    dasd = scores[("dasd", "avg")]
    assert dasd.shape == (2, 4) and results.common_seeds == [0, 1]
    np.testing.assert_allclose(dasd[1] - dasd[0], [0.2] * 4)  # 0.1 higher mean and the shift of 0.1
    assert scores[("grpo", "ood_depth")].shape == (2, 4) and ("grpo", "missing") not in scores
    # an interrupted study: grpo finished seed 0 only, so every pair is judged on seed 0
    del results.runs["grpo"][1]
    assert results.common_seeds == [0] and results.per_problem_scores()[("dasd", "avg")].shape == (1, 4)
