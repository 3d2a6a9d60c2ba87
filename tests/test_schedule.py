"""`selfdistill.schedule`: the seeds derived from the run's seed, each epoch's order and the learning-rate factor."""

from __future__ import annotations

import hashlib
import math

import pytest

from selfdistill.schedule import epoch_order, lr_factor, seed_for


def test_seed_for_is_a_stable_32_bit_function_of_its_parts():
    assert seed_for(0, 1) == seed_for(0, 1)
    # the digest of "0:1": fixed across processes, Python versions and PYTHONHASHSEED (no hash())
    assert seed_for(0, 1) == int.from_bytes(hashlib.sha256(b"0:1").digest()[:4], "little")
    seeds = {seed_for(run, k) for run in range(4) for k in range(64)}
    assert len(seeds) == 4 * 64  # different parts, different seeds
    assert seed_for(1, 23) != seed_for(12, 3)  # the parts are separated, not concatenated
    assert all(0 <= s < 2**32 for s in seeds)


def test_epoch_order_is_a_seeded_permutation_per_epoch():
    orders = [epoch_order(50, epoch, seed=7, shuffle=True) for epoch in range(3)]
    for order in orders:
        assert sorted(order) == list(range(50))
    assert orders[0] != orders[1] != orders[2]  # a new order each epoch
    assert epoch_order(50, 1, seed=7, shuffle=True) == orders[1]  # the same after a resume
    assert epoch_order(50, 1, seed=8, shuffle=True) != orders[1]  # another run's seed, another order
    assert epoch_order(50, 4, seed=7, shuffle=False) == list(range(50))
    assert epoch_order(0, 0, seed=7, shuffle=True) == []


def test_lr_factor_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    kw = {"warmup_steps": 4, "total_steps": 14, "min_ratio": 0.1}
    assert [lr_factor(s, **kw) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lr_factor(4, **kw) == pytest.approx(1.0)  # the end of warm-up: the full rate
    assert lr_factor(9, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # halfway: 0.55
    assert lr_factor(14, **kw) == pytest.approx(0.1)  # the floor after the last step
    assert lr_factor(100, **kw) == pytest.approx(0.1)  # and it stays there
    factors = [lr_factor(s, **kw) for s in range(4, 15)]
    assert all(a >= b for a, b in zip(factors, factors[1:], strict=False))  # never increases after warm-up
    assert lr_factor(0, warmup_steps=0, total_steps=1, min_ratio=0.0) == pytest.approx(1.0)  # no warm-up
    assert lr_factor(0, warmup_steps=0, total_steps=0, min_ratio=0.0) == pytest.approx(1.0)  # no division by zero
