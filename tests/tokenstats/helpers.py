"""Helpers of the tests of selfdistill.tokenstats: random inputs, the float64 reference, loss closures."""

import torch

from selfdistill.tokenstats import DivergenceSpec, TokenStats

B, T, V, D = 3, 5, 37, 8


def reference(s_logits, t_logits, tokens, temperature=1.0, spec=None):
    """Written out from the definitions, in float64."""
    s = s_logits.double() / temperature
    t = t_logits.double() / temperature
    p_s = torch.softmax(s, -1)
    p_t = torch.softmax(t, -1)
    out = {
        "logp": torch.log(p_s.gather(-1, tokens[..., None]).squeeze(-1)),
        "entropy": -(p_s * torch.log(p_s)).sum(-1),
        "teacher_logp": torch.log(p_t.gather(-1, tokens[..., None]).squeeze(-1)),
        "teacher_entropy": -(p_t * torch.log(p_t)).sum(-1),
    }
    if spec is not None:
        if spec.top_k is not None:
            idx = (t if spec.top_k_of == "teacher" else s).topk(spec.top_k, -1).indices
            p_s = torch.softmax(s.gather(-1, idx), -1) if spec.renormalize_student else p_s.gather(-1, idx)
            p_t = torch.softmax(t.gather(-1, idx), -1)
        if spec.beta == 0:
            terms = p_t * torch.log(p_t / p_s)
        elif spec.beta == 1:
            terms = p_s * torch.log(p_s / p_t)
        else:
            m = spec.beta * p_t + (1 - spec.beta) * p_s
            terms = spec.beta * p_t * torch.log(p_t / m) + (1 - spec.beta) * p_s * torch.log(p_s / m)
        if spec.clip is not None:
            terms = terms.clamp(max=spec.clip)
        out["divergence"] = terms.sum(-1)
    return out


def inputs(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g).to(dtype)
    weight = (torch.randn(V, D, generator=g) * 0.7).to(dtype)
    teacher_hidden = torch.randn(B, T, D, generator=g).to(dtype)
    tokens = torch.randint(0, V, (B, T), generator=g)
    return hidden, weight, teacher_hidden, tokens


def assert_stats_close(stats: TokenStats, ref: dict, rtol=1e-5, atol=1e-6):
    for name, expected in ref.items():
        got = getattr(stats, name)
        assert got is not None, name
        torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=atol, msg=name)


SPECS = [
    DivergenceSpec(beta=0.0),
    DivergenceSpec(beta=1.0),
    DivergenceSpec(beta=0.5),
    DivergenceSpec(beta=0.3, clip=0.02),
    DivergenceSpec(beta=0.0, clip=0.05, top_k=5),
    DivergenceSpec(beta=0.5, top_k=5),  # closed-form backward over the top-k entries
    DivergenceSpec(beta=1.0, top_k=3),
    DivergenceSpec(beta=0.0, top_k=4),
    DivergenceSpec(beta=1.0, top_k=4, top_k_of="student"),  # vOPD's baseline over the student's top-k
    DivergenceSpec(beta=0.0, top_k=4, renormalize_student=False),  # EOPD: the student's full-vocabulary log-probs
    DivergenceSpec(beta=0.0, top_k=6, clip=0.02, renormalize_student=False),
]


def _row_dependent_loss(stats: TokenStats, rows: slice) -> torch.Tensor:
    """Per-row objective with a detached row statistic, like DASD's entropy quantile."""
    row_scale = stats.entropy.detach().amax(dim=1, keepdim=True)  # [n,1]
    per_token = -stats.logp * row_scale + 0.3 * stats.divergence - 0.1 * stats.entropy
    return per_token.sum() / (B * T)


def loss_only(loss_of):
    """A block loss with no diagnostics, from a function of (stats, rows) to the loss."""
    return lambda stats, rows: (loss_of(stats, rows), {})


_row_loss = loss_only(_row_dependent_loss)


_logp_sum = loss_only(lambda s, rows: s.logp.sum())
