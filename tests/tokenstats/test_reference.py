"""selfdistill.tokenstats.reference: the naive, chunked-logits and hidden-recompute paths against a plain
float64 reference, values and gradients."""

import pytest
import torch

from selfdistill.tokenstats import DivergenceSpec, TokenStats, hidden_token_stats, naive_token_stats, token_stats
from tests.tokenstats.helpers import SPECS, B, T, assert_stats_close, inputs, reference


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 1.3])
def test_naive_matches_float64_reference(spec, temperature):
    h, w, th, tokens = inputs()
    s_logits, t_logits = h @ w.T, th @ w.T
    stats = naive_token_stats(s_logits, tokens, temperature=temperature, teacher_logits=t_logits, divergence=spec)
    assert_stats_close(stats, reference(s_logits, t_logits, tokens, temperature, spec))


def _probe_loss(stats: TokenStats, coeffs: torch.Tensor) -> torch.Tensor:
    """A loss touching every differentiable statistic with fixed random weights."""
    return (stats.logp * coeffs[0]).sum() + (stats.entropy * coeffs[1]).sum() + (stats.divergence * coeffs[2]).sum()


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_chunked_logits_match_naive_values_and_gradients(spec):
    h, w, th, tokens = inputs(1)
    coeffs = torch.randn(3, B, T, generator=torch.Generator().manual_seed(5))
    logits_a = (h @ w.T).requires_grad_(True)
    logits_b = logits_a.detach().clone().requires_grad_(True)
    t_logits = th @ w.T
    naive = naive_token_stats(logits_a, tokens, temperature=1.1, teacher_logits=t_logits, divergence=spec)
    chunked = token_stats(logits_b, tokens, temperature=1.1, teacher_logits=t_logits, divergence=spec, chunk_tokens=4)
    assert_stats_close(chunked, {k: v.detach().double() for k, v in vars(naive).items()})
    _probe_loss(naive, coeffs).backward()
    _probe_loss(chunked, coeffs).backward()
    torch.testing.assert_close(logits_b.grad, logits_a.grad, rtol=1e-5, atol=1e-7)


def test_hidden_recompute_path_matches_naive_values_and_gradients():
    spec = DivergenceSpec(beta=0.5)
    h, w, th, tokens = inputs(2)
    coeffs = torch.randn(3, B, T, generator=torch.Generator().manual_seed(6))
    ha, wa = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    hb, wb = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    naive = naive_token_stats(ha @ wa.T, tokens, teacher_logits=(th @ w.T), divergence=spec)
    chunked = hidden_token_stats(hb, wb, tokens, teacher_hidden=th, divergence=spec, chunk_tokens=4)
    assert_stats_close(chunked, {k: v.detach().double() for k, v in vars(naive).items()})
    _probe_loss(naive, coeffs).backward()
    _probe_loss(chunked, coeffs).backward()
    torch.testing.assert_close(hb.grad, ha.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(wb.grad, wa.grad, rtol=1e-5, atol=1e-6)
