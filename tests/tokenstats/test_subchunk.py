"""selfdistill.tokenstats.subchunk: streamed sub-chunk logits equal held blocks, one sub-chunk's buffers."""

import pytest
import torch

from selfdistill.tokenstats import DivergenceSpec, FusedBuffers, hidden_objective
from tests.tokenstats.helpers import B, T, V, _logp_sum, _row_loss, inputs


@pytest.mark.parametrize("spec", [DivergenceSpec(beta=0.4), DivergenceSpec(beta=0.0, top_k=5),
                                  DivergenceSpec(beta=0.2, clip=0.5)], ids=str)
def test_streamed_logits_equal_held_blocks(spec):
    """A row longer than chunk_tokens: the student's logits are formed per sub-chunk in both passes (the
    block is the whole batch); the same loss, statistics and gradients as blocks held whole."""
    h, w, th, tokens = inputs(7)
    results = []
    for chunk_tokens in (T - 1, B * T):  # streamed, then one held block
        hx, wx = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss, stats, _ = hidden_objective(hx, wx, tokens, _row_loss, teacher_hidden=th, divergence=spec,
                                       chunk_tokens=chunk_tokens, buffers=FusedBuffers())
        loss.backward()
        results.append((loss.detach(), stats.logp, stats.divergence, hx.grad, wx.grad))
    for streamed, held in zip(*results, strict=True):
        torch.testing.assert_close(streamed, held, rtol=1e-6, atol=1e-7)


def test_streamed_buffers_hold_one_subchunk(monkeypatch):
    import selfdistill.tokenstats.fused

    monkeypatch.setattr(selfdistill.tokenstats.fused, "_subchunk_positions", lambda d, v: 2)
    h, w, th, tokens = inputs(8)
    buffers = FusedBuffers()
    hidden_objective(h, w, tokens, _logp_sum, teacher_hidden=th, chunk_tokens=1, buffers=buffers)
    assert buffers.block.shape == (2, V)  # a sub-chunk's logits, not a block's
    assert buffers.workspace.shape == (5, 2, V)
