"""Student and teacher prompts: text and token ids.

The student sees the problem; the teacher sees the problem plus privileged context (a reference
solution, the final answer, or a successful sibling rollout). Both are rendered through the same
chat template with the same thinking setting, tokenized without adding special tokens a second
time, and never truncated: a prompt over the limit raises `PromptTooLongError` with the numbers.

Packing the token ids with responses into tensor batches is `selfdistill.forward`'s (`pack`, `pack_shared`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

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
    """A rendered prompt is longer than its limit. Prompts are never truncated.

    `where` names the prompt (a problem id, a dataset row), `limit_source` what set the limit, and `remedy`
    what the user can do; the message is built from them, so a caller with other settings (the TRL route)
    says its own words through the same fields.
    """

    def __init__(self, *, length: int, limit: int, problem_id: str, role: str, where: str | None = None,
                 limit_source: str = "max_prompt_tokens",
                 remedy: str = "raise max_prompt_tokens or drop this problem") -> None:
        self.length = length
        self.limit = limit
        self.problem_id = problem_id
        self.role = role
        where = where or f"problem {problem_id!r}"
        super().__init__(
            f"{role} prompt for {where} is {length} tokens, over the limit of {limit} ({limit_source}); "
            f"prompts are not truncated: {remedy}"
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
