"""selfdistill.study.results: the verdict on the seeds' differences."""

from selfdistill.study.results import Spread, verdict


def test_verdict_needs_agreeing_seeds_and_a_clear_mean():
    assert verdict(Spread([0.1])) == "one seed: no spread"
    assert verdict(Spread([0.0, 0.0])) == "identical in every seed"
    assert verdict(Spread([0.10, 0.12, 0.11])) == "higher in every seed"
    assert verdict(Spread([0.01, 0.5, 0.01])) == "same sign in all 3 seeds, but within 2 SE"
    assert verdict(Spread([-0.1, 0.1, 0.05])) == "within seed noise (signs differ)"
