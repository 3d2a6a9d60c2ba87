"""Measurements of one model on held-out problems: sampled accuracy (Avg@k, pass@k) under the
student or a teacher prompt, and teacher-forced entropy by token kind (free choice / fork vs forced).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from selfdistill.data import Problem
from selfdistill.evaluation.runner import evaluate_problems, summarize
from selfdistill.evaluation.store import SampleRecord
from selfdistill.forward import pack
from selfdistill.grading import Grader
from selfdistill.prompts import PromptBuilder


class TeacherPromptAsStudent:
    """Hands the teacher prompt (problem + worked solution) to code that asks for the student prompt.

    `evaluate_problems` samples from `prompt_builder.student_ids`; wrapping the builder in this class
    measures how well the model does when it sees the privileged context.
    """

    def __init__(self, builder: PromptBuilder) -> None:
        self.builder = builder

    def student_ids(self, problem: Problem) -> list[int]:
        return self.builder.teacher_ids(problem)


def sample_accuracy(
    model: Any,
    tokenizer: Any,
    problems: Sequence[Problem],
    builder: PromptBuilder,
    *,
    n: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    role: str = "student",
    grader: Grader | None = None,
) -> tuple[dict[str, Any], list[SampleRecord]]:
    """(`summarize` macro row with pass@k for every k in 1..n, the records) of n samples per problem."""
    if role not in ("student", "teacher"):
        raise ValueError(f"role must be student or teacher, got {role!r}")
    prompt_builder = builder if role == "student" else TeacherPromptAsStudent(builder)
    records = evaluate_problems(model, tokenizer, problems, n=n, temperature=temperature,
                                max_new_tokens=max_new_tokens, seed=seed, prompt_builder=prompt_builder,
                                grader=grader, progress=False)
    return summarize(records, ks=range(1, n + 1))["macro"], records


@dataclass
class TokenEntropy:
    """Mean token entropy (nats) along the worked solutions, by token kind (the task's `token_kinds`:
    "free" / "forced" on operation chains, "fork" / "marker" / "forced" on search with checks)."""

    entropy: dict[str, float | None]
    tokens: dict[str, int]


@torch.no_grad()
def token_entropy(
    model: torch.nn.Module,
    tokenizer: Any,
    task: Any,
    problems: Sequence[Problem],
    builder: PromptBuilder,
    *,
    role: str = "student",
    batch_size: int = 32,
) -> TokenEntropy:
    """Entropy of the model's next-token distribution along each worked solution (teacher forcing).

    role "student": the prompt is the problem alone; "teacher": `builder`'s teacher prompt of the
    problem (what the privileged teacher sees), while the response is the problem's own worked solution
    in either role. EOS counts as a forced token.
    """
    if role not in ("student", "teacher"):
        raise ValueError(f"role must be student or teacher, got {role!r}")
    was_training = model.training
    model.eval()
    sums = {kind: 0.0 for kind in task.token_kind_names}
    counts = {kind: 0 for kind in task.token_kind_names}
    try:
        for start in range(0, len(problems), batch_size):
            chunk = problems[start : start + batch_size]
            prompts = [builder.student_ids(p) if role == "student" else builder.teacher_ids(p)
                       for p in chunk]
            responses, kinds = [], []
            for problem in chunk:
                ids, token_kinds = task.token_kinds(tokenizer, problem)
                responses.append(ids + [tokenizer.eos_token_id])
                kinds.append([*token_kinds, "forced"])
            batch = pack(prompts, responses, pad_id=tokenizer.pad_token_id).to(next(model.parameters()).device)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids).logits  # [B, L, V]
            log_probs = batch.response_logits(logits).float().log_softmax(dim=-1)  # [B, T, V]
            entropy = -(log_probs.exp() * log_probs).sum(dim=-1)  # [B, T]
            for row, row_kinds in enumerate(kinds):
                for t, kind in enumerate(row_kinds):
                    sums[kind] += float(entropy[row, t])
                    counts[kind] += 1
    finally:
        model.train(was_training)
    return TokenEntropy(entropy={kind: sums[kind] / counts[kind] if counts[kind] else None for kind in sums},
                        tokens=counts)
