"""`selfdistill.study.preregistration`: the third study's claims and the rule that judges them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from selfdistill.study.preregistration import (
    CLAIM_SEEDS,
    CLAIMS,
    HOLDS,
    NOT_RUN,
    NOT_SHOWN,
    REVERSED,
    TUNING_SEEDS,
    Hypothesis,
    judge,
)
from selfdistill.study.settings import METHODS

MATCHED_CONTROLS = {"grpo_token_mean", "dasd_shuffled", "dasd", "conform", "novelty"}


def test_the_registered_claims_are_well_formed():
    assert len({c.name for c in CLAIMS}) == len(CLAIMS)
    for claim in CLAIMS:
        assert claim.a in METHODS and claim.b in METHODS, claim.name
        if "dasd" in (claim.a, claim.b):  # a DASD claim is against a control that differs only in what it claims
            assert {claim.a, claim.b} <= MATCHED_CONTROLS, claim.name
    assert len(CLAIM_SEEDS) >= 5 and not set(CLAIM_SEEDS) & set(TUNING_SEEDS)


def test_a_hypothesis_checks_its_shape():
    with pytest.raises(ValueError, match="test must be one of"):
        Hypothesis("X", "", "dasd", "grpo", "avg", "bigger", control="")
    with pytest.raises(ValueError, match="positive margin"):
        Hypothesis("X", "", "dasd", "grpo", "avg", "equivalent", control="")
    with pytest.raises(ValueError, match="positive margin"):
        Hypothesis("X", "", "dasd", "grpo", "avg", "greater", control="", margin=0.1)
    with pytest.raises(ValueError, match="twice"):
        Hypothesis("X", "", "dasd", "dasd", "avg", "greater", control="")


def _scores(rng, shift=0.0, noise=0.1):
    base = rng.uniform(0.2, 0.8, size=(5, 40))  # [seeds, problems]
    return base, base + shift + rng.normal(0.0, noise, size=base.shape)


def test_the_rule_gives_each_verdict():
    rng = np.random.default_rng(0)
    claims = (
        Hypothesis("up", "", "a1", "b1", "m", "greater", control=""),  # a real, large effect
        Hypothesis("null", "", "a2", "b2", "m", "greater", control=""),  # no effect
        Hypothesis("wrong way", "", "a3", "b3", "m", "greater", control=""),  # the opposite effect
        Hypothesis("keeps", "", "a4", "b4", "m", "equivalent", control="", margin=0.05),  # equal
        Hypothesis("loses", "", "a5", "b5", "m", "equivalent", control="", margin=0.05),  # far apart
        Hypothesis("missing", "", "a6", "b6", "m", "less", control=""),
    )
    scores = {}
    for k, shift, noise in [(1, 0.2, 0.05), (2, 0.0, 0.05), (3, -0.2, 0.05), (4, 0.0, 0.01), (5, 0.3, 0.01)]:
        b, a = _scores(rng, shift, noise)
        scores[(f"a{k}", "m")], scores[(f"b{k}", "m")] = a, b
    verdicts = {v.claim.name: v for v in judge(scores, claims, resamples=2000)}
    assert verdicts["up"].verdict == HOLDS and verdicts["up"].interval.low > 0
    assert verdicts["null"].verdict == NOT_SHOWN
    assert verdicts["wrong way"].verdict == REVERSED
    assert verdicts["keeps"].verdict == HOLDS
    assert verdicts["loses"].verdict == REVERSED
    assert verdicts["missing"].verdict == NOT_RUN and verdicts["missing"].interval is None
    assert all(v.p_holm >= v.p for v in verdicts.values())  # Holm never lowers a p-value


def test_the_family_correction_counts_every_registered_claim():
    """A borderline effect holds alone, not among ten registered claims, even when the other nine did not run."""
    rng = np.random.default_rng(3)
    b = rng.uniform(0.2, 0.8, size=(5, 40))
    a = b + 0.012 + rng.normal(0.0, 0.05, size=b.shape)
    claim = Hypothesis("edge", "", "a", "b", "m", "greater", control="")
    alone = judge({("a", "m"): a, ("b", "m"): b}, (claim,), resamples=4000)[0]
    assert 0.001 < alone.p < 0.05 and alone.verdict == HOLDS  # the data were drawn so that it is borderline
    others = tuple(dataclasses.replace(claim, name=f"other{k}", a=f"x{k}") for k in range(9))
    among = judge({("a", "m"): a, ("b", "m"): b}, (claim, *others), resamples=4000)[0]
    assert among.p == alone.p and among.p_holm == pytest.approx(min(1.0, 10 * alone.p))
    assert among.verdict != HOLDS
