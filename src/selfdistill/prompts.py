"""Student and teacher prompts, and packing prompts with responses into aligned batches.

The student sees the problem; the teacher sees the problem plus privileged context (a reference
solution, the final answer, or a successful sibling rollout). Both are rendered through the same
chat template with the same thinking setting, tokenized without adding special tokens a second
time, and never truncated: a prompt over the limit raises `PromptTooLongError` with the numbers.

Alignment (used by every consumer of `pack`): with prompts left-padded to width P, response token
t of every row sits at column P + t, and the logits that predict it are at column P - 1 + t.
`pack_shared` lays out the same batch with each distinct prompt kept once (`SharedPrefixBatch`), for
a forward pass that runs each prompt once and the responses on its KV cache.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from selfdistill.data import Problem

CONTEXT_KINDS = ("solution", "answer", "sibling")

# --------------------------------------------------------------------------------------------
# Templates. Placeholders: {problem}, and in the teacher message the one context it needs.
# Filled in a single pass, so braces in the problem text (\boxed{}, "{solution}") stay verbatim.

_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
_STUDENT = "Problem: {problem}\n\n" + _INSTRUCTION


def _teacher_message(context_block: str, transition: str, instruction: str = _INSTRUCTION) -> str:
    """The OPSD release layout: problem, context, a transition ("guard") line, the instruction."""
    return "{problem}\n\n" + context_block + "\n\n\n" + transition + "\n\n" + instruction


# For small models that ramble under "reason step by step": ask for a short worked answer.
_SHORT_INSTRUCTION = "Give a short calculation and put the final answer within \\boxed{}."


_REFERENCE_SOLUTION = "Here is a reference solution to this problem:\n{solution}"

# The three guard wordings of OPSD (research/algorithms.md §2.4). Each asks the teacher to reason
# on its own rather than copy; they differ in how hard they insist.
_RELEASE_TRANSITION = (
    "After understanding the reference solution and the rationale behind each step, now articulate "
    "your own step-by-step reasoning that derives the same final answer to the problem below:"
)
_MILD_TRANSITION = (
    "After understanding the reference solution, please try to solve this problem using your own "
    "approach below:"
)
_HARDENED_TRANSITION = (
    "After reading the reference solution above, make sure you truly understand the reasoning behind "
    "each step \u2014 do not copy or paraphrase it. Now, using your own words and independent reasoning, "
    "derive the same final answer to the problem above. Think step by step, explore different "
    "approaches, and don't be afraid to backtrack or reconsider if something doesn't work out:"
)


@dataclass(frozen=True)
class PromptTemplate:
    """A pair of user-message formats and the privileged context the teacher message needs.

    student: contains {problem}. teacher: contains {problem} and {<context>}, where context is
    "solution" (problem.solution), "answer" (problem.answer) or "sibling" (a successful rollout
    of the same problem, passed to `PromptBuilder.teacher_ids`).
    """

    name: str
    student: str
    teacher: str
    context: str

    def __post_init__(self) -> None:
        if self.context not in CONTEXT_KINDS:
            raise ValueError(
                f"template {self.name!r}: context must be one of {CONTEXT_KINDS}, got {self.context!r}"
            )
        if "{problem}" not in self.student:
            raise ValueError(f"template {self.name!r}: the student message has no {{problem}} placeholder")
        for placeholder in ("{problem}", "{" + self.context + "}"):
            if placeholder not in self.teacher:
                raise ValueError(
                    f"template {self.name!r}: the teacher message has no {placeholder} placeholder"
                )


TEMPLATES: dict[str, PromptTemplate] = {
    # OPSD as released (siyan-zhao/OPSD data_collator.py): worked solution + release transition.
    "opsd": PromptTemplate(
        "opsd", _STUDENT, _teacher_message(_REFERENCE_SOLUTION, _RELEASE_TRANSITION), "solution"
    ),
    # OPSD paper v1 wording of the guard (mild).
    "opsd_mild": PromptTemplate(
        "opsd_mild", _STUDENT, _teacher_message(_REFERENCE_SOLUTION, _MILD_TRANSITION), "solution"
    ),
    # OPSD's later, hardened guard: do not copy, reason independently, backtrack if needed.
    "opsd_hardened": PromptTemplate(
        "opsd_hardened", _STUDENT, _teacher_message(_REFERENCE_SOLUTION, _HARDENED_TRANSITION), "solution"
    ),
    # For data with a final answer but no worked solution: the answer is the only hint.
    "answer_only": PromptTemplate(
        "answer_only",
        _STUDENT,
        _teacher_message(
            "The final answer to this problem is: {answer}",
            "Knowing the final answer, please try to solve this problem using your own approach below:",
        ),
        "answer",
    ),
    # The SDPO route: a successful rollout of the same group serves as the example solution.
    "sibling": PromptTemplate(
        "sibling",
        _STUDENT,
        _teacher_message(
            "Here is an example solution to this problem that reaches the correct answer:\n{sibling}",
            "After understanding the example solution, please try to solve this problem using your own "
            "approach below:",
        ),
        "sibling",
    ),
    # Short answers (the CPU demo's SmolLM2-135M): the same instruction for student and teacher.
    "concise": PromptTemplate(
        "concise",
        "{problem}\n\n" + _SHORT_INSTRUCTION,
        _teacher_message(_REFERENCE_SOLUTION, _MILD_TRANSITION, _SHORT_INSTRUCTION),
        "solution",
    ),
}
DEFAULT_TEMPLATE = "opsd_mild"

_PLACEHOLDER = re.compile(r"\{(problem|solution|answer|sibling)\}")


def fill(message_format: str, values: dict[str, str]) -> str:
    """Replace the {problem}/{solution}/{answer}/{sibling} placeholders in one pass.

    Other braces are left alone, and substituted text is never scanned again.
    """
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], message_format)


# --------------------------------------------------------------------------------------------
# Errors


class PromptTooLongError(ValueError):
    """A rendered prompt is longer than max_prompt_tokens. Prompts are never truncated."""

    def __init__(self, *, length: int, limit: int, problem_id: str, role: str) -> None:
        self.length = length
        self.limit = limit
        self.problem_id = problem_id
        self.role = role
        super().__init__(
            f"{role} prompt for problem {problem_id!r} is {length} tokens, over max_prompt_tokens={limit}; "
            "prompts are not truncated: raise max_prompt_tokens or drop this problem"
        )


class MissingContextError(ValueError):
    """The teacher template needs privileged context that this problem (or call) does not have."""


# --------------------------------------------------------------------------------------------
# Building token ids


class PromptBuilder:
    """Renders student and teacher prompts through one chat template and tokenizes them.

    Both prompts use the same tokenizer chat template, the same system prompt (None keeps the
    template's own default) and the same `enable_thinking` (None: not passed to the template).
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        template: str | PromptTemplate = DEFAULT_TEMPLATE,
        max_prompt_tokens: int = 1024,
        enable_thinking: bool | None = None,
        system_prompt: str | None = None,
    ) -> None:
        if isinstance(template, str):
            if template not in TEMPLATES:
                raise ValueError(f"unknown prompt template {template!r}; known: {', '.join(TEMPLATES)}")
            template = TEMPLATES[template]
        if max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be positive, got {max_prompt_tokens}")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                "the tokenizer has no chat template; student and teacher prompts are rendered with it"
            )
        self.tokenizer = tokenizer
        self.template = template
        self.max_prompt_tokens = max_prompt_tokens
        self.enable_thinking = enable_thinking
        self.system_prompt = system_prompt
        # (role, problem, sibling) -> token ids: the trainer asks for a prompt's ids once per row and step, and
        # rendering the chat template and tokenizing cost more than a small model's forward pass.
        self._ids: dict[tuple[str, Problem, str | None], list[int]] = {}

    # the most prompts whose token ids are kept (the oldest are dropped first)
    CACHED_PROMPTS = 8192

    # -- messages

    def _messages(self, user_message: str) -> list[dict[str, str]]:
        messages = [] if self.system_prompt is None else [{"role": "system", "content": self.system_prompt}]
        return [*messages, {"role": "user", "content": user_message}]

    def student_messages(self, problem: Problem) -> list[dict[str, str]]:
        """The student's chat messages: optional system prompt, then the problem."""
        return self._messages(fill(self.template.student, {"problem": problem.problem}))

    def teacher_messages(self, problem: Problem, sibling: str | None = None) -> list[dict[str, str]]:
        """The teacher's chat messages: the problem with the template's privileged context."""
        context = self.template.context
        if context != "sibling" and sibling is not None:
            raise ValueError(
                f"template {self.template.name!r} uses the problem's {context}, not a sibling rollout; "
                f"a sibling was passed for problem {problem.id!r}"
            )
        if context == "solution":
            value = problem.solution
        elif context == "answer":
            value = problem.answer
        else:
            value = sibling
        if value is None or not value.strip():
            where = "no sibling rollout was passed" if context == "sibling" else f"problem.{context} is empty"
            raise MissingContextError(
                f"template {self.template.name!r} needs a {context} for the teacher, but {where} "
                f"(problem {problem.id!r}, source {problem.source!r})"
            )
        return self._messages(fill(self.template.teacher, {"problem": problem.problem, context: value}))

    # -- rendering and tokenizing

    def render(self, messages: list[dict[str, str]]) -> str:
        """Messages -> prompt text, through the tokenizer's chat template, ending at the assistant turn."""
        options = {} if self.enable_thinking is None else {"enable_thinking": self.enable_thinking}
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **options
        )

    def student_text(self, problem: Problem) -> str:
        """The rendered student prompt (e.g. for a text-in generation backend such as vLLM)."""
        return self.render(self.student_messages(problem))

    def teacher_text(self, problem: Problem, sibling: str | None = None) -> str:
        """The rendered teacher prompt."""
        return self.render(self.teacher_messages(problem, sibling))

    def _encode(self, text: str, problem: Problem, role: str) -> list[int]:
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))  # the template has them
        if len(ids) > self.max_prompt_tokens:
            raise PromptTooLongError(
                length=len(ids), limit=self.max_prompt_tokens, problem_id=problem.id, role=role
            )
        return ids

    def _cached(self, role: str, problem: Problem, sibling: str | None) -> list[int]:
        key = (role, problem, sibling)
        ids = self._ids.get(key)
        if ids is None:
            text = self.student_text(problem) if role == "student" else self.teacher_text(problem, sibling)
            ids = self._encode(text, problem, role)  # raises over the limit, and nothing is kept
            if len(self._ids) >= self.CACHED_PROMPTS:
                del self._ids[next(iter(self._ids))]
            self._ids[key] = ids
        return list(ids)  # a copy: callers may change theirs

    def student_ids(self, problem: Problem) -> list[int]:
        """Token ids of the student prompt; raises PromptTooLongError over the limit."""
        return self._cached("student", problem, None)

    def teacher_ids(self, problem: Problem, sibling: str | None = None) -> list[int]:
        """Token ids of the teacher prompt; `sibling` is required by (and only by) the sibling template."""
        return self._cached("teacher", problem, sibling)


# --------------------------------------------------------------------------------------------
# Packing prompts and responses


@dataclass
class PackedBatch:
    """Prompts left-padded to a common width, each followed by its right-padded response.

    input_ids, attention_mask, position_ids: [B, L] long with L = prompt_width + T.
    response_mask: [B, T] float, 1.0 on real response tokens (EOS included, even when pad == EOS).
    Response token t sits at column prompt_width + t; its logits are at column prompt_width - 1 + t.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    prompt_width: int
    response_mask: torch.Tensor

    @property
    def response_ids(self) -> torch.Tensor:
        """The response tokens, [B, T] (padding where response_mask is 0)."""
        return self.input_ids[:, self.prompt_width :]

    def response_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """From model logits [B, L, V], the ones that predict each response token: [B, T, V]."""
        if logits.shape[:2] != self.input_ids.shape:
            raise ValueError(
                f"logits of shape {tuple(logits.shape)} do not match input_ids {tuple(self.input_ids.shape)}"
            )
        response_length = self.response_mask.shape[1]
        return logits[:, self.prompt_width - 1 : self.prompt_width - 1 + response_length]  # [B, T, V]

    def to(self, device: torch.device | str) -> PackedBatch:
        """The same batch with every tensor on `device`."""
        return PackedBatch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            position_ids=self.position_ids.to(device),
            prompt_width=self.prompt_width,
            response_mask=self.response_mask.to(device),
        )


def pack(prompt_ids: list[list[int]], response_ids: list[list[int]], *, pad_id: int) -> PackedBatch:
    """Pack one prompt and one response per row so that responses line up column by column.

    Prompts are left-padded to the longest prompt (width P), responses right-padded to the longest
    response (T). The masks come from the lengths, never from comparing tokens with pad_id, so a
    response may contain the pad id (EOS when pad == EOS) and it still counts.
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    if not prompt_ids:
        raise ValueError("cannot pack an empty batch")
    if any(len(prompt) == 0 for prompt in prompt_ids):
        raise ValueError(
            "every prompt needs at least one token (its last token's logits predict the response)"
        )
    batch_size = len(prompt_ids)
    prompt_width = max(len(prompt) for prompt in prompt_ids)
    response_length = max(len(response) for response in response_ids)
    total_length = prompt_width + response_length

    input_ids = torch.full((batch_size, total_length), pad_id, dtype=torch.long)  # [B, L]
    attention_mask = torch.zeros((batch_size, total_length), dtype=torch.long)  # [B, L]
    response_mask = torch.zeros((batch_size, response_length), dtype=torch.float32)  # [B, T]
    for row, (prompt, response) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        prompt_start = prompt_width - len(prompt)
        response_end = prompt_width + len(response)
        input_ids[row, prompt_start:prompt_width] = torch.tensor(prompt, dtype=torch.long)
        input_ids[row, prompt_width:response_end] = torch.tensor(response, dtype=torch.long)
        attention_mask[row, prompt_start:response_end] = 1
        response_mask[row, : len(response)] = 1.0
    # Positions count real tokens only, so left padding does not shift them.
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # [B, L]
    return PackedBatch(input_ids, attention_mask, position_ids, prompt_width, response_mask)


@dataclass
class SharedPrefixBatch:
    """Each distinct prompt once, left-padded to width P, and every row's right-padded response.

    Rows that share a prompt (the G samples of one problem) share its forward pass: the decoder runs
    over the U distinct prompts once, their KV cache is indexed out to the B rows, and the responses
    run on top of it (`selfdistill.teacher.response_hidden_states`): the hidden states of the `pack`
    layout, computed without repeating the prompt.

    prefix_ids, prefix_attention_mask, prefix_position_ids: [U, P] long, laid out as `pack` lays out
    prompts. prefix_of_row: [B] long, the prompt of each row. response_ids: [B, T] long, padded with
    pad_id. response_mask: [B, T] float, 1.0 on real response tokens (EOS included, even when
    pad == EOS).
    """

    prefix_ids: torch.Tensor
    prefix_attention_mask: torch.Tensor
    prefix_position_ids: torch.Tensor
    prefix_of_row: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor

    @property
    def prompt_width(self) -> int:
        """P, the width of the left-padded prompts; response token t sits at column P + t."""
        return self.prefix_ids.shape[1]

    def row_attention_mask(self) -> torch.Tensor:
        """Each row's prompt mask followed by its response mask, [B, P + T] long (as `pack` makes it)."""
        prompt_mask = self.prefix_attention_mask[self.prefix_of_row]  # [B, P]
        return torch.cat([prompt_mask, self.response_mask.to(prompt_mask.dtype)], dim=1)  # [B, P+T]

    def response_position_ids(self) -> torch.Tensor:
        """Positions of the response columns, [B, T] long: counting each row's real tokens, as in `pack`."""
        prompt_lengths = self.prefix_attention_mask.sum(dim=1)[self.prefix_of_row]  # [B]
        real_tokens = prompt_lengths[:, None] + self.response_mask.long().cumsum(dim=1)  # [B, T]
        return (real_tokens - 1).clamp(min=0)  # [B, T]

    def to(self, device: torch.device | str) -> SharedPrefixBatch:
        """The same batch with every tensor on `device`."""
        return SharedPrefixBatch(
            prefix_ids=self.prefix_ids.to(device),
            prefix_attention_mask=self.prefix_attention_mask.to(device),
            prefix_position_ids=self.prefix_position_ids.to(device),
            prefix_of_row=self.prefix_of_row.to(device),
            response_ids=self.response_ids.to(device),
            response_mask=self.response_mask.to(device),
        )


def pack_shared(
    prompt_ids: list[list[int]], response_ids: list[list[int]], *, pad_id: int
) -> SharedPrefixBatch:
    """Like `pack`, with each distinct prompt kept once: rows whose prompt token lists are identical
    share it, wherever they sit in the batch. Rows with prompts of their own (the sibling teacher
    template) simply share nothing.
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    if not prompt_ids:
        raise ValueError("cannot pack an empty batch")
    index_of_prompt: dict[tuple[int, ...], int] = {}
    prefix_of_row = [index_of_prompt.setdefault(tuple(prompt), len(index_of_prompt)) for prompt in prompt_ids]
    distinct = [list(prompt) for prompt in index_of_prompt]  # [U] in order of first appearance
    # The distinct prompts with empty responses: `pack` lays out (and checks) the prompt block.
    prompts = pack(distinct, [[] for _ in distinct], pad_id=pad_id)
    response_length = max(len(response) for response in response_ids)
    responses = torch.full((len(response_ids), response_length), pad_id, dtype=torch.long)  # [B, T]
    response_mask = torch.zeros((len(response_ids), response_length), dtype=torch.float32)  # [B, T]
    for row, response in enumerate(response_ids):
        responses[row, : len(response)] = torch.tensor(response, dtype=torch.long)
        response_mask[row, : len(response)] = 1.0
    return SharedPrefixBatch(
        prefix_ids=prompts.input_ids,
        prefix_attention_mask=prompts.attention_mask,
        prefix_position_ids=prompts.position_ids,
        prefix_of_row=torch.tensor(prefix_of_row, dtype=torch.long),
        response_ids=responses,
        response_mask=response_mask,
    )
