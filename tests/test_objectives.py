"""Objectives against float64 references written from SPEC §2, and their gradient contracts."""

import math

import pytest
import torch

from selfdistill.objectives import (
    OBJECTIVES,
    DasdKnobs,
    EgrsdKnobs,
    ObjectiveBatch,
    RlsdKnobs,
    aggregate,
    dasd_advantages,
    divergence,
    egrsd_advantages,
    group_advantages,
    lookahead_mean,
    masked_quantile,
    policy_loss,
    rlsd_advantages,
    token_weights,
)
from selfdistill.tokenstats import TokenStats, naive_token_stats

B, T = 4, 7


def make_batch(seed=0, B=B, T=T):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T)
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    for i, n in enumerate(lengths):
        mask[i, n:] = 0
    s_logp = -torch.rand(B, T, generator=g) * 3
    t_logp = -torch.rand(B, T, generator=g) * 3
    s_ent = torch.rand(B, T, generator=g) * 2
    t_ent = torch.rand(B, T, generator=g) * 2
    adv = torch.randn(B, generator=g)
    return s_logp, t_logp, s_ent, t_ent, adv, mask


# ---------------------------------------------------------------- group advantages, surrogate, aggregation


def test_group_advantages_match_reference():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    got = group_advantages(rewards, 4)
    ref = []
    for grp in rewards.double().view(3, 4):
        mean, std = grp.mean(), grp.std()
        ref += [((r - mean) / (std + 1e-6)).item() for r in grp]
    torch.testing.assert_close(got.double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    dr = group_advantages(rewards, 4, std_normalize=False)
    torch.testing.assert_close(dr.view(3, 4).sum(1), torch.zeros(3))
    assert group_advantages(torch.tensor([1.0, 1.0]), 1).abs().sum() == 0
    with pytest.raises(ValueError, match="groups of 5"):
        group_advantages(rewards, 5)


def reference_surrogate(logp, old, adv, mask, lo, hi):
    out = torch.zeros_like(logp, dtype=torch.float64)
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            a = adv[i].item() if adv.dim() == 1 else adv[i, t].item()
            r = math.exp(logp[i, t].item() - old[i, t].item())
            out[i, t] = -min(r * a, min(max(r, 1 - lo), 1 + hi) * a) * mask[i, t].item()
    return out


@pytest.mark.parametrize("token_level", [False, True])
def test_policy_loss_matches_reference_and_detaches_advantages(token_level):
    s_logp, t_logp, _, _, adv, mask = make_batch(1)
    old = s_logp + 0.3 * torch.randn(B, T, generator=torch.Generator().manual_seed(2))
    if token_level:
        adv = adv[:, None] * torch.rand(B, T)
    adv = adv.clone().requires_grad_(True)
    old = old.requires_grad_(True)
    logp = s_logp.clone().requires_grad_(True)
    loss = policy_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    torch.testing.assert_close(loss.double(), reference_surrogate(logp, old, adv, mask, 0.2, 0.28), rtol=1e-5,
                               atol=1e-6)
    loss.sum().backward()
    assert adv.grad is None and old.grad is None
    assert logp.grad is not None


def test_surrogate_gradient_direction():
    logp = torch.zeros(1, 3, requires_grad=True)
    loss = policy_loss(logp, logp.detach(), torch.tensor([1.0]), torch.ones(1, 3))
    loss.sum().backward()
    assert (logp.grad < 0).all()  # descending raises the log-prob of positively advantaged tokens


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_aggregate_reference_and_micro_batch_invariance(mode):
    _, _, _, _, _, mask = make_batch(3, B=6, T=9)
    loss = torch.randn(6, 9, generator=torch.Generator().manual_seed(4)) * mask
    ld, md = loss.double(), mask.double()
    if mode == "token-mean":
        ref = (ld * md).sum() / md.sum()
    elif mode == "seq-mean-token-mean":
        ref = torch.stack([(ld[i] * md[i]).sum() / md[i].sum() for i in range(6)]).mean()
    else:
        ref = (ld * md).sum() / (9 * 6)
    whole = aggregate(loss, mask, mode=mode)
    torch.testing.assert_close(whole.double(), ref, rtol=1e-6, atol=1e-7)
    parts = sum(
        aggregate(loss[rows], mask[rows], mode=mode, global_tokens=mask.sum().item(), global_sequences=6,
                  norm_length=9)
        for rows in (slice(0, 1), slice(1, 4), slice(4, 6))
    )
    torch.testing.assert_close(parts, whole, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_trainer_reduction_with_token_weights_is_aggregate_of_the_whole_batch(mode):
    """The trainer reduces a loss as `(loss · token_weights(...)).sum()` per row block of each micro-batch,
    with the whole update's counts, each micro-batch padded only to its own longest response, and sums: that
    is `aggregate` of the whole batch in the same mode."""
    _, _, _, _, _, mask = make_batch(5, B=6, T=9)
    loss = torch.randn(6, 9, generator=torch.Generator().manual_seed(6)) * mask
    whole = aggregate(loss, mask, mode=mode, norm_length=9)
    total = torch.zeros(())
    for rows in (slice(0, 2), slice(2, 5), slice(5, 6)):
        width = int(mask[rows].sum(dim=1).max())  # the micro-batch's own padded width
        micro_loss, micro_mask = loss[rows, :width], mask[rows, :width]
        weights = token_weights(micro_mask, mode=mode, global_tokens=mask.sum().item(), global_sequences=6,
                                norm_length=9)
        total = total + sum((micro_loss[block] * weights[block]).sum()
                            for block in (slice(0, 1), slice(1, micro_loss.shape[0])))
    torch.testing.assert_close(total, whole, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_all_masked_rows_give_zero_not_nan(mode):
    loss = torch.randn(3, 4, requires_grad=True)
    mask = torch.zeros(3, 4)
    value = aggregate(loss, mask, mode=mode)
    assert value.item() == 0.0
    value.backward()
    assert torch.isfinite(loss.grad).all()
    partial = torch.tensor([[1.0, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]])
    assert torch.isfinite(aggregate(loss, partial, mode=mode))


def test_aggregate_rejects_unknown_mode_and_shape_mismatch():
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate(torch.zeros(2, 3), torch.ones(2, 3), mode="sum")
    with pytest.raises(ValueError, match=r"loss=\(2, 3\), mask=\(2, 4\)"):
        aggregate(torch.zeros(2, 3), torch.ones(2, 4), mode="token-mean")


# ---------------------------------------------------------------- divergence


@pytest.mark.parametrize("beta,clip,top_k", [(0.0, None, None), (1.0, None, None), (0.5, None, None),
                                             (0.0, 0.05, None), (0.5, None, 4)])
def test_divergence_matches_reference(beta, clip, top_k):
    g = torch.Generator().manual_seed(7)
    s, t = torch.randn(2, 3, 11, generator=g), torch.randn(2, 3, 11, generator=g)
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 1]])
    got = divergence(s, t, mask, beta=beta, clip=clip, top_k=top_k, temperature=1.2)
    sd, td = s.double() / 1.2, t.double() / 1.2
    if top_k:
        idx = td.topk(top_k, -1).indices
        sd, td = sd.gather(-1, idx), td.gather(-1, idx)
    ps, pt = sd.softmax(-1), td.softmax(-1)
    if beta == 0:
        terms = pt * (pt.log() - ps.log())
    elif beta == 1:
        terms = ps * (ps.log() - pt.log())
    else:
        m = beta * pt + (1 - beta) * ps
        terms = beta * pt * (pt / m).log() + (1 - beta) * ps * (ps / m).log()
    if clip:
        terms = terms.clamp(max=clip)
    torch.testing.assert_close(got.double(), terms.sum(-1) * mask.double(), rtol=1e-5, atol=1e-7)


def test_divergence_gradient_reaches_student_only_and_pulls_toward_teacher():
    g = torch.Generator().manual_seed(8)
    s = torch.randn(1, 2, 6, generator=g, requires_grad=True)
    t = torch.randn(1, 2, 6, generator=g, requires_grad=True)
    mask = torch.ones(1, 2)
    before = divergence(s, t, mask, beta=0.5).sum()
    before.backward()
    assert t.grad is None or t.grad.abs().sum() == 0
    with torch.no_grad():
        s2 = s - 0.5 * s.grad
    assert divergence(s2, t, mask, beta=0.5).sum() < before


# ---------------------------------------------------------------- token advantages


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


def test_dasd_beta_zero_equals_grpo():
    s, t, s_ent, t_ent, adv, mask = make_batch(15)
    stats = TokenStats(logp=s.clone().requires_grad_(True), entropy=s_ent, teacher_logp=t, teacher_entropy=t_ent)
    batch = ObjectiveBatch(stats=stats, mask=mask, group_adv=adv)
    dasd, _ = OBJECTIVES["dasd"](batch, beta=0.0)
    grpo, _ = OBJECTIVES["grpo"](batch)
    torch.testing.assert_close(dasd, grpo)


def _kl(p_logits, q_logits):
    p, q = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return (p.exp() * (p - q)).sum().item()


# β = 1: the contract is about the direction; the library's default β = 0.03 moves 33x slower.
@pytest.mark.parametrize("method,knobs", [("dasd", {"direction": "conform", "beta": 1.0}),
                                          ("dasd", {"direction": "novelty", "beta": 1.0}), ("opsd_sampled", {})])
def test_sign_contract_on_a_toy_categorical(method, knobs):
    """ω ≡ +1 (and OPSD's sampled form) lower KL(p_S‖p_T) under repeated updates; ω ≡ −1 raises it."""
    torch.manual_seed(0)
    teacher = torch.tensor([2.0, 0.5, -1.0, 0.0, 1.0, -0.5])
    student = torch.zeros(6, requires_grad=True)
    opt = torch.optim.SGD([student], lr=0.05)
    start = _kl(student.detach(), teacher)
    for _ in range(150):
        with torch.no_grad():
            tokens = torch.multinomial(student.softmax(-1), 256, replacement=True)[None]  # [1,256]
        logp_all = student.log_softmax(-1)
        stats = naive_token_stats(student.expand(1, 256, 6), tokens, teacher_logits=teacher.expand(1, 256, 6))
        stats.logp = logp_all[tokens]
        batch = ObjectiveBatch(stats=stats, mask=torch.ones(1, 256), group_adv=torch.zeros(1))
        loss, _ = OBJECTIVES[method](batch, **knobs)
        opt.zero_grad()
        aggregate(loss, batch.mask, mode="token-mean").backward()
        opt.step()
    end = _kl(student.detach(), teacher)
    if knobs.get("direction") == "novelty":
        assert end > start + 0.3
    else:
        assert end < 0.3 * start


def _full_batch(method, seed=16):
    s, t, s_ent, t_ent, adv, mask = make_batch(seed)
    logp = s.clone().requires_grad_(True)
    ent = s_ent.clone().requires_grad_(True)
    div = torch.rand(B, T, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)
    stats = TokenStats(logp=logp, entropy=ent, teacher_logp=t, teacher_entropy=t_ent, divergence=div)
    return ObjectiveBatch(stats=stats, mask=mask, group_adv=adv), (logp, div)


@pytest.mark.parametrize("method", sorted(OBJECTIVES))
def test_every_objective_gives_finite_loss_with_gradient(method):
    objective = OBJECTIVES[method]
    batch, (logp, div) = _full_batch(method)
    loss, diag = objective(batch)
    assert loss.shape == (B, T)
    assert (loss * (1 - batch.mask)).abs().sum() == 0  # padding contributes nothing
    total = aggregate(loss, batch.mask, mode=objective.aggregation)
    assert torch.isfinite(total)
    total.backward()
    grads = [g for g in (logp.grad, div.grad) if g is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0  # through the log-probs, the divergence or both
    assert all(torch.isfinite(v) for v in diag.values())


def test_objective_shape_errors_name_the_shapes():
    s, t, s_ent, _, adv, mask = make_batch(17)
    with pytest.raises(ValueError, match=r"teacher_logp=\(4, 6\)"):
        rlsd_advantages(adv, s, t[:, :6], mask)
    with pytest.raises(ValueError, match=r"group_adv must be \[B\]=4"):
        dasd_advantages(adv[:3], s, t, s_ent, mask)
    with pytest.raises(ValueError, match="direction"):
        DasdKnobs(direction="sideways")
