"""The claim statistics against naive references: the crossed bootstrap as a loop over explicit draws, Holm as
the textbook step-down, and the equivalence test on cases whose answer is known."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from selfdistill.study.statistics import bootstrap_means, equivalence, holm, paired_bootstrap


def test_bootstrap_means_equal_a_loop_over_the_same_draws():
    rng = np.random.default_rng(3)
    diff = rng.normal(size=(4, 9))  # [S,P]
    R = 50
    got = bootstrap_means(diff, resamples=R, seed=11)
    draws = np.random.default_rng(11)  # the same stream: seed counts for every resample, then problem counts
    seed_counts = draws.multinomial(4, np.full(4, 0.25), size=R)
    problem_counts = draws.multinomial(9, np.full(9, 1 / 9), size=R)
    for r in range(R):
        seeds = [s for s in range(4) for _ in range(seed_counts[r, s])]
        problems = [p for p in range(9) for _ in range(problem_counts[r, p])]
        cells = [diff[s, p] for s, p in itertools.product(seeds, problems)]
        assert got[r] == pytest.approx(sum(cells) / len(cells), rel=1e-12, abs=1e-12)


def test_a_clear_difference_is_found_and_identical_methods_are_not():
    rng = np.random.default_rng(0)
    b = rng.uniform(size=(6, 40))
    a = b + 0.1 + rng.normal(scale=0.02, size=b.shape)
    result = paired_bootstrap(a, b, resamples=2000)
    assert result.estimate == pytest.approx(float((a - b).mean()))
    assert 0.0 < result.low < result.estimate < result.high
    assert result.p_two_sided < 0.01 and result.above > 0.99
    same = paired_bootstrap(b, b, resamples=2000)
    assert (same.estimate, same.low, same.high, same.p_two_sided) == (0.0, 0.0, 0.0, 1.0)


def test_the_interval_widens_with_seed_to_seed_variation():
    # Problems alone would call this difference certain; three seeds that disagree must widen the interval.
    rng = np.random.default_rng(1)
    b = rng.uniform(size=(3, 200))
    steady = b + 0.05
    seedy = b + np.array([[0.25], [-0.05], [-0.05]])  # the same mean difference, carried by one seed
    assert paired_bootstrap(seedy, b).high - paired_bootstrap(seedy, b).low > \
        5 * (paired_bootstrap(steady, b).high - paired_bootstrap(steady, b).low)
    assert paired_bootstrap(seedy, b).p_two_sided > 0.05


def test_equivalence_holds_inside_the_margin_and_fails_outside_it():
    rng = np.random.default_rng(2)
    b = rng.uniform(size=(5, 60))
    close = b + rng.normal(scale=0.01, size=b.shape)
    interval, p = equivalence(close, b, margin=0.02)
    assert p < 0.05 and interval.low > -0.02 and interval.high < 0.02
    shifted = b + 0.03
    _, p_far = equivalence(shifted, b, margin=0.02)
    assert p_far > 0.5  # a real drop or rise beyond the margin is never "kept"
    noisy = b + rng.normal(scale=0.5, size=b.shape)
    _, p_noisy = equivalence(noisy, b, margin=0.02)
    assert p_noisy > 0.05  # too noisy to show equivalence: it fails, not passes by default
    with pytest.raises(ValueError, match="margin must be positive"):
        equivalence(close, b, margin=0.0)


def naive_holm(p):
    names = sorted(p, key=lambda n: (p[n], n))
    m = len(names)
    adjusted = {}
    for i, name in enumerate(names):
        adjusted[name] = min(1.0, max((m - j) * p[names[j]] for j in range(i + 1)))
    return adjusted


def test_holm_matches_the_textbook_step_down():
    p = {"K1": 0.01, "K2": 0.04, "D1": 0.03, "D2": 0.005, "D3": 0.5, "D4": 0.04}
    assert holm(p) == pytest.approx(naive_holm(p))
    assert holm(p)["D2"] == pytest.approx(0.03) and holm(p)["D3"] == 0.5
    significant = {name for name, q in holm(p).items() if q < 0.05}
    assert significant == {"D2"}  # K1 alone would pass at 0.05; 6 claims make it 0.05 only
    rng = np.random.default_rng(4)
    for _ in range(20):
        many = {f"c{i}": float(x) for i, x in enumerate(rng.uniform(size=8))}
        assert holm(many) == pytest.approx(naive_holm(many))
    with pytest.raises(ValueError, match="must lie in"):
        holm({"x": 1.5})


def test_bad_inputs_are_refused_with_the_shapes():
    with pytest.raises(ValueError, match=r"one shape: \(2, 3\) vs \(2, 4\)"):
        paired_bootstrap(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"\[seeds, problems\]"):
        bootstrap_means(np.zeros(5))


def test_with_five_seeds_a_null_difference_is_called_about_five_percent_of_the_time():
    # The rule it replaces ("same sign in every seed, |mean| > 2 SE", 3 seeds) passed a null effect about 9 % of
    # the time per claim. Here: a run-level and a problem-level null effect, 5 seeds x 40 problems, 200 studies.
    rng = np.random.default_rng(0)
    called = 0
    for k in range(200):
        diff = rng.normal(scale=0.05, size=(5, 1)) + rng.normal(scale=0.2, size=(5, 40))
        called += paired_bootstrap(diff, np.zeros_like(diff), resamples=1000, seed=k).p_two_sided < 0.05
    assert called / 200 <= 0.07
