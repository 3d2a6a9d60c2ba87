"""Teacher weights (frozen, live, EMA), scored through the student's forward pass.

The teacher is the student's own architecture shown the privileged prompt. It always runs without
gradient. `frozen` under LoRA disables the adapter, so no second copy of the weights is held;
`frozen` with full fine-tuning keeps one copy of the initial weights; `live` uses the current
weights; `ema` keeps an exponential moving average of the student. The forward pass itself
(`response_hidden_states`, either batch layout) is `selfdistill.forward`'s.

Under `distributed.strategy: fsdp2` the copy (frozen or EMA) is never whole: it is made on the meta device,
sharded exactly as the student and filled from the student's shards (`parallel.FullyShardedParallel.copy_model`
and `wrap`); each process holds 1/N of it, with no gradient and no optimizer state, and the EMA average is
updated shard by shard, on each process's own slice, never gathered whole.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from selfdistill.forward import PackedBatch, SharedPrefixBatch, output_weight, response_hidden_states
from selfdistill.parallel import local_shard


class Teacher:
    """Runs the teacher forward pass over `teacher_prompt ⊕ response` without gradient."""

    def __init__(self, mode: str, student: torch.nn.Module, *, ema_decay: float = 0.99,
                 copy_model: Callable[[torch.nn.Module], torch.nn.Module] = copy.deepcopy) -> None:
        """`copy_model` makes the frozen / EMA copy of `student` (`distributed.strategy: fsdp2`: a meta-device
        copy, sharded and filled from the student's shards by `FullyShardedParallel.wrap`)."""
        if mode not in ("frozen", "live", "ema"):
            raise ValueError(f"unknown teacher mode {mode!r}; choose frozen, live or ema")
        self.mode = mode
        self.student = student
        self.ema_decay = ema_decay
        self.uses_adapter_switch = mode == "frozen" and hasattr(student, "disable_adapter")
        self.copy: torch.nn.Module | None = None
        if mode == "ema" or (mode == "frozen" and not self.uses_adapter_switch):
            self.copy = copy_model(student).eval()
            if mode == "ema":
                # The average accumulates in float32 whatever the student's dtype: with decay 0.99 a step moves
                # the teacher by 1 % of the student's change, far below bfloat16's resolution (8 bits).
                for t, s in zip(self.copy.parameters(), student.parameters(), strict=True):
                    if s.requires_grad and t.dtype != torch.float32:
                        t.data = t.data.float()
            self.copy.requires_grad_(False)

    @contextlib.contextmanager
    def _model(self) -> Iterator[torch.nn.Module]:
        if self.copy is not None:
            yield self.copy
        elif self.uses_adapter_switch:
            with self.student.disable_adapter():
                yield self.student
        else:
            yield self.student

    @torch.no_grad()
    def hidden_states(self, batch: PackedBatch | SharedPrefixBatch) -> tuple[Tensor, Tensor]:
        """(`[B,T,d]` teacher hidden states at the response positions, `[V,d]` teacher output weight)."""
        with self._model() as model:
            was_training = model.training
            model.eval()
            try:
                hidden = response_hidden_states(model, batch)
                weight = output_weight(model)
            finally:
                model.train(was_training)
        return hidden.detach(), weight.detach()

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: move the EMA teacher toward the student."""
        if self.mode != "ema":
            return
        for t, s in zip(self.copy.parameters(), self.student.parameters(), strict=True):
            if s.requires_grad:  # frozen weights (the base under LoRA) are equal in both and stay so
                # sharded (fsdp2): both are DTensors sharded alike; each process averages its own slice
                local_shard(t).lerp_(local_shard(s).detach().to(t.dtype), 1.0 - self.ema_decay)

    def state_dict(self) -> dict[str, Tensor] | None:  # (a sharded run saves `copy` with the checkpoint's shards)
        """Only the EMA teacher has state of its own (a frozen copy is rebuilt from the initial weights)."""
        return None if self.mode != "ema" else dict(self.copy.state_dict())

    def load_state_dict(self, state: dict[str, Tensor] | None) -> None:
        if self.mode == "ema":
            if state is None:
                raise ValueError("resuming an ema-teacher run needs teacher.safetensors in the checkpoint")
            self.copy.load_state_dict(state, strict=False)
