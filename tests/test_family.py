"""The self-distillation family (RLRT, vOPD, AntiSD, EOPD, REOPOLD, PW-OPSD) and DASD's two options:
float64 references written from research notes §9, the sign contract on a toy categorical, masking,
and knob validation."""

import math

import pytest
import torch

from selfdistill.config import ConfigError, config_from_dict
from selfdistill.objectives import (
    OBJECTIVES,
    AntisdKnobs,
    DasdKnobs,
    KnobError,
    ObjectiveBatch,
    RlrtKnobs,
    aggregate,
    antisd_advantages,
    dasd_advantages,
    dasd_direction,
    jsd_ascent_signal,
    position_weights,
    rlrt_advantages,
)
from selfdistill.tokenstats import DivergenceSpec, TokenStats, naive_token_stats

FAMILY = ("rlrt", "vopd", "vopd_topk", "antisd", "eopd", "reopold", "pw_opsd")
B, T = 4, 7


def make_stats(seed=0, B=B, T=T):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T)
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    for i, n in enumerate(lengths):
        mask[i, n:] = 0
    stats = TokenStats(logp=-torch.rand(B, T, generator=g) * 3, entropy=torch.rand(B, T, generator=g) * 2,
                       teacher_logp=-torch.rand(B, T, generator=g) * 3,
                       teacher_entropy=torch.rand(B, T, generator=g) * 2,
                       divergence=torch.rand(B, T, generator=g))
    adv = torch.tensor([1.2, -0.4, 0.7, -1.5])[:B]
    return stats, adv, mask


def rows(mask):
    """Each row's valid positions."""
    return [[t for t in range(mask.shape[1]) if mask[i, t] > 0] for i in range(mask.shape[0])]


# ---------------------------------------------------------------- float64 references


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


# ---------------------------------------------------------------- masking


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


# ---------------------------------------------------------------- the sign contract


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


# ---------------------------------------------------------------- knobs


BAD_KNOBS = [("rlrt", "eps_w", 1.5), ("rlrt", "lam", 2.0), ("vopd", "eps_low", -0.1), ("antisd", "beta", 1.0),
             ("antisd", "h_min", -1.0), ("antisd", "floor", 0.0), ("eopd", "h_threshold", -0.5),
             ("reopold", "lam", 1.0), ("reopold", "beta", 0.0), ("reopold", "switch_step", -1),
             ("pw_opsd", "w_min", 1.5), ("pw_opsd", "scale", 0.0), ("dasd", "scale_floor", -1.0),
             ("dasd", "push_signal", "bounded"), ("dasd", "push_beta", 1.0)]


@pytest.mark.parametrize("method,knob,value", BAD_KNOBS)
def test_bad_knobs_raise_errors_naming_the_knob(method, knob, value):
    stats, adv, mask = make_stats(9)
    with pytest.raises(KnobError, match=f"^{knob} ") as error:
        OBJECTIVES[method](ObjectiveBatch(stats=stats, mask=mask, group_adv=adv), **{knob: value})
    assert error.value.knob == knob
    with pytest.raises(ConfigError, match=rf"objective\.knobs\.{knob}\b"):
        config_from_dict({"objective": {"name": method, "knobs": {knob: value}}})


def test_every_family_knob_is_known_to_the_config_without_a_field():
    for method in FAMILY:
        defaults = OBJECTIVES[method].knob_defaults()
        assert defaults, method
        config = config_from_dict({"objective": {"name": method, "knobs": dict(defaults)}})
        assert config.objective.knobs == defaults


# ---------------------------------------------------------------- DASD: scale floor and bounded push


def test_dasd_scale_floor_keeps_float_noise_from_becoming_an_advantage():
    """Regression (issue #15): with teacher ≈ student, δ / MAD(δ) turned 1e-6 of noise into O(1) advantages."""
    g = torch.Generator().manual_seed(10)
    s = -torch.rand(2, 12, generator=g) * 3
    t = s + 1e-6 * torch.randn(2, 12, generator=g)  # a live teacher: the same model, float noise apart
    H = torch.rand(2, 12, generator=g) * 2
    mask = torch.ones(2, 12)
    adv = torch.tensor([0.5, -0.5])
    unfloored, _ = dasd_advantages(adv, s, t, H, mask, DasdKnobs(scale_floor=0.0, gate=False, beta=1.0))
    floored, _ = dasd_advantages(adv, s, t, H, mask, DasdKnobs(gate=False, beta=1.0))  # the default floor, 0.1
    assert (unfloored - adv[:, None]).abs().max() > 0.3  # the bug: noise of order 1
    assert (floored - adv[:, None]).abs().max() < 1e-4
    # where δ is real the floor does not bind: the reference tests with MAD scaling are unchanged
    t2 = -torch.rand(2, 12, generator=g) * 3
    a, _ = dasd_advantages(adv, s, t2, H, mask, DasdKnobs(scale_floor=0.0))
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


# ---------------------------------------------------------------- the trainer passes the step


def test_trainer_passes_the_step_so_reopold_switches_phase(tmp_path):
    from selfdistill.trainer import Trainer

    config = config_from_dict({
        "model": {"path": "tiny"},
        "data": {"dataset": "synthetic:operation_chains", "num_problems": 8},
        "rollout": {"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 8},
        "objective": {"name": "reopold", "switch_step": 1},
        "optim": {"steps": 2, "lr": 1e-3, "micro_batch_size": 4},
        "logging": {"output_dir": str(tmp_path / "run"), "progress": False, "tensorboard": False},
    })
    trainer = Trainer(config)
    phases = [trainer.train_step()["reopold/phase"] for _ in range(2)]
    trainer.grader.close()
    assert phases == [1.0, 2.0]  # step 0 explores, step 1 (= switch_step) refines


# ---------------------------------------------------------------- DASD's routing control: ω shuffled


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


def test_shuffled_dasd_trains_through_the_registry_with_the_step():
    stats, adv, mask = make_stats(22)
    batch = ObjectiveBatch(stats=stats, mask=mask, group_adv=adv, step=3)
    loss, diag = OBJECTIVES["dasd"](batch, direction="shuffled", beta=1.0)
    assert torch.isfinite(loss).all() and 0 < diag["dasd/push_fraction"] < 1
    again, _ = OBJECTIVES["dasd"](batch, direction="shuffled", beta=1.0)
    torch.testing.assert_close(loss, again)
