"""selfdistill.study.claims: each claim judged on the paired differences."""

import pytest

from selfdistill.study.claims import CLAIMS, DOES_NOT_HOLD, HOLDS, INCONCLUSIVE, judge
from tests.study.helpers import _fake_study


def _claim(name):
    return next(claim for claim in CLAIMS if claim.name == name)


@pytest.mark.parametrize(("opsd_e", "expected"), [
    ((0.1, 0.2, 0.15), HOLDS),  # lower than GRPO's 0.5 in every seed
    ((0.1, 0.9, 0.15), INCONCLUSIVE),  # mixed signs
    ((0.6, 0.7, 0.65), DOES_NOT_HOLD),  # higher in every seed
])
def test_claim_k1_is_judged_on_the_paired_difference(opsd_e, expected):
    results = _fake_study(None, {"grpo": [dict(e=0.5)] * 3, "opsd": [dict(e=e) for e in opsd_e]})
    result = judge(_claim("K1"), results)
    assert result.verdict == expected and result.against == "grpo"
    assert result.diff.values == pytest.approx([e - 0.5 for e in opsd_e])


def test_claims_need_the_methods_and_two_seeds():
    one_seed = _fake_study(None, {"grpo": [dict(e=0.5)], "opsd": [dict(e=0.1)]})
    assert judge(_claim("K1"), one_seed).verdict == INCONCLUSIVE
    missing = judge(_claim("K5"), one_seed)
    assert missing.verdict == INCONCLUSIVE and missing.note == "opsd_weak did not run"


def test_not_lower_and_best_claims():
    grpo = [dict(avg=0.40, e=0.5, step_acc=0.8), dict(avg=0.44, e=0.5, step_acc=0.8)]
    noisy = _fake_study(None, {"grpo": grpo, "dasd": [dict(avg=0.5, e=0.6, step_acc=0.7),
                                                      dict(avg=0.6, e=0.4, step_acc=0.6)]})
    assert judge(_claim("D3"), noisy).verdict == HOLDS  # E(y): +0.1, −0.1: no clear drop
    assert judge(_claim("D4"), noisy).verdict == DOES_NOT_HOLD  # StepAcc: −0.1, −0.2
    assert judge(_claim("D5"), noisy).verdict == HOLDS  # +0.10, +0.16 over the runner-up grpo
    opsd = [dict(avg=0.55), dict(avg=0.45)]  # mean 0.50: below dasd's 0.55, above it in one seed
    close = _fake_study(None, {"grpo": grpo, "opsd": opsd, "dasd": [dict(avg=0.5), dict(avg=0.6)]})
    result = judge(_claim("D5"), close)
    assert result.verdict == INCONCLUSIVE and result.against == "opsd"
    beaten = _fake_study(None, {"grpo": grpo, "dasd": [dict(avg=0.3), dict(avg=0.35)]})
    assert judge(_claim("D5"), beaten).verdict == DOES_NOT_HOLD
    # the sweep variants are no rivals of the "best" claims
    swept = _fake_study(None, {"grpo": grpo, "dasd": [dict(avg=0.5), dict(avg=0.6)],
                               "dasd_beta0.1": [dict(avg=0.9), dict(avg=0.9)]})
    assert judge(_claim("D5"), swept).verdict == HOLDS
