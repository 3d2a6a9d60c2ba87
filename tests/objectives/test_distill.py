"""selfdistill.objectives.distill: the token divergence against a float64 reference and its gradient."""

import pytest
import torch

from selfdistill.objectives import divergence


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
