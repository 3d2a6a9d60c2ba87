"""The statistics a pre-registered claim is judged with: a paired bootstrap over seeds × problems, Holm's
correction over a family of claims, and an equivalence test for "keeps X" claims.

Every function takes per-cell scores: `[S, P]` arrays, one row per training seed and one column per held-out
problem (e.g. each problem's Avg@k in that seed's run), for two methods trained on the same seeds and scored on
the same problems. The difference of the two is what is judged. Resampling both seeds and problems (a crossed
bootstrap) lets both sources of variation count: a claim must hold across training runs *and* across problems,
not only on the problems that happened to be drawn.

Pure functions of numpy arrays and a seed; the same inputs give the same intervals on every machine.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

DEFAULT_RESAMPLES = 10_000


@dataclass(frozen=True)
class Interval:
    """The mean paired difference `estimate` (a − b over every seed × problem cell), its percentile interval
    `[low, high]` at `confidence`, and bootstrap tail fractions: `below` = P*(d* ≤ threshold_low),
    `above` = P*(d* ≥ threshold_high) (the thresholds are 0, 0 for a difference test and −margin, +margin for
    an equivalence test)."""

    estimate: float
    low: float
    high: float
    confidence: float
    below: float
    above: float
    resamples: int

    @property
    def p_two_sided(self) -> float:
        """Two-sided bootstrap p-value for "no difference": twice the smaller tail, at most 1."""
        return min(1.0, 2.0 * min(self.below, self.above))


def bootstrap_means(diff: np.ndarray, *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> np.ndarray:
    """`[resamples]` means of `diff` `[S, P]`, each over S seeds and P problems drawn with replacement, the two
    draws independent. A resample's mean over its drawn cells is `w_s · diff · w_p / (S·P)` with `w_s`, `w_p`
    the multinomial counts of each seed and problem, computed for every resample at once."""
    diff = np.asarray(diff, dtype=np.float64)
    if diff.ndim != 2 or 0 in diff.shape:
        raise ValueError(f"scores must be a non-empty [seeds, problems] array, got shape {diff.shape}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    S, P = diff.shape
    rng = np.random.default_rng(seed)
    seed_counts = rng.multinomial(S, np.full(S, 1.0 / S), size=resamples)  # [R,S]
    problem_counts = rng.multinomial(P, np.full(P, 1.0 / P), size=resamples)  # [R,P]
    row_sums = problem_counts @ diff.T  # [R,S]: Σ_p w_p·diff[s,p] for every seed s
    return np.einsum("rs,rs->r", seed_counts, row_sums) / (S * P)  # [R]


def paired_bootstrap(a: np.ndarray, b: np.ndarray, *, confidence: float = 0.95, resamples: int = DEFAULT_RESAMPLES,
                     seed: int = 0, margin: float = 0.0) -> Interval:
    """The paired difference a − b of two `[S, P]` score arrays, with a percentile interval at `confidence` and
    the tail fractions at ∓`margin` (0: a difference test; > 0: an equivalence test, see `equivalence`)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired scores must have one shape: {a.shape} vs {b.shape}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    diff = a - b  # [S,P]
    means = bootstrap_means(diff, resamples=resamples, seed=seed)  # [R]
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    # (count + 1) / (R + 1): a bootstrap p-value is never exactly 0 from finitely many resamples
    below = (np.count_nonzero(means <= -margin) + 1) / (resamples + 1)
    above = (np.count_nonzero(means >= margin) + 1) / (resamples + 1)
    return Interval(float(diff.mean()), float(low), float(high), confidence, below, above, resamples)


def equivalence(a: np.ndarray, b: np.ndarray, *, margin: float, alpha: float = 0.05,
                resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> tuple[Interval, float]:
    """Two one-sided tests (TOST) that |a − b| < `margin`: `(interval, p)` with the (1 − 2·alpha) interval and
    `p = max(P*(d* ≤ −margin), P*(d* ≥ margin))`. Equivalence is shown when p < alpha, which is the same as the
    (1 − 2·alpha) interval lying inside (−margin, margin). "Keeps X" claims use this, so that they can fail."""
    if margin <= 0:
        raise ValueError(f"an equivalence margin must be positive, got {margin}")
    interval = paired_bootstrap(a, b, confidence=1.0 - 2.0 * alpha, resamples=resamples, seed=seed, margin=margin)
    return interval, max(interval.below, interval.above)


def holm(p_values: Mapping[str, float]) -> dict[str, float]:
    """Holm's step-down adjusted p-values over a family of claims: sorted ascending, the i-th (from 0) of m is
    multiplied by m − i, and each adjusted value is at least the one before it (capped at 1). A claim is
    significant at family-wise level alpha when its adjusted p < alpha."""
    for name, p in p_values.items():
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p-value of {name!r} must lie in [0, 1], got {p}")
    ordered = sorted(p_values, key=lambda name: (p_values[name], name))
    m = len(ordered)
    adjusted: dict[str, float] = {}
    running = 0.0
    for i, name in enumerate(ordered):
        running = max(running, min(1.0, (m - i) * p_values[name]))
        adjusted[name] = running
    return adjusted
