"""The study's second task: search with verification (`search_checks`), and how its traces are read.

A problem lists a few candidates for an unknown x and a short operation chain modulo 10: "Work modulo
10. Start with x. Add 5. Multiply by 9. The result is 9. Which of 4, 6 and 8 is x?". The student's
worked solution is a search: it tries a candidate, checks it on one line that ends with the value
reached beside the target and a verdict, and after a failed check tries another, opening that line
with an epistemic marker (SPEC §3's E(y) list) or not, as it chooses:

    try 8: 8+5=3, 3*9=7 vs 9 no
    wait, try 4: 4+5=9, 9*9=1 vs 9 no
    try 6: 6+5=1, 1*9=9 vs 9 yes
    \\boxed{6}

Which candidate to try next is the main free choice (a *fork*), and it matters: the right pick ends the
search at once, a wrong one costs a check line (and another chance of an arithmetic slip). Whether to
say the marker is the other (free, and without consequence for the answer: E(y) measures how often the
model verbalizes doubt after a failure). Everything else is forced by the problem and the lines before
it. The privileged teacher sees either the full search trace, failed checks included
(`teacher_view(..., "rich")`), or only the answer ("weak").

`analyse_trace` reads a trace (a worked solution or a sampled completion) into check lines and
measures: StepAcc (the fraction of its step lines that are verifiably right), failed checks,
recoveries (a failed check followed by a marker and another try), the boxed answer, and the character
spans of forks (a candidate picked among two or more untried ones), forced picks (the last one left)
and markers. `solution_token_kinds` / `completion_token_kinds` label tokens "fork", "marker" or
"forced", in the spirit of `selfdistill.study.task.solution_token_labels`.
"""

from __future__ import annotations

import math
import random
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, ClassVar

from selfdistill.data import Problem
from selfdistill.data.generated import make_splits
from selfdistill.data.markers import EPISTEMIC_MARKERS
from selfdistill.data.search import (
    SEARCH_CHECKS,
    SEARCH_IN_DISTRIBUTION,
    SEARCH_MARKERS,
    SEARCH_MODULUS,
    SEARCH_OOD_BREADTH,
    SEARCH_OOD_DEPTH,
    SearchPuzzle,
    draw_marker,
    sample_search_puzzle,
    search_checks,
)
from selfdistill.data.synthetic import ChainInstruction, ChainStep
from selfdistill.study.task import StudySplits

_OPERATOR_OF_WORD = {"Add": "+", "Subtract": "-", "Multiply by": "*"}
_PROBLEM_RE = re.compile(
    r"^Work modulo (\d+)\. Start with x\. ((?:(?:Add|Subtract|Multiply by) \d+\. )+)"
    r"The result is (\d+)\. Which of (\d+(?:, \d+)* and \d+) is x\?$"
)
_OPERATION_RE = re.compile(r"(Add|Subtract|Multiply by) (\d+)\. ")
_CHECK_RE = re.compile(r"^(?:([A-Za-z]+), )?try (\d+): (.+) vs (\d+) (yes|no)$")
_STEP_RE = re.compile(r"^(\d+)([+*-])(\d+)=(\d+)$")
_BOXED_RE = re.compile(r"^\\boxed\{([^{}]*)\}$")

TEACHER_CONDITIONS: dict[str, str] = {"rich": "opsd_mild", "weak": "answer_only"}
"""Teacher condition -> prompt template: "rich" shows the full search trace, failed checks included (a
template whose context is the worked solution), "weak" shows only the final answer (the answer-only
template)."""

TOKEN_KINDS = ("fork", "marker", "forced")


def parse_search_puzzle(problem_text: str) -> SearchPuzzle:
    """The `SearchPuzzle` behind a `search_checks` problem text (the inverse of `problem_text()`)."""
    match = _PROBLEM_RE.match(problem_text)
    if match is None:
        raise ValueError(f"not a search-checks problem: {problem_text!r}")
    modulus, operations, target, listed = match.groups()
    instructions = tuple(
        ChainInstruction(_OPERATOR_OF_WORD[word], (int(operand),))
        for word, operand in _OPERATION_RE.findall(operations)
    )
    candidates = tuple(int(number) for number in re.split(r", | and ", listed))
    puzzle = SearchPuzzle(candidates, instructions, int(target), int(modulus))
    if puzzle.problem_text() != problem_text:
        raise ValueError(f"could not parse the search-checks problem {problem_text!r}")
    return puzzle


# --------------------------------------------------------------------------------------------
# Reading a trace


@dataclass(frozen=True)
class TraceLine:
    """One step line of a trace: a check line ("wait, try 4: 4+5=9, 9*9=1 vs 9 no") or a malformed line.

    start: the line's character offset in the trace. opening: the word before ", try" (None when the
    line opens with "try"); marker: True when that word is an E(y) marker. candidate / candidate_span:
    the value tried and its characters (None for a malformed line). verdict: "yes" or "no" as written.
    correct: the candidate is listed, every step `left op right = result` is the problem's operation
    applied to the true value, the target set beside the value reached is the problem's, and the verdict
    is right. fork: the candidate was picked while two or
    more listed candidates were still untried (a choice point, whatever was picked there); repeated:
    it was tried before; listed: the candidate is one of the problem's.
    """

    start: int
    text: str
    opening: str | None = None
    marker: bool = False
    candidate: int | None = None
    candidate_span: tuple[int, int] | None = None
    verdict: str | None = None
    listed: bool = False
    correct: bool = False
    fork: bool = False
    repeated: bool = False

    @property
    def is_check(self) -> bool:
        return self.candidate is not None

    @property
    def marker_span(self) -> tuple[int, int] | None:
        return (self.start, self.start + len(self.opening)) if self.marker and self.opening else None


@dataclass(frozen=True)
class TraceAnalysis:
    """What `analyse_trace` reads from one trace.

    lines: every non-empty line before the answer line, and any after it (malformed lines count as
    incorrect steps). answer: the content of the first `\\boxed{...}` line, or None.
    """

    lines: tuple[TraceLine, ...]
    answer: str | None
    gold: str
    failed_checks: int = 0
    recoveries: int = 0
    unmarked_retries: int = 0
    misplaced_markers: int = 0

    @property
    def steps(self) -> int:
        return len(self.lines)

    @property
    def correct_steps(self) -> int:
        return sum(line.correct for line in self.lines)

    @property
    def step_acc(self) -> float | None:
        """StepAcc: the fraction of step lines that are verifiably right; None for a trace without any."""
        return self.correct_steps / self.steps if self.lines else None

    @property
    def answer_correct(self) -> bool:
        return self.answer is not None and self.answer.strip() == self.gold

    @property
    def checks(self) -> int:
        """Check lines (parsed candidates), right or wrong."""
        return sum(line.is_check for line in self.lines)

    @property
    def marker_rate(self) -> float | None:
        """Markers said per chance to say one: recoveries / (recoveries + unmarked retries); None without a
        failed check followed by another try."""
        return pooled_marker_rate([self])

    @property
    def fork_spans(self) -> list[tuple[int, int]]:
        """Characters of candidates picked among two or more untried ones."""
        return [line.candidate_span for line in self.lines if line.fork and line.candidate_span]

    @property
    def forced_choice_spans(self) -> list[tuple[int, int]]:
        """Characters of candidates tried with one untried candidate left, or none (a repeat)."""
        return [line.candidate_span for line in self.lines if line.is_check and not line.fork and line.candidate_span]

    @property
    def marker_spans(self) -> list[tuple[int, int]]:
        return [span for line in self.lines if (span := line.marker_span) is not None]


def _read_line(puzzle: SearchPuzzle, text: str, start: int, tried: set[int]) -> TraceLine:
    match = _CHECK_RE.match(text)
    if match is None:
        return TraceLine(start, text)
    opening, candidate_text, arithmetic, stated_target, verdict = match.groups()
    candidate = int(candidate_text)
    offset = match.start(2)
    listed = candidate in puzzle.candidates
    untried = set(puzzle.candidates) - tried
    correct = False
    if listed:
        written = [_STEP_RE.match(part) for part in arithmetic.split(", ")]
        expected = puzzle.check_steps(candidate)
        correct = (
            len(written) == len(expected)
            and all(
                found is not None and found.groups() == (str(s.left), s.operator, str(s.right), str(s.result))
                for found, s in zip(written, expected, strict=False)
            )
            and stated_target == str(puzzle.target)
            and verdict == ("yes" if puzzle.passes(candidate) else "no")
        )
    return TraceLine(
        start=start,
        text=text,
        opening=opening,
        marker=opening is not None and opening.lower() in EPISTEMIC_MARKERS,
        candidate=candidate,
        candidate_span=(start + offset, start + offset + len(candidate_text)),
        verdict=verdict,
        listed=listed,
        correct=correct,
        fork=len(untried) >= 2,
        repeated=candidate in tried,
    )


def analyse_trace(puzzle: SearchPuzzle, text: str) -> TraceAnalysis:
    """Read a search trace line by line against `puzzle` (see `TraceLine` and `TraceAnalysis`).

    Counts: failed_checks, lines with the verdict "no"; recoveries, failed checks whose next line is a
    check line opened by an E(y) marker; unmarked_retries, failed checks followed by a check line
    without one; misplaced_markers, check lines opened by a marker that do not follow a failed check.
    """
    lines: list[TraceLine] = []
    answer: str | None = None
    tried: set[int] = set()
    start = 0
    for raw in text.split("\n"):
        stripped = raw.strip()
        if stripped:
            boxed = _BOXED_RE.match(stripped)
            if boxed is not None and answer is None:
                answer = boxed.group(1)
            else:
                line = _read_line(puzzle, raw, start, tried) if answer is None else TraceLine(start, raw)
                lines.append(line)
                if line.candidate is not None:
                    tried.add(line.candidate)
        start += len(raw) + 1
    failed = recoveries = unmarked = misplaced = 0
    for index, line in enumerate(lines):
        after_failure = index > 0 and lines[index - 1].verdict == "no"
        if line.verdict == "no":
            failed += 1
        if line.is_check and after_failure:
            recoveries += line.marker
            unmarked += not line.marker
        elif line.is_check and line.marker:
            misplaced += 1
    return TraceAnalysis(
        tuple(lines), answer, str(puzzle.answer), failed_checks=failed, recoveries=recoveries,
        unmarked_retries=unmarked, misplaced_markers=misplaced,
    )


def analyse_completion(problem: Problem, completion: str) -> TraceAnalysis:
    """`analyse_trace` for a `search_checks` problem's completion (or its worked solution)."""
    return analyse_trace(parse_search_puzzle(problem.problem), completion)


def pooled_marker_rate(analyses: Iterable[TraceAnalysis]) -> float | None:
    """The marker rate over many traces: recoveries / (recoveries + unmarked retries), all pooled (None without a
    failed check followed by another try)."""
    said = chances = 0
    for analysis in analyses:
        said += analysis.recoveries
        chances += analysis.recoveries + analysis.unmarked_retries
    return said / chances if chances else None


def pooled_step_acc(analyses: Iterable[TraceAnalysis]) -> float | None:
    """StepAcc over many traces: correct step lines / step lines, all pooled (None without any line)."""
    correct = steps = 0
    for analysis in analyses:
        correct += analysis.correct_steps
        steps += analysis.steps
    return correct / steps if steps else None


# --------------------------------------------------------------------------------------------
# Token labels


def _char_kinds(analysis: TraceAnalysis) -> list[tuple[tuple[int, int], str]]:
    return [(span, "fork") for span in analysis.fork_spans] + [(span, "marker") for span in analysis.marker_spans]


def _kinds_of(offsets: Sequence[tuple[int, int]], analysis: TraceAnalysis) -> list[str]:
    spans = _char_kinds(analysis)
    kinds = []
    for start, end in offsets:
        kind = next((k for (s, e), k in spans if start < e and s < end), "forced")
        kinds.append(kind)
    return kinds


def solution_token_kinds(tokenizer: Any, problem: Problem) -> tuple[list[int], list[str]]:
    """(token ids of the worked solution, the kind of each token: "fork", "marker" or "forced").

    A token is a fork where it overlaps a candidate picked among two or more untried ones, a marker
    where it overlaps the E(y) word after a failed check; every other token is forced.
    """
    if problem.solution is None:
        raise ValueError(f"problem {problem.id!r} has no worked solution")
    encoded = tokenizer(problem.solution, add_special_tokens=False, return_offsets_mapping=True)
    analysis = analyse_completion(problem, problem.solution)
    return list(encoded["input_ids"]), _kinds_of(encoded["offset_mapping"], analysis)


def completion_token_kinds(tokenizer: Any, problem: Problem, token_ids: Sequence[int]) -> list[str]:
    """The kind of each token of a sampled completion (token ids as generated, special tokens kept
    out): character offsets come from decoding growing prefixes, so no re-tokenization is assumed."""
    ids = list(token_ids)
    offsets, previous = [], 0
    for end in range(1, len(ids) + 1):
        length = len(tokenizer.decode(ids[:end], skip_special_tokens=True))
        offsets.append((previous, length))
        previous = length
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return _kinds_of(offsets, analyse_completion(problem, text))


# --------------------------------------------------------------------------------------------
# Teacher conditions


def teacher_view(problem: Problem, condition: str) -> tuple[Problem, str]:
    """(the problem as the teacher should see it, the prompt template to render it with).

    "rich": the problem's worked solution, the full search trace with its failed checks and markers,
    rendered by the "opsd_mild" template (the study's default). "weak": rendered by "answer_only", which
    shows only `answer`. Both read the problem unchanged; the student prompt reads only `problem.problem`.
    """
    if condition not in TEACHER_CONDITIONS:
        raise ValueError(f"condition must be one of {sorted(TEACHER_CONDITIONS)}, got {condition!r}")
    return problem, TEACHER_CONDITIONS[condition]


# --------------------------------------------------------------------------------------------
# Splits


def guided_trace(puzzle: SearchPuzzle, rng: random.Random, guidance: float, markers: Sequence[str],
                 marker_rate: float = 1.0) -> str:
    """A search trace written by someone who knows the answer: at each fork the answer is tried with
    probability `guidance`, otherwise an untried candidate drawn uniformly (possibly the answer); the line
    after a failed check opens with a marker with probability `marker_rate` (as the student's traces)."""
    untried = list(puzzle.candidates)
    order: list[int] = []
    while not order or order[-1] != puzzle.answer:
        pick = puzzle.answer if rng.random() < guidance else rng.choice(untried)
        untried.remove(pick)
        order.append(pick)
    return puzzle.trace(order, [draw_marker(rng, markers, marker_rate) for _ in order[:-1]])


OOD_SPLITS: dict[str, dict[str, Any]] = {"breadth": SEARCH_OOD_BREADTH, "depth": SEARCH_OOD_DEPTH}
"""Out-of-distribution held-out set -> how it differs: "breadth" lists more candidates, "depth" has longer
check lines, than any in-distribution problem."""


@dataclass(frozen=True)
class SearchStudyTask:
    """The problems of a study on `search_checks`: one in-distribution stream cut into held-out,
    validation, RL and warm-start parts (as `StudyTask`, plus the validation slice that tuning is judged
    on), and two out-of-distribution held-out sets (`OOD_SPLITS`, ids `search_checks_<name>-<seed>-<i>`).

    Traces open the line after a failed check with a marker with probability `marker_rate`. The warm
    start's teacher-prompted examples (`sft_example`) show the rich view (the full search trace) and copy
    it, or, `weak_share` of them, the weak view (the answer only) with a `guided_trace` that tries the
    answer first with probability `teacher_guidance` as target: a pretrained LLM shown a solution follows
    it, and shown the answer goes for it.
    """

    candidates: tuple[int, int] = SEARCH_IN_DISTRIBUTION["candidates"]
    length: tuple[int, int] = SEARCH_IN_DISTRIBUTION["length"]
    breadth_candidates: tuple[int, int] = SEARCH_OOD_BREADTH["candidates"]
    breadth_length: tuple[int, int] = SEARCH_OOD_BREADTH["length"]
    depth_candidates: tuple[int, int] = SEARCH_OOD_DEPTH["candidates"]
    depth_length: tuple[int, int] = SEARCH_OOD_DEPTH["length"]
    modulus: int = SEARCH_MODULUS
    markers: tuple[str, ...] = SEARCH_MARKERS
    marker_rate: float = 0.5
    seed: int = 2026
    n_eval: int = 64
    n_ood: int = 64
    """Problems of each out-of-distribution set."""
    n_validation: int = 64
    n_rl: int = 512
    n_sft: int = 4000
    teacher_guidance: float = 0.8
    weak_share: float = 0.5

    name: ClassVar[str] = "search"
    max_new_tokens: ClassVar[int] = 160
    """Rollout and in-distribution evaluation length limit (worked solutions: at most 4 check lines of 2 steps)."""
    ood_max_new_tokens: ClassVar[int] = 256
    """Out-of-distribution evaluation length limit (6 check lines of 2 steps, or 4 of 3)."""
    token_kind_names: ClassVar[tuple[str, ...]] = TOKEN_KINDS

    def __post_init__(self) -> None:
        for name in ("candidates", "length", "breadth_candidates", "breadth_length", "depth_candidates",
                     "depth_length", "markers"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if min(self.n_eval, self.n_ood, self.n_validation, self.n_rl, self.n_sft) < 1:
            raise ValueError("n_eval, n_ood, n_validation, n_rl and n_sft must all be >= 1")
        if self.breadth_candidates[0] <= self.candidates[1] or self.depth_length[0] <= self.length[1]:
            raise ValueError(
                "the breadth set must list more candidates, and the depth set have longer check lines, than any "
                f"in-distribution problem: got candidates {self.candidates} vs {self.breadth_candidates}, length "
                f"{self.length} vs {self.depth_length}")
        for name in ("teacher_guidance", "weak_share", "marker_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")

    def options(self) -> dict[str, Any]:
        """Keyword arguments of `search_checks` in distribution."""
        return {"candidates": self.candidates, "length": self.length, "modulus": self.modulus,
                "markers": self.markers, "marker_rate": self.marker_rate}

    def ood_options(self, split: str) -> dict[str, Any]:
        """Keyword arguments of `search_checks` for the out-of-distribution set `split` ("breadth", "depth")."""
        if split not in OOD_SPLITS:
            raise ValueError(f"split must be one of {sorted(OOD_SPLITS)}, got {split!r}")
        return {**self.options(), "candidates": getattr(self, f"{split}_candidates"),
                "length": getattr(self, f"{split}_length")}

    def to_json(self) -> dict[str, Any]:
        values = {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}
        return {"kind": self.name, **values}

    def splits(self) -> StudySplits:
        """Held-out first, then validation, RL and warm-start problems from one stream (each part stays the
        same when later parts change size); each out-of-distribution set from its own seed."""
        train, held_out = make_splits(SEARCH_CHECKS, self.n_validation + self.n_rl + self.n_sft, self.n_eval,
                                      self.seed, **self.options())
        rl_end = self.n_validation + self.n_rl
        ood = {
            split: [replace(problem, id=problem.id.replace(SEARCH_CHECKS, f"{SEARCH_CHECKS}_{split}", 1))
                    for problem in search_checks(self.n_ood, seed=self.seed + offset, **self.ood_options(split))]
            for offset, split in enumerate(OOD_SPLITS, start=1)
        }
        return StudySplits(held_out, ood, train[self.n_validation : rl_end], train[rl_end:],
                           validation=train[: self.n_validation])

    # The interface the study's warm start, runs and probes use (as `StudyTask`'s).

    def teacher_views(self, template: str) -> dict[str, str]:
        """Teacher condition -> prompt template: "rich" (the full search trace, in the study's template) and
        "weak" (the answer only)."""
        return {"rich": template, "weak": TEACHER_CONDITIONS["weak"]}

    def sft_example(self, problem: Problem, as_teacher: bool, rng: random.Random) -> tuple[str | None, Problem, str]:
        """(teacher view or None for the student prompt, the problem to render, the target text): a student
        example and a rich-view one target the problem's search trace, a weak-view one a `guided_trace`."""
        if not as_teacher:
            return None, problem, problem.solution
        if rng.random() >= self.weak_share:
            return "rich", problem, problem.solution
        puzzle = parse_search_puzzle(problem.problem)
        return "weak", problem, guided_trace(puzzle, rng, self.teacher_guidance, self.markers, self.marker_rate)

    def drill_step(self, rng: random.Random) -> ChainStep:
        """One arithmetic drill operation as a check line has them: any value, one drawn operation."""
        puzzle = sample_search_puzzle(rng, candidates=2, length=1, modulus=self.modulus)
        (step,) = puzzle.check_steps(rng.randrange(self.modulus))
        return step

    def drill_segments(self, rng: random.Random) -> list[tuple[str, bool]]:
        """One drill line as (text, supervised) pieces, the end of a check line: "a op b=", the result c, " vs t"
        with t = c half of the time (else another value), and the verdict " yes" / " no"; the result and the
        verdict are supervised. The comparison is what makes a check verify."""
        step = self.drill_step(rng)
        target = step.result if rng.random() < 0.5 else rng.choice([v for v in range(self.modulus) if v != step.result])
        verdict = "yes" if target == step.result else "no"
        return [(f"{step.left}{step.operator}{step.right}=", False), (str(step.result), True), (f" vs {target}", False),
                (f" {verdict}", True)]

    def token_kinds(self, tokenizer: Any, problem: Problem) -> tuple[list[int], list[str]]:
        return solution_token_kinds(tokenizer, problem)

    def chance_avg(self, problems: Sequence[Problem]) -> float:
        """Avg@k of boxing one listed candidate drawn at random: the mean of 1 / (candidates listed)."""
        return statistics.fmean(1.0 / len(parse_search_puzzle(p.problem).candidates) for p in problems)

    def trace_metrics(self, problems: Sequence[Problem], records: Sequence[Any]) -> dict[str, Any]:
        """Measurements of sampled completions (records with `problem_id` and `completion`), pooled over every
        completion: StepAcc, check lines, failed checks and recoveries per response, the share of responses
        whose first try is the answer, the marker rate (markers said per failed check followed by another
        try), and the checks' verdicts: P("yes" | the answer tried), P("yes" | a wrong listed candidate
        tried), their difference (the verification gap) and the share of tries not on the list."""
        by_id = {problem.id: problem for problem in problems}
        analyses = [analyse_completion(by_id[record.problem_id], record.completion) for record in records]
        if not analyses:
            return {}
        checks = [(line, int(a.gold)) for a in analyses for line in a.lines if line.is_check]
        listed = [(line, gold) for line, gold in checks if line.listed]
        on_answer = [line.verdict == "yes" for line, gold in listed if line.candidate == gold]
        on_wrong = [line.verdict == "yes" for line, gold in listed if line.candidate != gold]
        yes_on_answer = statistics.fmean(on_answer) if on_answer else None
        yes_on_wrong = statistics.fmean(on_wrong) if on_wrong else None
        return {
            "step_acc": pooled_step_acc(analyses),
            "checks_per_response": statistics.fmean(a.checks for a in analyses),
            "failed_checks_per_response": statistics.fmean(a.failed_checks for a in analyses),
            "recoveries_per_response": statistics.fmean(a.recoveries for a in analyses),
            "first_try_right": statistics.fmean(
                bool(a.lines) and a.lines[0].candidate == int(a.gold) for a in analyses),
            "marker_rate": pooled_marker_rate(analyses),
            "yes_on_answer": yes_on_answer,
            "yes_on_wrong": yes_on_wrong,
            "verification_gap": (yes_on_answer - yes_on_wrong
                                 if yes_on_answer is not None and yes_on_wrong is not None else None),
            "unlisted_share": statistics.fmean(not line.listed for line, _ in checks) if checks else None,
        }

    def per_problem(self, problems: Sequence[Problem], records: Sequence[Any]) -> dict[str, list[float]]:
        """Per-problem scores of sampled completions, in the order of `problems`: "avg" (the share of its
        samples that are right), "epistemic" (its marker rate: markers said per failed check followed by
        another try, pooled over its samples) and "step_acc" (right step lines / step lines, pooled);
        NaN where a problem's samples give no chance (no retry after a failure, no step line)."""
        grouped: dict[str, list[Any]] = {problem.id: [] for problem in problems}
        for record in records:
            grouped[record.problem_id].append(record)
        scores: dict[str, list[float]] = {"avg": [], "epistemic": [], "step_acc": []}
        for problem in problems:
            own = grouped[problem.id]
            analyses = [analyse_completion(problem, record.completion) for record in own]
            step_acc, marker_rate = pooled_step_acc(analyses), pooled_marker_rate(analyses)
            scores["avg"].append(statistics.fmean(r.correct for r in own) if own else math.nan)
            scores["epistemic"].append(math.nan if marker_rate is None else marker_rate)
            scores["step_acc"].append(math.nan if step_acc is None else step_acc)
        return scores
