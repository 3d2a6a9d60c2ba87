"""An EMA teacher kept in float32, one local shard per process, for trainers whose weights another engine shards.

`ShardedEma` holds `teacher ← decay·teacher + (1 − decay)·student` for every trainable parameter, as float32
tensors shaped like this process's part of the parameter (`local_shard`): DeepSpeed ZeRO-3's partition
(`param.ds_tensor`), FSDP2's local shard (`DTensor.to_local()`), or the whole tensor when nothing is sharded
(one process, DDP, ZeRO-1/2). Each update reads the student's local shard and writes the teacher's, so nothing is
gathered, and the average does not round away in a low-precision dtype (with decay 0.99 a step moves the teacher
by 1 % of the student's change, below bfloat16's 8 bits). `state_dict` / `load_state_dict` carry it through a
checkpoint; a sharded average is saved per process, and restored only with the same number of processes.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def _is_dtensor(param: Tensor) -> bool:
    return hasattr(param, "to_local") and hasattr(param, "device_mesh")


def local_shard(param: Tensor) -> Tensor:
    """This process's part of a parameter's values, a tensor that can be written in place: ZeRO-3's partition,
    FSDP2's local shard, or the parameter's own data."""
    partition = getattr(param, "ds_tensor", None)
    if partition is not None:
        return partition
    if _is_dtensor(param):  # FSDP2
        return param.to_local()
    return param.data


def is_sharded(params: Iterable[Tensor]) -> bool:
    """Whether any parameter is split across processes (ZeRO-3 partition or FSDP2 DTensor)."""
    return any(getattr(p, "ds_tensor", None) is not None or _is_dtensor(p) for p in params)


class ShardedEma:
    """The float32 average of a student's trainable parameters, written into a teacher model of the same
    architecture after each update (see the module's docstring).

    student, teacher: `(name, parameter)` pairs, matched by name; parameters the student does not train are
    equal in both (the teacher starts as a copy) and are left alone.
    """

    def __init__(self, student: Iterable[tuple[str, Tensor]], teacher: Iterable[tuple[str, Tensor]],
                 decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        self.decay = decay
        teacher_of = dict(teacher)
        self.pairs: dict[str, tuple[Tensor, Tensor]] = {}
        for name, param in student:
            if not param.requires_grad:
                continue
            if name not in teacher_of:
                raise ValueError(f"the EMA teacher has no parameter {name!r}; it must be a copy of the student")
            mine, theirs = local_shard(param), local_shard(teacher_of[name])
            if mine.shape != theirs.shape:
                raise ValueError(f"parameter {name!r} is sharded differently in the student {tuple(mine.shape)} "
                                 f"and the EMA teacher {tuple(theirs.shape)}; both must be sharded alike")
            self.pairs[name] = (param, teacher_of[name])
        if not self.pairs:
            raise ValueError("the student has no trainable parameter for the EMA teacher to follow")
        with torch.no_grad():
            self.average = {name: local_shard(t).detach().float().clone() for name, (_, t) in self.pairs.items()}
        self.sharded = is_sharded(p for p, _ in self.pairs.values())

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: move the average toward the student, then write it into the teacher."""
        for name, (student, teacher) in self.pairs.items():
            average = self.average[name]
            average.lerp_(local_shard(student).detach().float(), 1.0 - self.decay)
            local_shard(teacher).copy_(average)

    def state_dict(self) -> dict[str, Tensor]:
        return {name: average.cpu() for name, average in self.average.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore the average (from `state_dict` of the same process) and write it into the teacher."""
        missing, extra = sorted(set(self.average) - set(state)), sorted(set(state) - set(self.average))
        if missing or extra:
            raise ValueError(f"the saved EMA teacher does not match this model: missing {missing[:3]}, "
                             f"unexpected {extra[:3]}")
        for name, average in self.average.items():
            saved = state[name]
            if saved.shape != average.shape:
                raise ValueError(f"the saved EMA teacher's {name!r} has shape {tuple(saved.shape)}, this process's "
                                 f"shard {tuple(average.shape)}: resume with the same sharding and process count")
            average.copy_(saved)
            local_shard(self.pairs[name][1]).copy_(average)
