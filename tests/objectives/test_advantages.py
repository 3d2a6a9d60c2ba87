"""selfdistill.objectives.advantages against float64 references (SPEC §2, research notes §9): RLSD,
EGRSD, DASD's routing, scale floor, bounded push and shuffled direction, and the shape errors."""

import math

import pytest
import torch

from selfdistill.objectives import (
    DasdKnobs,
    EgrsdKnobs,
    RlsdKnobs,
    dasd_advantages,
    dasd_direction,
    egrsd_advantages,
    lookahead_mean,
    masked_quantile,
    rlsd_advantages,
)
from tests.helpers import make_batch


def test_dasd_scale_floor_keeps_float_noise_from_becoming_an_advantage():
    """Regression (issue #15): with teacher ≈ student, δ / MAD(δ) turned 1e-6 of noise into O(1) advantages; a floor
    keeps it out (no floor is the default since the third study's tuning: it is the user's to set)."""
    g = torch.Generator().manual_seed(10)
    s = -torch.rand(2, 12, generator=g) * 3
    t = s + 1e-6 * torch.randn(2, 12, generator=g)  # a live teacher: the same model, float noise apart
    H = torch.rand(2, 12, generator=g) * 2
    mask = torch.ones(2, 12)
    adv = torch.tensor([0.5, -0.5])
    unfloored, _ = dasd_advantages(adv, s, t, H, mask, DasdKnobs(gate=False, beta=1.0))  # the default: no floor
    floored, _ = dasd_advantages(adv, s, t, H, mask, DasdKnobs(scale_floor=0.1, gate=False, beta=1.0))
    assert (unfloored - adv[:, None]).abs().max() > 0.3  # the bug: noise of order 1
    assert (floored - adv[:, None]).abs().max() < 1e-4
    # where δ is real the floor does not bind: the reference tests with MAD scaling are unchanged
    t2 = -torch.rand(2, 12, generator=g) * 3
    a, _ = dasd_advantages(adv, s, t2, H, mask, DasdKnobs(scale_floor=0.1))
    b, _ = dasd_advantages(adv, s, t2, H, mask)
    torch.testing.assert_close(a, b)


def test_dasd_bounded_push_signal_matches_reference_and_is_bounded():
    T_ = 20
    entropy = torch.linspace(0.05, 3.0, T_)[None]  # the last tokens are pushed
    s = torch.full((1, T_), -0.05)
    t = torch.where(torch.arange(T_) % 2 == 0, -25.0, -0.02)[None]  # the teacher rules out every other token
    mask = torch.ones(1, T_)
    adv0 = torch.tensor([0.0])
    raw, _ = dasd_advantages(adv0, s, t, entropy, mask, DasdKnobs(beta=1.0, gate=False, push_signal="log_ratio"))
    bounded, _ = dasd_advantages(adv0, s, t, entropy, mask,
                                 DasdKnobs(beta=1.0, gate=False, push_signal="jsd", push_beta=0.5))
    gap = (t - s).double()
    scale = max((gap - gap.mean()).abs().mean().item(), 0.1)
    omega, _, _, _ = dasd_direction(entropy, t - s, mask, DasdKnobs(gate=False))
    ascent = s.double() - torch.log(0.5 * t.double().exp() + 0.5 * s.double().exp())
    ref = torch.where(omega < 0, omega.double() * (-ascent) / (scale + 1e-6), omega.double() * gap / (scale + 1e-6))
    torch.testing.assert_close(bounded.double(), ref, rtol=1e-5, atol=1e-6)
    pushed = omega[0] < 0
    assert pushed.any() and (~pushed).any()
    torch.testing.assert_close(bounded[0, ~pushed], raw[0, ~pushed])  # pull tokens keep the log-ratio
    assert bounded[0, pushed].max() <= math.log(2) / scale + 1e-5  # the push is capped ...
    assert raw[0, pushed].max() > 5 * bounded[0, pushed].max()  # ... where the raw log-ratio is not


def test_shuffled_direction_permutes_dasds_omega_within_each_rollout():
    g = torch.Generator().manual_seed(21)
    B_, T_ = 6, 10
    s, t = -torch.rand(B_, T_, generator=g) * 3, -torch.rand(B_, T_, generator=g) * 3
    H = torch.rand(B_, T_, generator=g) * 2
    mask = (torch.arange(T_)[None] < torch.tensor([10, 7, 7, 3, 1, 10])[:, None]).float()
    dasd = dasd_direction(H, t - s, mask, DasdKnobs())
    shuffled = dasd_direction(H, t - s, mask, DasdKnobs(direction="shuffled"), step=4)
    for row in range(B_):
        valid = mask[row] > 0
        torch.testing.assert_close(shuffled.omega[row, valid].sort().values, dasd.omega[row, valid].sort().values)
        assert (shuffled.omega[row, ~valid] == 0).all()
    assert not torch.equal(shuffled.omega, dasd.omega)
    assert shuffled.diagnostics["dasd/push_fraction"] == dasd.diagnostics["dasd/push_fraction"]
    # the same rows in two blocks give the same permutation (micro-batching cannot change the control) ...
    halves = [dasd_direction(H[rows], (t - s)[rows], mask[rows], DasdKnobs(direction="shuffled"), step=4).omega
              for rows in (slice(0, 2), slice(2, 6))]
    torch.testing.assert_close(torch.cat(halves), shuffled.omega)
    # ... and another step draws another one
    assert not torch.equal(dasd_direction(H, t - s, mask, DasdKnobs(direction="shuffled"), step=5).omega,
                           shuffled.omega)


def test_rlsd_matches_reference():
    s, t, _, _, adv, mask = make_batch(9)
    got, _ = rlsd_advantages(adv, s, t, mask, RlsdKnobs(lam=0.5, eps_w=0.2))
    delta = t.double() - s.double()
    w = torch.exp(torch.sign(adv.double())[:, None] * delta).clamp(0.8, 1.2)
    ref = adv.double()[:, None] * (0.5 + 0.5 * w) * mask
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-7)


def reference_lookahead(H, mask, k):
    out = H.clone().double()
    for i in range(H.shape[0]):
        for t in range(H.shape[1]):
            future = [H[i, u].item() for u in range(t + 1, min(t + 1 + k, H.shape[1])) if mask[i, u] > 0]
            if future:
                out[i, t] = sum(future) / len(future)
    return out


@pytest.mark.parametrize("lookahead", [None, 1, 3])
def test_egrsd_matches_reference(lookahead):
    s, t, _, t_ent, adv, mask = make_batch(10)
    got, diag = egrsd_advantages(adv, s, t, t_ent, mask,
                                 EgrsdKnobs(lam=0.7, eps_w=0.2, g_min=0.2, tau_h=0.8, lookahead=lookahead))
    H = t_ent.double()
    if lookahead:
        H = torch.minimum(H, reference_lookahead(t_ent, mask, lookahead))
        torch.testing.assert_close(lookahead_mean(t_ent, mask, lookahead).double(),
                                   reference_lookahead(t_ent, mask, lookahead), rtol=1e-6, atol=1e-6)
    gate = 0.2 + 0.8 * torch.exp(-H / 0.8)
    w = torch.exp(torch.sign(adv.double())[:, None] * (t.double() - s.double())).clamp(0.8, 1.2)
    ref = adv.double()[:, None] * (0.3 + 0.7 * w) * gate * mask
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-7)
    assert 0.2 <= diag["egrsd/gate_mean"].item() <= 1.0


def test_egrsd_weights_never_fall_below_the_floor():
    T_ = 50
    t_ent = torch.linspace(0, 1e4, T_)[None]  # from certain to absurdly uncertain
    adv = torch.tensor([1.0])
    zeros = torch.zeros(1, T_)
    for lookahead in (None, 4):
        got, _ = egrsd_advantages(adv, zeros, zeros, t_ent, torch.ones(1, T_),
                                  EgrsdKnobs(lam=1.0, g_min=0.2, lookahead=lookahead))
        assert (got >= 0.2 - 1e-7).all()  # w = 1 at δ = 0, so Â = gate


def test_cl_egrsd_transient_spike_keeps_more_weight_than_sustained():
    transient = torch.tensor([[0.1, 3.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]])
    sustained = torch.tensor([[0.1, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0]])
    mask = torch.ones(1, 8)
    zeros = torch.zeros(1, 8)
    adv = torch.tensor([1.0])
    a_transient, _ = egrsd_advantages(adv, zeros, zeros, transient, mask, EgrsdKnobs(lookahead=4))
    a_sustained, _ = egrsd_advantages(adv, zeros, zeros, sustained, mask, EgrsdKnobs(lookahead=4))
    assert a_transient[0, 1] > 2 * a_sustained[0, 1]
    plain, _ = egrsd_advantages(adv, zeros, zeros, transient, mask)
    assert a_transient[0, 1] > plain[0, 1]  # without lookahead the spike is damped


def test_masked_quantile_matches_torch_quantile():
    x = torch.randn(5, 9, generator=torch.Generator().manual_seed(11))
    _, _, _, _, _, mask = make_batch(12, B=5, T=9)
    for q in (0.0, 0.2, 0.5, 0.8, 1.0):
        got = masked_quantile(x, mask, q)
        ref = torch.stack([torch.quantile(x[i][mask[i] > 0], q) for i in range(5)])[:, None]
        torch.testing.assert_close(got, ref)
    assert masked_quantile(x, torch.zeros_like(x), 0.5).abs().sum() == 0


def reference_dasd(adv, s, t, H, mask, rho, beta, quantile="top", gate=True, eps=1e-6):
    out = torch.zeros(s.shape, dtype=torch.float64)
    for i in range(s.shape[0]):
        idx = [u for u in range(s.shape[1]) if mask[i, u] > 0]
        d = torch.tensor([t[i, u].item() - s[i, u].item() for u in idx], dtype=torch.float64)
        h = torch.tensor([H[i, u].item() for u in idx], dtype=torch.float64)
        d_bar = d / ((d - d.mean()).abs().mean() + eps)
        tau = torch.quantile(h, 1 - rho if quantile == "top" else rho)
        sigma = (h - h.mean()).abs().mean()
        omega = torch.tanh((tau - h) / (sigma + eps))
        if gate:
            omega = omega * torch.sigmoid(d_bar.abs() - 1)
        for j, u in enumerate(idx):
            out[i, u] = adv[i].item() + beta * omega[j] * d_bar[j]
    return out


@pytest.mark.parametrize("quantile,gate", [("top", True), ("bottom", True), ("top", False)])
def test_dasd_matches_reference(quantile, gate):
    s, t, s_ent, _, adv, mask = make_batch(13)
    knobs = DasdKnobs(rho=0.2, beta=0.7, quantile=quantile, gate=gate, push_signal="log_ratio")  # the raw form
    got, diag = dasd_advantages(adv, s, t, s_ent, mask, knobs)
    ref = reference_dasd(adv, s, t, s_ent, mask, 0.2, 0.7, quantile, gate)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    assert 0 <= diag["dasd/push_fraction"] <= 1 and 0 <= diag["dasd/pull_fraction"] <= 1


def test_dasd_conform_and_novelty_are_plus_and_minus_one():
    s, t, s_ent, _, adv, mask = make_batch(14)
    d = t - s
    d_bar = d / ((d - (d * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True)).abs().mul(mask).sum(1, keepdim=True)
                 / mask.sum(1, keepdim=True) + 1e-6)
    raw = {"beta": 1.0, "push_signal": "log_ratio"}
    conform, c_diag = dasd_advantages(adv, s, t, s_ent, mask, DasdKnobs(direction="conform", **raw))
    novelty, _ = dasd_advantages(adv, s, t, s_ent, mask, DasdKnobs(direction="novelty", **raw))
    torch.testing.assert_close(conform, (adv[:, None] + d_bar) * mask, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(novelty, (adv[:, None] - d_bar) * mask, rtol=1e-5, atol=1e-6)
    assert c_diag["dasd/pull_fraction"] == 1.0


def test_dasd_pulls_lowest_entropy_and_pushes_highest_tokens():
    T_ = 20
    entropy = torch.linspace(0.05, 3.0, T_)[None]  # [1,T]
    gap = torch.where(torch.arange(T_) % 2 == 0, 2.0, -2.0)[None]  # teacher disagrees in both directions
    s = torch.zeros(1, T_)
    adv, diag = dasd_advantages(torch.tensor([0.0]), s, gap, entropy, torch.ones(1, T_), DasdKnobs(rho=0.2, beta=1.0))
    omega_sign = torch.sign(adv / gap)  # Â = ω·δ̄ with δ̄ of δ's sign
    assert (omega_sign[0, :5] > 0).all()  # calmest tokens: pulled toward the teacher
    assert (omega_sign[0, -3:] < 0).all()  # most uncertain: pushed away
    assert 0.1 <= diag["dasd/push_fraction"] <= 0.3


def test_objective_shape_errors_name_the_shapes():
    s, t, s_ent, _, adv, mask = make_batch(17)
    with pytest.raises(ValueError, match=r"teacher_logp=\(4, 6\)"):
        rlsd_advantages(adv, s, t[:, :6], mask)
    with pytest.raises(ValueError, match=r"group_adv must be \[B\]=4"):
        dasd_advantages(adv[:3], s, t, s_ent, mask)
    with pytest.raises(ValueError, match="direction"):
        DasdKnobs(direction="sideways")
