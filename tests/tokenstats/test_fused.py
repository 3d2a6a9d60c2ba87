"""selfdistill.tokenstats.fused: the fused hidden-state objective against the naive path, values and
gradients, its buffers, block sizes and weight-gradient accumulation."""

import math

import pytest
import torch

from selfdistill.tokenstats import DivergenceSpec, FusedBuffers, hidden_objective, naive_token_stats, token_stats
from tests.tokenstats.helpers import (
    SPECS,
    B,
    T,
    V,
    _logp_sum,
    _row_dependent_loss,
    _row_loss,
    assert_stats_close,
    inputs,
    loss_only,
    reference,
)


def test_fused_diagnostics_are_summed_over_blocks():
    """The block loss's diagnostics come back summed over the blocks, whatever the block size; a block loss that
    names other diagnostics in another block is refused."""
    h, w, th, tokens = inputs(7)
    naive = naive_token_stats(h @ w.T, tokens)

    def with_sums(stats, rows):
        return stats.logp.sum(), {"logp_sum": stats.logp.sum(), "positions": stats.logp.new_tensor(stats.logp.numel())}

    for chunk_tokens in (T, 2 * T, B * T):  # one row per block, two, all
        _, _, diagnostics = hidden_objective(h, w, tokens, with_sums, chunk_tokens=chunk_tokens)
        assert float(diagnostics["positions"]) == B * T
        torch.testing.assert_close(diagnostics["logp_sum"], naive.logp.sum(), rtol=1e-5, atol=1e-5)

    def changing(stats, rows):
        return stats.logp.sum(), ({"a": stats.logp.sum()} if rows.start == 0 else {"b": stats.logp.sum()})

    with pytest.raises(ValueError, match="same names for every block"):
        hidden_objective(h, w, tokens, changing, chunk_tokens=T)


@pytest.mark.parametrize("subchunk", [2, 64])
@pytest.mark.parametrize("chunk_tokens", [1, T, 2 * T, 100])
@pytest.mark.parametrize("spec", [DivergenceSpec(beta=0.2, clip=0.5), DivergenceSpec(beta=0.4)], ids=str)
def test_fused_hidden_objective_matches_naive(chunk_tokens, subchunk, spec, monkeypatch):
    """Blocks and sub-chunks of every size, with the closed-form backward (plain JSD) and autograd (clipped)."""
    _check_fused_against_naive(spec, 1.0, chunk_tokens, subchunk, monkeypatch)


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_hidden_objective_matches_naive_for_every_divergence(spec, temperature, monkeypatch):
    _check_fused_against_naive(spec, temperature, T, 3, monkeypatch)


def _check_fused_against_naive(spec, temperature, chunk_tokens, subchunk, monkeypatch):
    import selfdistill.tokenstats.fused

    monkeypatch.setattr(selfdistill.tokenstats.fused, "_subchunk_positions", lambda d, v: subchunk)  # per softmax pass
    h, w, th, tokens = inputs(3)
    ha, wa = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    hb, wb = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    naive = naive_token_stats(ha @ wa.T, tokens, teacher_logits=th @ w.T, divergence=spec, temperature=temperature)
    naive_loss = _row_dependent_loss(naive, slice(0, B))
    naive_loss.backward()
    fused_loss, stats, _ = hidden_objective(hb, wb, tokens, _row_loss, teacher_hidden=th, divergence=spec,
                                         chunk_tokens=chunk_tokens, temperature=temperature)
    (2.0 * fused_loss).backward()  # the upstream gradient is applied in backward
    torch.testing.assert_close(fused_loss, naive_loss.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(hb.grad, 2.0 * ha.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(wb.grad, 2.0 * wa.grad, rtol=1e-5, atol=1e-6)
    assert_stats_close(stats, {k: v.detach().double() for k, v in vars(naive).items()})
    assert not stats.logp.requires_grad


def test_fused_hidden_objective_frozen_head_and_no_teacher():
    h, w, _, tokens = inputs(4)
    ha = h.clone().requires_grad_(True)
    hb = h.clone().requires_grad_(True)
    naive = naive_token_stats(ha @ w.T, tokens)
    loss_ref = (-naive.logp).mean()
    loss_ref.backward()
    loss, stats, _ = hidden_objective(hb, w, tokens, loss_only(lambda s, rows: -s.logp.sum() / (B * T)), chunk_tokens=T)
    loss.backward()
    torch.testing.assert_close(hb.grad, ha.grad, rtol=1e-5, atol=1e-7)
    assert stats.teacher_logp is None and stats.divergence is None
    assert w.grad is None


def test_bf16_inputs_accumulate_in_float32():
    h, w, th, tokens = inputs(5, dtype=torch.bfloat16)
    logits = h @ w.T  # bf16 [B,T,V]
    chunked = token_stats(logits, tokens, teacher_logits=th @ w.T, chunk_tokens=4)
    assert chunked.logp.dtype == torch.float32
    ref = reference(logits.float(), (th @ w.T).float(), tokens)
    assert_stats_close(chunked, ref)
    fused_loss, fused, _ = hidden_objective(h, w, tokens, _logp_sum, teacher_hidden=th)
    assert_stats_close(fused, ref)


def test_entropy_of_uniform_is_log_v():
    logits = torch.zeros(1, 2, V)
    stats = token_stats(logits, torch.zeros(1, 2, dtype=torch.long))
    torch.testing.assert_close(stats.entropy, torch.full((1, 2), math.log(V)))


def test_shape_errors_name_the_shapes():
    h, w, th, tokens = inputs()
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(3, 5, 37\)"):
        token_stats(h @ w.T, tokens[:, :4])
    with pytest.raises(ValueError, match="teacher"):
        token_stats(h @ w.T, tokens, teacher_logits=(th @ w.T)[:, :4])
    with pytest.raises(ValueError, match="beta"):
        DivergenceSpec(beta=1.5)
    with pytest.raises(ValueError, match="top_k_of"):
        DivergenceSpec(top_k=3, top_k_of="both")
    with pytest.raises(ValueError, match="renormalize_student=False needs top_k and beta = 0"):
        DivergenceSpec(beta=0.5, top_k=3, renormalize_student=False)


def test_fused_hidden_objective_teacher_without_divergence():
    """DASD-like: the teacher's log-probs and entropy weight the student's tokens but carry no gradient."""
    h, w, th, tokens = inputs(6)
    ha, hb = h.clone().requires_grad_(True), h.clone().requires_grad_(True)

    def loss_of(stats, rows):
        weight = (stats.teacher_logp - stats.logp).detach() * stats.teacher_entropy  # [n,T]
        return (-(weight * stats.logp) + 0.2 * stats.entropy).sum() / (B * T)

    naive = naive_token_stats(ha @ w.T, tokens, teacher_logits=th @ w.T)
    loss_of(naive, slice(0, B)).backward()
    loss, stats, _ = hidden_objective(hb, w, tokens, loss_only(loss_of), teacher_hidden=th, chunk_tokens=T)
    loss.backward()
    torch.testing.assert_close(hb.grad, ha.grad, rtol=1e-5, atol=1e-7)
    assert stats.divergence is None and stats.teacher_logp is not None


def test_fused_buffers_reused_across_calls_give_the_same_results():
    """One FusedBuffers through calls of different batch sizes, dtypes and vocabularies: the same loss,
    statistics and gradients as calls that allocate their own."""
    spec = DivergenceSpec(beta=0.5)
    buffers = FusedBuffers()
    for seed, rows, dtype, vocab in [(0, B, torch.float32, V), (1, 1, torch.float32, V),
                                     (2, B, torch.bfloat16, V), (3, B, torch.float32, V // 2)]:
        h, w, th, tokens = inputs(seed, dtype)
        h, th, w, tokens = h[:rows], th[:rows], w[:vocab], tokens[:rows] % vocab
        results = []
        for shared in (None, buffers):
            hx, wx = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
            loss, stats, _ = hidden_objective(hx, wx, tokens, _row_loss, teacher_hidden=th, divergence=spec,
                                           chunk_tokens=T, buffers=shared)
            loss.backward()
            results.append((loss.detach(), stats.divergence, hx.grad, wx.grad))
        for fresh, reused in zip(*results, strict=True):
            torch.testing.assert_close(reused, fresh, rtol=0, atol=0)
        if seed == 0:
            first = buffers.workspace.data_ptr()
        if seed == 1:  # a smaller batch reuses the buffers
            assert buffers.workspace.data_ptr() == first
    assert buffers.workspace.shape[2] == V // 2  # another vocabulary: made anew


def test_auto_chunk_tokens_bounds_the_block_by_bytes():
    from selfdistill.tokenstats import AUTO_BLOCK_BYTES, auto_chunk_tokens

    assert auto_chunk_tokens(151_936) == 55
    assert auto_chunk_tokens(151_936) * 151_936 * 4 <= AUTO_BLOCK_BYTES
    assert auto_chunk_tokens(10**9) == 1
    with pytest.raises(ValueError, match="chunk_tokens"):
        h, w, _, tokens = inputs()
        hidden_objective(h, w, tokens, _logp_sum, chunk_tokens=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_grad_out_accumulates_the_same_gradient(dtype):
    """The weight's gradient added into a given tensor during the call (two calls accumulate, as micro-batches
    do) equals the gradient autograd gives; the hidden states' gradient still flows through autograd."""
    spec = DivergenceSpec(beta=0.5)
    h, w, th, tokens = inputs(9, dtype)
    ha, wa = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    hb, wb = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = torch.zeros_like(w, dtype=torch.float32 if dtype == torch.float32 else dtype)
    for half in (slice(0, 1), slice(1, B)):
        loss_a, _, _ = hidden_objective(ha[half], wa, tokens[half], _row_loss, teacher_hidden=th[half],
                                     divergence=spec, chunk_tokens=T)
        loss_a.backward()
        loss_b, _, _ = hidden_objective(hb[half], wb, tokens[half], _row_loss, teacher_hidden=th[half],
                                     divergence=spec, chunk_tokens=T, weight_grad_out=out)
        loss_b.backward()
        torch.testing.assert_close(loss_b, loss_a)
    assert wb.grad is None  # nothing through autograd
    tolerance = {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-2}
    torch.testing.assert_close(out.float(), wa.grad.float(), **tolerance)
    torch.testing.assert_close(hb.grad, ha.grad)


def test_weight_grad_out_refuses_a_scaled_loss():
    h, w, _, tokens = inputs(10)
    w = w.clone().requires_grad_(True)
    loss, _, _ = hidden_objective(h, w, tokens, _logp_sum, weight_grad_out=torch.zeros_like(w))
    with pytest.raises(RuntimeError, match="unscaled"):
        (0.5 * loss).backward()
    with pytest.raises(ValueError, match="weight_grad_out has shape"):
        hidden_objective(h, w, tokens, _logp_sum, weight_grad_out=torch.zeros(3, 2))


def test_subchunk_positions_by_hidden_size_and_vocabulary():
    from selfdistill.tokenstats.fused import _subchunk_positions

    assert _subchunk_positions(64, 151_936) == 16  # the workspace is 46 MiB, not 371
    assert _subchunk_positions(896, 151_936) == 128  # taller sub-chunks where the matmuls dominate
    assert _subchunk_positions(128, 833) > 1024  # a small vocabulary: few sub-chunks
