"""The study's task: operation chains modulo a small number, split three ways, with each solution
token labelled as a free choice or forced.

`operation_chains` problems such as "Work modulo 10. Start with 4. Add 7. Add 3 and 5. What is the
result?" have worked solutions "4+7=1\\n1+3=4\\n4+5=9\\n\\boxed{9}". Almost every token of a solution
is forced by the problem and the lines before it; the exception is the operand picked at an early
step of a commutative block ("Add 3 and 5." may start with 3 or with 5). Those operand tokens are the
*free-choice* tokens: the places where a well-calibrated model should stay uncertain, and where
exploration (or its collapse) shows up.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, NamedTuple

from selfdistill.data import Problem, make_splits
from selfdistill.data.synthetic import (
    OPERATION_CHAINS,
    ChainInstruction,
    ChainStep,
    OperationChain,
    sample_operation_chain,
)

_OPERATOR_OF_WORD = {"Add": "+", "Subtract": "-", "Multiply by": "*"}
_MODULUS_RE = re.compile(r"^Work modulo (\d+)\. ")
_START_RE = re.compile(r"Start with (\d+)\. ")
_INSTRUCTION_RE = re.compile(r"(Add|Subtract|Multiply by) (\d+(?:, \d+)*(?: and \d+)?)\. ")
_STEP_LINE_RE = re.compile(r"^(\d+)([+*-])(\d+)=(\d+)$")


class StudySplits(NamedTuple):
    """A study task's problems: held-out (in distribution), the out-of-distribution held-out sets by name
    (empty when the task has none), RL training, warm-start (supervised) training and a validation slice
    cut from the RL pool (what tuning is judged on; empty when the task has none); no two share a problem
    text."""

    held_out: list[Problem]
    ood: dict[str, list[Problem]]
    rl_train: list[Problem]
    sft_train: list[Problem]
    validation: Sequence[Problem] = ()


@dataclass(frozen=True)
class StudyTask:
    """Which problems the study uses: one seeded stream cut into held-out, RL and warm-start parts.

    The held-out problems are the first `n_eval` of the stream, the RL problems the next `n_rl`, the
    warm-start (supervised) problems the `n_sft` after those; no two parts share a problem text, and
    each part stays the same when the sizes of the parts after it change.
    """

    length: tuple[int, int] = (2, 5)
    """Inclusive range of chain lengths (solution lines): the difficulty."""
    modulus: int = 10
    """All arithmetic modulo this number, so every value is one digit and one token."""
    block_probability: float = 0.4
    """Chance that an instruction is a commutative block (where the free choices are)."""
    seed: int = 2024
    """Seed of the problem stream."""
    n_eval: int = 64
    """Held-out problems."""
    n_rl: int = 512
    """Problems the RL / self-distillation runs train on."""
    n_sft: int = 4000
    """Problems of the supervised warm start."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "length", tuple(self.length))
        if min(self.n_eval, self.n_rl, self.n_sft) < 1:
            raise ValueError("n_eval, n_rl and n_sft must all be >= 1")

    def options(self) -> dict[str, Any]:
        """Keyword arguments of `operation_chains`."""
        return {"length": self.length, "modulus": self.modulus, "block_probability": self.block_probability}

    def to_json(self) -> dict[str, Any]:
        values = asdict(self)
        values["length"] = list(self.length)
        return values

    name: ClassVar[str] = "chains"
    max_new_tokens: ClassVar[int] = 48
    """Rollout and evaluation length limit of the study on this task (the longest worked solution: 35 tokens)."""
    token_kind_names: ClassVar[tuple[str, ...]] = ("free", "forced")

    def splits(self) -> StudySplits:
        train, held_out = make_splits(OPERATION_CHAINS, self.n_rl + self.n_sft, self.n_eval, self.seed,
                                      **self.options())
        return StudySplits(held_out, {}, train[: self.n_rl], train[self.n_rl :])

    # The interface the study's warm start, runs and probes use (`SearchStudyTask` has the same).

    def teacher_views(self, template: str) -> dict[str, str]:
        """Teacher condition -> prompt template: one, the worked solution in the study's template."""
        return {"rich": template}

    def sft_example(self, problem: Problem, as_teacher: bool, rng: random.Random) -> tuple[str | None, Problem, str]:
        """(teacher view or None for the student prompt, the problem to render, the target text) of one
        warm-start example: the worked solution, under either prompt (draws nothing from `rng`)."""
        return ("rich" if as_teacher else None), problem, problem.solution

    def drill_step(self, rng: random.Random) -> ChainStep:
        """One arithmetic drill operation, drawn as the task draws a one-step chain."""
        chain = sample_operation_chain(rng, length=1, modulus=self.modulus, block_probability=0.0)
        (step,) = chain.worked_steps(rng)
        return step

    def drill_segments(self, rng: random.Random) -> list[tuple[str, bool]]:
        """One drill line as (text, supervised) pieces: "a op b=" and the result (the only supervised piece)."""
        step = self.drill_step(rng)
        return [(f"{step.left}{step.operator}{step.right}=", False), (str(step.result), True)]

    def token_kinds(self, tokenizer: Any, problem: Problem) -> tuple[list[int], list[str]]:
        """(token ids of the worked solution, "free" or "forced" for each)."""
        ids, free = solution_token_labels(tokenizer, problem)
        return ids, ["free" if is_free else "forced" for is_free in free]

    def trace_metrics(self, problems: Sequence[Problem], records: Sequence[Any]) -> dict[str, Any]:
        """Per-line measurements of sampled completions: none on this task (only the answer is graded)."""
        return {}


def parse_chain(problem_text: str) -> OperationChain:
    """The `OperationChain` behind an operation-chain problem text (the inverse of `problem_text()`)."""
    modulus_match = _MODULUS_RE.match(problem_text)
    modulus = int(modulus_match.group(1)) if modulus_match else None
    start_match = _START_RE.search(problem_text)
    if start_match is None:
        raise ValueError(f"not an operation-chain problem (no start value): {problem_text!r}")
    instructions = []
    for word, listed in _INSTRUCTION_RE.findall(problem_text[start_match.end() :]):
        operands = tuple(int(number) for number in re.split(r", | and ", listed))
        instructions.append(ChainInstruction(_OPERATOR_OF_WORD[word], operands))
    chain = OperationChain(int(start_match.group(1)), tuple(instructions), modulus)
    if chain.problem_text() != problem_text:
        raise ValueError(f"could not parse the operation-chain problem {problem_text!r}")
    return chain


def solution_steps(chain: OperationChain, solution: str) -> list[ChainStep]:
    """The steps written in `solution` (one "a+b=c" line each), each marked free choice or forced.

    A step is a free choice when its operand was one of two or more operands of a block still left to
    apply; the last operand of a block, and every single instruction, are forced. Raises ValueError if
    the solution does not follow the chain (wrong operator, an operand not in the current instruction).
    """
    lines = solution.split("\n")[:-1]  # the last line is the boxed answer
    steps: list[ChainStep] = []
    line_index = 0
    for instruction in chain.instructions:
        remaining = list(instruction.operands)
        while remaining:
            if line_index >= len(lines):
                raise ValueError(f"the solution has fewer steps than the chain ({chain.length})")
            match = _STEP_LINE_RE.match(lines[line_index])
            if match is None:
                raise ValueError(f"not a step line: {lines[line_index]!r}")
            left, operator, right, result = match.groups()
            if operator != instruction.operator or int(right) not in remaining:
                raise ValueError(f"step {lines[line_index]!r} does not apply {instruction.text()!r}")
            free_choice = len(remaining) > 1
            remaining.remove(int(right))
            steps.append(ChainStep(int(left), operator, int(right), int(result), free_choice))
            line_index += 1
    if line_index != len(lines):
        raise ValueError(f"the solution has more steps than the chain ({chain.length})")
    return steps


def free_choice_spans(problem: Problem) -> list[tuple[int, int]]:
    """Character spans `[start, end)` of the free-choice operands in `problem.solution`."""
    if problem.solution is None:
        raise ValueError(f"problem {problem.id!r} has no worked solution")
    steps = solution_steps(parse_chain(problem.problem), problem.solution)
    spans = []
    line_start = 0
    for step, line in zip(steps, problem.solution.split("\n"), strict=False):
        if step.free_choice:
            operand_start = line_start + len(str(step.left)) + len(step.operator)
            spans.append((operand_start, operand_start + len(str(step.right))))
        line_start += len(line) + 1
    return spans


def solution_token_labels(tokenizer: Any, problem: Problem) -> tuple[list[int], list[bool]]:
    """(token ids of the worked solution, True for each token that overlaps a free-choice operand)."""
    encoded = tokenizer(problem.solution, add_special_tokens=False, return_offsets_mapping=True)
    spans = free_choice_spans(problem)
    labels = [any(start < span_end and span_start < end for span_start, span_end in spans)
              for start, end in encoded["offset_mapping"]]
    return list(encoded["input_ids"]), labels
