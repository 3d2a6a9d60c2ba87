"""The self-distillation family (RLRT, vOPD, AntiSD, EOPD, REOPOLD, PW-OPSD): float64 references written
from research notes §9, masking, and the sign of each method on a toy categorical."""

import math

import pytest
import torch

from selfdistill.objectives import (
    OBJECTIVES,
    AntisdKnobs,
    ObjectiveBatch,
    RlrtKnobs,
    aggregate,
    antisd_advantages,
    jsd_ascent_signal,
    position_weights,
    rlrt_advantages,
)
from selfdistill.tokenstats import DivergenceSpec, TokenStats, naive_token_stats
from tests.helpers import FAMILY, B, T, make_stats, rows


def test_rlrt_matches_reference_and_keeps_plain_grpo_on_failures():
    stats, adv, mask = make_stats(1)
    got, diag = rlrt_advantages(adv, stats.logp, stats.teacher_logp, mask, RlrtKnobs(lam=0.6, eps_w=0.2))
    ref = torch.zeros(B, T, dtype=torch.float64)
    for i, valid in enumerate(rows(mask)):
        for t in valid:
            a = float(adv[i])
            if a > 0:
                w = min(max(math.exp(float(stats.logp[i, t]) - float(stats.teacher_logp[i, t])), 0.8), 1.2)
                ref[i, t] = a * (0.4 + 0.6 * w)
            else:
                ref[i, t] = a
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-7)
    assert 0.8 <= diag["rlrt/weight_mean"] <= 1.2
    # on failed rollouts the loss is GRPO's, token for token
    failed = ObjectiveBatch(stats=stats, mask=mask, group_adv=-adv.abs())
    torch.testing.assert_close(OBJECTIVES["rlrt"](failed)[0], OBJECTIVES["dapo"](failed, eps_high=0.2)[0])


def reference_surrogate_on_policy(adv_tok, mask):
    """The clipped surrogate at ratio 1: −A per token (its gradient is −A·∇logp)."""
    return -adv_tok * mask


def test_vopd_matches_reference():
    stats, adv, mask = make_stats(2)
    batch = ObjectiveBatch(stats=stats, mask=mask, group_adv=adv)
    loss, diag = OBJECTIVES["vopd"](batch, coef=0.5)
    kl_adv = stats.teacher_logp.double() - stats.logp.double() + stats.divergence.double()
    ref_adv = (adv.double()[:, None] + 0.5 * kl_adv) * mask.double()
    torch.testing.assert_close(loss.double(), reference_surrogate_on_policy(ref_adv, mask.double()), rtol=1e-6,
                               atol=1e-7)
    torch.testing.assert_close(diag["vopd/kl_advantage_mean"].double(),
                               (kl_adv * mask).sum() / mask.sum(), rtol=1e-6, atol=1e-7)


def test_vopd_control_variate_is_detached_and_only_logp_carries_the_gradient():
    stats, adv, mask = make_stats(3)
    stats.logp.requires_grad_(True)
    stats.divergence.requires_grad_(True)
    loss, _ = OBJECTIVES["vopd"](ObjectiveBatch(stats=stats, mask=mask, group_adv=adv))
    loss.sum().backward()
    assert stats.divergence.grad is None or stats.divergence.grad.abs().sum() == 0
    assert stats.logp.grad.abs().sum() > 0


def test_jsd_ascent_signal_matches_reference_and_its_bound():
    s = torch.tensor([-0.1, -2.0, -5.0, -0.01, -30.0])
    t = torch.tensor([-3.0, -2.0, -0.5, -40.0, -0.1])
    for beta in (0.2, 0.5, 0.9):
        got = jsd_ascent_signal(s, t, beta=beta)
        ref = [si - math.log(beta * math.exp(ti) + (1 - beta) * math.exp(si))
               for si, ti in zip(s.tolist(), t.tolist(), strict=True)]
        torch.testing.assert_close(got.double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-5, atol=1e-6)
        assert (got <= -math.log(1 - beta) + 1e-6).all()  # capped above
        assert got[1].abs() < 1e-6  # the teacher agrees on the token: no signal
    assert jsd_ascent_signal(torch.tensor([-0.01]), torch.tensor([-80.0]), beta=0.5) > 0.69  # near the cap


def test_antisd_matches_reference_with_the_gate():
    stats, adv, mask = make_stats(4)
    stats.teacher_entropy[1] = 0.01  # this rollout's teacher collapsed: its term is off
    got, diag = antisd_advantages(adv, stats.logp, stats.teacher_logp, stats.teacher_entropy, mask,
                                  AntisdKnobs(lam=0.7, beta=0.3, h_min=0.2))
    ref = torch.zeros(B, T, dtype=torch.float64)
    for i, valid in enumerate(rows(mask)):
        mean_h = sum(float(stats.teacher_entropy[i, t]) for t in valid) / len(valid)
        gate = 1.0 if mean_h >= 0.2 else 0.0
        for t in valid:
            s_, t_ = float(stats.logp[i, t]), float(stats.teacher_logp[i, t])
            signal = s_ - math.log(0.3 * math.exp(t_) + 0.7 * math.exp(s_))
            ref[i, t] = float(adv[i]) + 0.7 * gate * signal
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)
    assert diag["antisd/gate_on_fraction"] == 0.75
    floored, _ = antisd_advantages(adv, stats.logp, stats.teacher_logp, stats.teacher_entropy, mask,
                                   AntisdKnobs(lam=1.0, h_min=0.0, floor=0.1))
    assert ((floored - adv[:, None]) * mask >= -0.1 - 1e-6).all()


def test_eopd_matches_reference():
    stats, adv, mask = make_stats(5)
    batch = ObjectiveBatch(stats=stats, mask=mask, group_adv=adv)
    loss, diag = OBJECTIVES["eopd"](batch, h_threshold=0.9)
    opd = -(stats.teacher_logp.double() - stats.logp.double())  # ratio 1: −Â
    high = (stats.teacher_entropy.double() > 0.9).double()
    ref = (opd + high * stats.divergence.double()) * mask.double()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(diag["eopd/high_entropy_fraction"].double(), (high * mask).sum() / mask.sum())


def reference_reopold(stats, mask, lam, beta, phase2):
    floor = math.log(lam) / (1 - lam)
    ref = torch.zeros(mask.shape, dtype=torch.float64)
    for i, valid in enumerate(rows(mask)):
        h = torch.tensor([float(stats.entropy[i, t]) for t in valid], dtype=torch.float64)
        threshold = torch.quantile(h, 1 - beta).item()
        for t in valid:
            r = float(stats.teacher_logp[i, t]) - float(stats.logp[i, t])
            keep = float(stats.entropy[i, t]) >= threshold if phase2 else r >= floor
            ref[i, t] = -keep * max(r, floor) * float(stats.logp[i, t])
    return ref


@pytest.mark.parametrize("step,phase2", [(0, False), (3, False), (4, True), (9, True)])
def test_reopold_matches_reference_in_both_phases(step, phase2):
    stats, adv, mask = make_stats(6)
    stats.teacher_logp[0, :3] = -12.0  # below the floor: dropped in phase I, floored in phase II
    batch = ObjectiveBatch(stats=stats, mask=mask, group_adv=adv, step=step)
    loss, diag = OBJECTIVES["reopold"](batch, lam=0.2, beta=0.3, switch_step=4)
    torch.testing.assert_close(loss.double(), reference_reopold(stats, mask, 0.2, 0.3, phase2), rtol=1e-6,
                               atol=1e-7)
    assert diag["reopold/phase"] == (2.0 if phase2 else 1.0)
    assert diag["reopold/floored_fraction"] > 0
    never, _ = OBJECTIVES["reopold"](batch, lam=0.2, switch_step=None)
    torch.testing.assert_close(never.double(), reference_reopold(stats, mask, 0.2, 0.3, False))


def test_pw_opsd_position_weights_and_loss_match_reference():
    stats, adv, mask = make_stats(7)
    weights = position_weights(mask, w_min=0.3, tau=0.4, scale=0.2)
    ref = torch.zeros(B, T, dtype=torch.float64)
    for i, valid in enumerate(rows(mask)):
        for k, t in enumerate(valid):
            u = (k + 0.5) / len(valid)
            ref[i, t] = 0.3 + 0.7 / (1 + math.exp(-(u - 0.4) / 0.2))
    torch.testing.assert_close(weights.double(), ref, rtol=1e-6, atol=1e-7)
    assert (weights[mask > 0] >= 0.3).all() and (weights[:, 1:] * mask[:, 1:] >= weights[:, :-1] * mask[:, 1:]).all()
    loss, _ = OBJECTIVES["pw_opsd"](ObjectiveBatch(stats=stats, mask=mask, group_adv=adv), w_min=0.3, tau=0.4,
                                    scale=0.2)
    torch.testing.assert_close(loss.double(), ref * stats.divergence.double(), rtol=1e-6, atol=1e-7)
    assert OBJECTIVES["pw_opsd"].aggregation == "seq-mean-token-mean"  # per-rollout mean, then over rollouts


@pytest.mark.parametrize("method", FAMILY)
def test_masked_tokens_give_zero_and_do_not_change_the_rest(method):
    stats, adv, mask = make_stats(8)
    mask[2] = 0  # a whole row of padding too
    batch = ObjectiveBatch(stats=stats, mask=mask, group_adv=adv)
    clean, _ = OBJECTIVES[method](batch)
    pad = mask == 0
    garbage = TokenStats(*(x.masked_fill(pad, v) for x, v in zip(
        (stats.logp, stats.entropy, stats.teacher_logp, stats.teacher_entropy, stats.divergence),
        (-40.0, 50.0, -45.0, 60.0, 1e3), strict=True)))
    dirty, diag = OBJECTIVES[method](ObjectiveBatch(stats=garbage, mask=mask, group_adv=adv))
    assert (dirty[pad] == 0).all()
    torch.testing.assert_close(dirty, clean)  # padded values reach neither loss nor per-row statistics
    assert all(torch.isfinite(v) for v in diag.values())


def _kl(p_logits, q_logits):
    p, q = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return (p.exp() * (p - q)).sum().item()


def run_toy(method, knobs, group_adv=0.0, steps=150, samples=512, lr=0.05, divergence=None):
    """KL(p_S‖p_T) before and after repeated updates of a free categorical student toward/away from a teacher
    (`divergence`: the method's own unless given)."""
    torch.manual_seed(0)
    teacher = torch.tensor([2.0, 0.5, -1.0, 0.0, 1.0, -0.5])
    student = torch.zeros(6, requires_grad=True)
    opt = torch.optim.SGD([student], lr=lr)
    objective = OBJECTIVES[method]
    start = _kl(student.detach(), teacher)
    for _ in range(steps):
        with torch.no_grad():
            tokens = torch.multinomial(student.softmax(-1), samples, replacement=True)[None]  # [1,n]
        stats = naive_token_stats(student.expand(1, samples, 6), tokens, teacher_logits=teacher.expand(1, samples, 6),
                                  divergence=divergence or objective.divergence)
        batch = ObjectiveBatch(stats=stats, mask=torch.ones(1, samples), group_adv=torch.tensor([group_adv]))
        loss, _ = objective(batch, **knobs)
        opt.zero_grad()
        aggregate(loss, batch.mask, mode="token-mean").backward()
        opt.step()
    return start, _kl(student.detach(), teacher)


@pytest.mark.parametrize("method,knobs", [("vopd", {}), ("vopd_topk", {}), ("eopd", {}), ("reopold", {}),
                                          ("reopold", {"switch_step": 0})])
def test_distilling_methods_lower_reverse_kl(method, knobs):
    start, end = run_toy(method, knobs)
    assert end < 0.3 * start


def test_pw_opsd_lowers_reverse_kl():
    # OPSD's clip (0.05 per vocabulary term) stops the gradient of the terms above it: slow, but the same way
    start, end = run_toy("pw_opsd", {})
    assert end < start - 0.01
    unclipped_start, unclipped_end = run_toy("pw_opsd", {}, divergence=DivergenceSpec(beta=0.0))
    assert unclipped_end < 0.3 * unclipped_start


def test_antisd_raises_reverse_kl():
    start, end = run_toy("antisd", {"lam": 1.0, "h_min": 0.0})
    assert end > start + 0.3
    gated_start, gated_end = run_toy("antisd", {"lam": 1.0, "h_min": 100.0}, steps=20)
    assert abs(gated_end - gated_start) < 1e-6  # the teacher "collapsed" (below h_min): GRPO with A = 0, no move


def test_rlrt_raises_reverse_kl_on_successes_where_rlsd_lowers_it():
    # A = +1 on every rollout: GRPO alone does not move in expectation; the weights decide the drift
    start, rlrt_end = run_toy("rlrt", {"lam": 1.0, "eps_w": 0.5}, group_adv=1.0, steps=200, samples=2048)
    _, rlsd_end = run_toy("rlsd", {"lam": 1.0, "eps_w": 0.5}, group_adv=1.0, steps=200, samples=2048)
    assert rlrt_end > start + 0.1
    assert rlsd_end < start - 0.1
