"""`selfdistill.tokenstats.stats`: what the trainers log of the statistics."""

from __future__ import annotations

import torch

from selfdistill.tokenstats import TokenStats


def test_masked_sums_sum_each_present_statistic_over_the_mask():
    g = torch.Generator().manual_seed(0)
    logp, entropy, t_logp, t_entropy, div = (torch.rand(2, 3, generator=g, dtype=torch.float64) for _ in range(5))
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    full = TokenStats(logp, entropy.requires_grad_(True), t_logp, t_entropy, div).masked_sums(mask)
    def over_mask(x):  # the three valid tokens: row 0's first two, row 1's first
        return x[0, :2].sum() + x[1, 0]

    expected = {"entropy": over_mask(entropy), "teacher_entropy": over_mask(t_entropy),
                "teacher_logp_gap": over_mask(t_logp - logp), "divergence": over_mask(div)}
    assert list(full) == list(expected)
    for name, value in expected.items():
        torch.testing.assert_close(full[name], value.detach())
    assert not full["entropy"].requires_grad  # logged, never backpropagated
    assert list(TokenStats(logp, entropy).masked_sums(mask)) == ["entropy"]  # absent statistics are not logged
