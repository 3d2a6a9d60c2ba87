"""A step's rollouts between generation and the updates: the rollout group, the scoring pass that several updates
share, and the split of the rows into mini-batches (one optimizer update each) and micro-batches (one
forward/backward pass each).

With `optim.ppo_epochs × optim.mini_batches > 1` the rollouts are scored once before the first update
(`score_rollouts`: the behaviour log-probs and the teacher's hidden states), and every update reads them from
`ScoredRollouts`, so that neither moves while the weights do. Everything here takes what it needs as arguments;
the trainer binds its model, teacher and packing into the callables it passes.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from selfdistill.data import Problem
from selfdistill.tokenstats import FusedBuffers, hidden_objective

RowsForward = Callable[[list[int]], tuple[Tensor, Tensor]]
"""A forward pass over some rows of the step, `rows -> (a, b)`; see `score_rollouts` for each one's pair."""


@dataclass
class RolloutGroup:
    """This process's rollouts for one step, prompt-major (G rows per prompt)."""

    problems: list[Problem]  # [P_local]
    prompt_of_row: list[int]  # [B] index into problems
    responses: list[list[int]]  # [B] response token ids, cut after EOS
    texts: list[str]  # [B]
    truncated: list[bool]  # [B]
    rewards: Tensor  # [B]


@dataclass
class ScoredRollouts:
    """What a step's several updates share, computed once before the first (`score_rollouts`).

    Kept per row, unpadded, so each update re-pads its micro-batch to its own width.
    """

    logp: list[Tensor] | None  # [B] each [|y_i|] float32: the behaviour log-probs; None: the objective needs none
    teacher_hidden: list[Tensor] | None  # [B] each [|y_i|,d]: the teacher's final hidden states; None: no teacher
    teacher_weight: Tensor | None  # [V,d] the teacher's output weight (a copy for a live teacher)

    def behaviour_logp(self, rows: list[int], width: int) -> Tensor | None:
        """`[b,width]` log-probs of `rows`, zero past each response."""
        if self.logp is None:
            return None
        out = self.logp[rows[0]].new_zeros(len(rows), width)  # [b,T]
        for i, r in enumerate(rows):
            out[i, : len(self.logp[r])] = self.logp[r]
        return out

    def teacher_states(self, rows: list[int], width: int) -> Tensor:
        """`[b,width,d]` teacher hidden states of `rows`, zero past each response."""
        first = self.teacher_hidden[rows[0]]
        out = first.new_zeros(len(rows), width, first.shape[-1])  # [b,T,d]
        for i, r in enumerate(rows):
            out[i, : len(self.teacher_hidden[r])] = self.teacher_hidden[r]
        return out


def micro_batches(rows: list[int], size: int) -> list[list[int]]:
    """`rows` in consecutive chunks of `size` (`optim.micro_batch_size`): one forward/backward pass each."""
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def minibatches(num_rows: int, group_size: int, parts: int, *, seed: int | None = None) -> list[list[int]]:
    """This process's `num_rows` rows (G = `group_size` per prompt, prompt-major) in `parts`
    (`optim.mini_batches`) parts.

    The parts are made of units: whole prompt groups when the process has at least as many prompts as parts
    (part sizes then differ by at most one prompt), else single rows (a prompt's group then spans parts; its
    advantages are still those of the whole step). `seed` None: consecutive units, the same parts every epoch;
    else the units are shuffled by `seed` first (a new order each epoch, as verl's shuffled mini-batches), each
    part's rows kept in ascending order. Every process has the same number of rows and passes the same seed, so
    the parts' sizes line up across processes and each update's counts are reduced over matching parts.
    """
    B, G = num_rows, group_size
    units, unit = (B // G, G) if parts <= B // G else (B, 1)  # whole groups, else single rows
    order = list(range(units))
    if seed is not None and parts > 1:  # one part holds every row whatever the order
        random.Random(seed).shuffle(order)
    base, extra = divmod(units, parts)
    out, start = [], 0
    for k in range(parts):
        stop = start + base + (k < extra)
        out.append(sorted(row for u in order[start:stop] for row in range(u * unit, (u + 1) * unit)))
        start = stop
    return out


@torch.no_grad()
def score_rollouts(
    group: RolloutGroup,
    batches: Iterable[list[int]],
    *,
    student: RowsForward | None,
    weight: Tensor,
    teacher: RowsForward | None,
    copy_teacher_weight: bool,
    temperature: float,
    chunk_tokens: int | None,
    buffers: FusedBuffers | None = None,
) -> ScoredRollouts:
    """Before a step's first update: the behaviour policy's log-prob of every response token and the teacher's
    hidden states, kept for all the step's updates so that neither moves while the weights do.

    batches: the micro-batches (lists of rows) to run, in order; the same as the updates', so that the first
        update's ratio is exactly 1.
    student: `rows -> (hidden [b,T,d], response_ids [b,T])`, the student's response hidden states in the
        compute dtype (run here without gradient); None skips the behaviour log-probs (objectives without a
        ratio, `Objective.uses_old_logp`).
    weight: `[V,d]` the student's output weight in the compute dtype, detached.
    teacher: `rows -> (hidden [b,T,d], weight [V,d])`, the teacher's hidden states over
        `teacher_prompt ⊕ response` and its output weight; None: no teacher.
    copy_teacher_weight: copy the teacher's output weight (a live teacher whose output layer trains: the
        updates change it in place); a frozen or EMA teacher's does not change within a step (the EMA teacher
        follows once per rollout step).
    temperature, chunk_tokens, buffers: as the updates pass them to `hidden_objective`.
    """
    B = len(group.responses)
    logp: list[Tensor | None] | None = None if student is None else [None] * B
    hidden: list[Tensor | None] | None = None if teacher is None else [None] * B
    teacher_weight = None
    for rows in batches:
        responses = [group.responses[r] for r in rows]
        if student is not None:
            student_hidden, response_ids = student(rows)  # [b,T,d], [b,T]
            _, stats, _ = hidden_objective(student_hidden, weight, response_ids,
                                           lambda stats, block: (stats.logp.new_zeros(()), {}),
                                           temperature=temperature, chunk_tokens=chunk_tokens, buffers=buffers)
            for i, r in enumerate(rows):
                logp[r] = stats.logp[i, : len(responses[i])].clone()  # [|y_r|]
        if teacher is not None:
            teacher_hidden, teacher_weight = teacher(rows)  # [b,T,d], [V,d]
            for i, r in enumerate(rows):
                hidden[r] = teacher_hidden[i, : len(responses[i])].clone()  # [|y_r|,d]
    if teacher_weight is not None and copy_teacher_weight:
        teacher_weight = teacher_weight.clone()  # [V,d] as it is before the first update
    return ScoredRollouts(logp, hidden, teacher_weight)
