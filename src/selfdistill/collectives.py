"""Every sum across processes the trainer makes: on the accelerator's device, gradients in bounded buckets, the
logged means over every process."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


class Collectives:
    """Every sum across processes the trainer makes, on the accelerator's device.

    NCCL (several GPUs) reduces only CUDA tensors, so a tensor is moved to `device` before the collective and the
    result is returned on the tensor's own device. Gradients are summed in place in buckets of at most
    `bucket_bytes` (a larger gradient is reduced alone), so no flat copy of all gradients is ever made.
    `all_reduce` is `torch.distributed.all_reduce` (a stand-in in tests).
    """

    def __init__(self, device: torch.device | str, world: int, *, bucket_bytes: int = 25 * 2**20,
                 all_reduce: Callable[[Tensor], Any] | None = None) -> None:
        self.device = torch.device(device)
        self.world = world
        self.bucket_bytes = bucket_bytes
        self.all_reduce = all_reduce if all_reduce is not None else torch.distributed.all_reduce

    def sum(self, tensor: Tensor) -> Tensor:
        """`tensor` summed over the processes, on `tensor`'s device (`tensor` itself may be overwritten)."""
        if self.world == 1:
            return tensor
        on_device = tensor.to(self.device)  # the same tensor when it is already there
        self.all_reduce(on_device)
        return on_device.to(tensor.device)

    def weighted_means(self, values: dict[str, float], weights: dict[str, float]) -> dict[str, float]:
        """`values[name] / weights[name]` with both summed over the processes (e.g. a step's diagnostics averaged
        over every process's tokens, not rank 0's only); 0 where the summed weight is 0. Every process must pass
        the same names (checked: else the sums would pair different quantities)."""
        names = sorted(values)
        key = zlib.crc32("\x00".join(names).encode())
        agreed = self.sum(torch.tensor([float(len(names)), float(key)], dtype=torch.float64))  # [2]
        if agreed.tolist() != [float(len(names) * self.world), float(key * self.world)]:
            raise RuntimeError(f"the processes logged different diagnostics (this one: {names})")
        local = torch.tensor([values[n] for n in names] + [weights[n] for n in names], dtype=torch.float64)  # [2K]
        total = self.sum(local).tolist()
        summed_values, summed_weights = total[: len(names)], total[len(names) :]
        return {n: v / w if w else 0.0 for n, v, w in zip(names, summed_values, summed_weights, strict=True)}

    def sum_gradients(self, params: list[Tensor]) -> None:
        """Sum every parameter's `.grad` over the processes, in place (a missing one counts as zeros)."""
        if self.world == 1:
            return
        bucket: list[Tensor] = []
        size = 0
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grad = p.grad
            nbytes = grad.numel() * grad.element_size()
            if bucket and (size + nbytes > self.bucket_bytes or grad.dtype != bucket[0].dtype
                           or grad.device != bucket[0].device):
                self._sum_bucket(bucket)
                bucket, size = [], 0
            bucket.append(grad)
            size += nbytes
        if bucket:
            self._sum_bucket(bucket)

    def _sum_bucket(self, grads: list[Tensor]) -> None:
        if len(grads) == 1 and grads[0].is_contiguous() and grads[0].device == self.device:
            self.all_reduce(grads[0])  # in place, no copy
            return
        flat = torch.cat([g.reshape(-1) for g in grads]).to(self.device)  # [≤ bucket_bytes / element size]
        self.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
