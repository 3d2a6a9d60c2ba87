"""Answer extraction and equivalence checking for math completions, with hard time bounds.

How a completion is graded against a gold answer:

1. :func:`extract_answer` pulls the final answer out of the completion: the last complete
   ``\\boxed{...}`` / ``\\fbox{...}`` (braces matched by a scanner, so nesting is fine), else
   "The (final) answer is X", else GSM8K's ``#### X``.
2. Cheap checks in the calling process: no answer gives 0; an answer longer than
   ``max_answer_chars`` gives 0; an answer equal to the gold after :func:`normalize_answer` gives 1
   (no math-verify needed).
3. Everything else goes to a worker process that runs math-verify: the gold is parsed first (as
   ``\\boxed{gold}``), then the answer, then ``verify(gold, answer)``, under a deadline set by the
   parent, which kills the worker that misses it (the task scores 0).

The modules, in that order:

- ``extract``: pure answer extraction and normalization (strings in, strings out).
- ``worker``: the worker process, standard library only at top level; it is loaded by path, so it
  never imports the caller's ``__main__`` nor the rest of the package.
- ``pool``: the parent side: :class:`Grader` (a pool of killable workers, timeouts, CPU and memory
  limits), :class:`Verdict`, the defaults, and :func:`grade` / :func:`grade_many` over one shared
  Grader.
- ``files``: :func:`grade_file`, grading a JSONL file (``selfdistill grade``).
"""

# `__all__` is the public API as before the split; `last_boxed` (used by the benchmark loaders) and
# the defaults stay importable from here too, hence the explicit `X as X` re-exports.
from selfdistill.grading.extract import extract_answer, normalize_answer
from selfdistill.grading.extract import last_boxed as last_boxed
from selfdistill.grading.files import grade_file
from selfdistill.grading.pool import DEFAULT_MAX_ANSWER_CHARS as DEFAULT_MAX_ANSWER_CHARS
from selfdistill.grading.pool import DEFAULT_MEMORY_LIMIT_MB as DEFAULT_MEMORY_LIMIT_MB
from selfdistill.grading.pool import DEFAULT_TIMEOUT as DEFAULT_TIMEOUT
from selfdistill.grading.pool import Grader, Verdict, grade, grade_many

__all__ = [
    "Grader",
    "Verdict",
    "extract_answer",
    "grade",
    "grade_file",
    "grade_many",
    "normalize_answer",
]
