"""selfdistill.objectives.policy: group advantages, the clipped policy loss and the aggregation modes
against float64 references."""

import math

import pytest
import torch

from selfdistill.objectives import aggregate, group_advantages, policy_loss, token_weights
from tests.helpers import B, T, make_batch


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
