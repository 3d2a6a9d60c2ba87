"""selfdistill.collectives on the CPU (issue #14): collectives on the accelerator's device, weighted means
across processes, gradients summed in bounded buckets."""

import pytest
import torch

from selfdistill.collectives import Collectives


class _Handed(Exception):
    pass


def test_collectives_hand_the_collective_tensors_on_the_accelerator_device():
    """NCCL reduces only CUDA tensors: a CPU tensor (a count, the loss, the metrics) is moved to the accelerator's
    device before the collective. `meta` stands in for the GPU here; the stand-in collective records the device."""
    seen = []

    def collective(tensor):
        seen.append(tensor.device)
        raise _Handed  # a meta tensor has no values to hand back

    collectives = Collectives("meta", 2, all_reduce=collective)
    with pytest.raises(_Handed):
        collectives.sum(torch.ones(3))
    param = torch.nn.Parameter(torch.ones(4))
    param.grad = torch.ones(4)
    with pytest.raises(_Handed):
        collectives.sum_gradients([param])
    assert seen == [torch.device("meta")] * 2


def test_weighted_means_sum_over_processes_and_refuse_different_names():
    other = torch.tensor([2.0, 8.0, 6.0, 2.0], dtype=torch.float64)  # the other process's values, then weights

    def with_the_other(tensor):
        tensor.add_(other if tensor.numel() == 4 else tensor.clone())  # the name check: the same names there

    collectives = Collectives("cpu", 2, all_reduce=with_the_other)
    means = collectives.weighted_means({"a": 4.0, "b": 0.0}, {"a": 2.0, "b": 0.0})  # this process: b unweighted
    assert means == {"a": (4.0 + 2.0) / (2.0 + 6.0), "b": (0.0 + 8.0) / (0.0 + 2.0)}

    def with_other_names(tensor):
        tensor.add_(tensor + 1)

    with pytest.raises(RuntimeError, match="the processes logged different diagnostics"):
        Collectives("cpu", 2, all_reduce=with_other_names).weighted_means({"a": 1.0}, {"a": 1.0})
    assert Collectives("cpu", 1).weighted_means({"a": 3.0, "z": 1.0}, {"a": 2.0, "z": 0.0}) == {"a": 1.5, "z": 0.0}


def test_gradient_buckets_are_bounded_and_sum_in_place():
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in [(5, 7), (300,), (3,), (40, 40), (2, 2)]]
    for p in params[:-1]:
        p.grad = torch.randn(p.shape, generator=generator)
    expected = [2 * p.grad.clone() if p.grad is not None else torch.zeros(p.shape) for p in params]
    handed = []

    def two_equal_processes(tensor):
        handed.append(tensor.numel())
        tensor.mul_(2)

    grads = [p.grad for p in params]
    Collectives("cpu", 2, bucket_bytes=400 * 4, all_reduce=two_equal_processes).sum_gradients(params)
    for p, want, grad in zip(params, expected, grads, strict=True):
        torch.testing.assert_close(p.grad, want, rtol=0, atol=0)
        assert grad is None or p.grad is grad  # summed in place, not replaced
    assert max(handed) <= 40 * 40 and max(handed) < sum(p.numel() for p in params)
    assert sorted(handed) == sorted([35 + 300 + 3, 1600, 4])  # buckets of ≤ 400 floats; the large one alone
