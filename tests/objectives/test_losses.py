"""selfdistill.objectives.losses: the surrogate's direction, the sign contract on a toy categorical, every
registered objective's finite loss and gradient, DASD at beta 0 equal to GRPO, shuffled DASD with the step."""

import pytest
import torch

from selfdistill.objectives import OBJECTIVES, ObjectiveBatch, aggregate, policy_loss
from selfdistill.tokenstats import TokenStats, naive_token_stats
from tests.helpers import B, T, make_batch, make_stats


def test_shuffled_dasd_trains_through_the_registry_with_the_step():
    stats, adv, mask = make_stats(22)
    batch = ObjectiveBatch(stats=stats, mask=mask, group_adv=adv, step=3)
    loss, diag = OBJECTIVES["dasd"](batch, direction="shuffled", beta=1.0)
    assert torch.isfinite(loss).all() and 0 < diag["dasd/push_fraction"] < 1
    again, _ = OBJECTIVES["dasd"](batch, direction="shuffled", beta=1.0)
    torch.testing.assert_close(loss, again)


def test_surrogate_gradient_direction():
    logp = torch.zeros(1, 3, requires_grad=True)
    loss = policy_loss(logp, logp.detach(), torch.tensor([1.0]), torch.ones(1, 3))
    loss.sum().backward()
    assert (logp.grad < 0).all()  # descending raises the log-prob of positively advantaged tokens


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
