"""Helpers shared by test modules in every folder (imported as `from tests.helpers import ...`): the tiny
trainer config and reward, a run's final weights, the random objective batches and their shapes."""

from pathlib import Path

import torch
from safetensors.torch import load_file

from selfdistill.config import config_from_dict
from selfdistill.tokenstats import TokenStats


def tiny_config(tmp_path, **sections):
    values = {
        "model": {"path": "tiny"},
        "data": {"dataset": "synthetic:operation_chains", "num_problems": 8},
        "rollout": {"prompts_per_step": 2, "group_size": 4, "max_new_tokens": 12},
        "optim": {"steps": 1, "lr": 1e-3, "micro_batch_size": 3, "chunk_tokens": 24},
        "logging": {"output_dir": str(tmp_path / "run"), "progress": False, "tensorboard": False},
    }
    for section, entries in sections.items():
        values.setdefault(section, {}).update(entries)
    return config_from_dict(values)


def length_reward(completions, problems):
    """A reward that varies within a group even for an untrained model (math rewards would all be 0)."""
    return [(len(text) % 5) / 4 for text in completions]


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    checkpoint = sorted(run_dir.glob("checkpoint-*"))[-1]
    return load_file(str(checkpoint / "model.safetensors"))


def assert_grads_match(shared, full, names, *, all_nonzero=True):
    assert any(g.abs().sum() > 0 for g in full)
    for name, g_shared, g_full in zip(names, shared, full, strict=True):
        if not all_nonzero and g_full.abs().sum() == 0:  # LoRA's A at the first step (B starts at 0)
            assert g_shared.abs().sum() == 0, name
            continue
        assert g_full.abs().sum() > 0, f"{name}: no gradient on the full path"
        # float32: the two layouts sum the same terms in another order (relative error ~1e-6)
        error = float((g_shared - g_full).norm() / g_full.norm())
        assert error < 2e-5, f"{name}: relative gradient error {error:.2e}"


FAMILY = ("rlrt", "vopd", "vopd_topk", "antisd", "eopd", "reopold", "pw_opsd")
B, T = 4, 7


def random_lengths_mask(g: torch.Generator, B: int, T: int) -> torch.Tensor:
    """[B, T] ones, each row cut to a random length of at least 2 drawn from `g`."""
    mask = torch.ones(B, T)
    lengths = torch.randint(2, T + 1, (B,), generator=g)  # [B]
    for i, n in enumerate(lengths):
        mask[i, n:] = 0
    return mask


def make_stats(seed=0, B=B, T=T):
    g = torch.Generator().manual_seed(seed)
    mask = random_lengths_mask(g, B, T)
    stats = TokenStats(logp=-torch.rand(B, T, generator=g) * 3, entropy=torch.rand(B, T, generator=g) * 2,
                       teacher_logp=-torch.rand(B, T, generator=g) * 3,
                       teacher_entropy=torch.rand(B, T, generator=g) * 2,
                       divergence=torch.rand(B, T, generator=g))
    adv = torch.tensor([1.2, -0.4, 0.7, -1.5])[:B]
    return stats, adv, mask


def rows(mask):
    """Each row's valid positions."""
    return [[t for t in range(mask.shape[1]) if mask[i, t] > 0] for i in range(mask.shape[0])]


def make_batch(seed=0, B=B, T=T):
    g = torch.Generator().manual_seed(seed)
    mask = random_lengths_mask(g, B, T)
    s_logp = -torch.rand(B, T, generator=g) * 3
    t_logp = -torch.rand(B, T, generator=g) * 3
    s_ent = torch.rand(B, T, generator=g) * 2
    t_ent = torch.rand(B, T, generator=g) * 2
    adv = torch.randn(B, generator=g)
    return s_logp, t_logp, s_ent, t_ent, adv, mask
