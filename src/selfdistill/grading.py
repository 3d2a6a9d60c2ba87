"""Answer extraction and equivalence checking for math completions, with hard time bounds.

How a completion is graded against a gold answer:

1. :func:`extract_answer` pulls the final answer out of the completion: the last complete
   ``\\boxed{...}`` / ``\\fbox{...}`` (braces matched by a scanner, so nesting is fine), else
   "The (final) answer is X", else GSM8K's ``#### X``.
2. Cheap checks in the calling process: no answer gives 0; an answer longer than
   ``max_answer_chars`` gives 0; an answer equal to the gold after :func:`normalize_answer` gives 1
   (no math-verify needed).
3. Everything else goes to a worker process that runs math-verify: the gold is parsed first (as
   ``\\boxed{gold}``), then the answer, then ``verify(gold, answer)``. math-verify's own timeouts are
   switched off (they use ``signal.alarm``, which only works on the main thread of the main
   interpreter); instead the parent gives every task a deadline and kills the worker that misses it.
   A killed task scores 0 and a fresh worker takes the dead one's place. Each worker also runs
   under a CPU-time limit a little above the timeout (set by the kernel, so it holds even if the
   parent dies mid-task) and an address-space limit (``memory_limit_mb``).

Workers are plain ``python`` subprocesses speaking JSON lines over stdin/stdout. They load this file
by path, so they never import the caller's ``__main__`` (as ``multiprocessing``'s spawn and
forkserver starts do) nor the rest of the package: start-up costs one math-verify import, about
half a second. The calling side installs no signal handler, so grading works from any thread.

This module must only import the standard library at top level (math-verify is imported inside the
workers): the workers load it stand-alone.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import multiprocessing.connection
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

__all__ = [
    "Grader",
    "Verdict",
    "extract_answer",
    "grade",
    "grade_file",
    "grade_many",
    "normalize_answer",
]

DEFAULT_TIMEOUT = 5.0
"""Seconds one completion may spend in math-verify before it is scored 0."""

DEFAULT_MAX_ANSWER_CHARS = 1000
"""Extracted answers longer than this score 0 without being parsed (the longest MATH-500 answer has
53 characters)."""

DEFAULT_MEMORY_LIMIT_MB = 4096
"""Address-space limit of each worker, so that an answer like ``10^{10^{10}}`` fails with a
MemoryError inside the worker instead of eating the machine before its deadline."""

_WORKER_START_TIMEOUT = 120.0  # seconds a new worker may take to import math-verify
_CPU_MARGIN = 2.0  # CPU seconds a task may use beyond its timeout before the kernel ends its worker

# --------------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------------

_BOX_COMMANDS = ("\\boxed", "\\fbox")

_FINAL_ANSWER_RE = re.compile(r"the\s+(?:final\s+)?answer\s+is\s*:?[ \t]*", re.IGNORECASE)
_GSM8K_RE = re.compile(r"####[ \t]*")


def _match_braces(text: str, open_pos: int, limit: int | None = None) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_pos``, or None when it is not closed before
    ``limit`` (default: the end of ``text``).

    A backslash escapes the next character, so ``\\{`` and ``\\}`` do not count.
    """
    depth = 0
    i = open_pos
    n = len(text) if limit is None else limit
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _box_content(text: str, cmd_pos: int, cmd: str, limit: int) -> tuple[str | None, bool]:
    """The argument of the box command at ``cmd_pos``, looking no further than ``limit``.

    Returns ``(content, unclosed)``: content is None when this is no usable box (a longer command
    such as ``\\boxedfoo``, nothing after it, or a ``{`` not closed before ``limit``, in which case
    ``unclosed`` is True).
    """
    i = cmd_pos + len(cmd)
    if i < limit and text[i].isalpha():
        return None, False
    while i < limit and text[i] in " \t":
        i += 1
    if i >= limit:
        return None, False
    if text[i] == "{":
        close = _match_braces(text, i, limit)
        if close is None:
            return None, True
        return text[i + 1 : close], False
    # Brace-less form ("\\boxed 5"): the argument runs to the next whitespace or "$".
    j = i
    while j < limit and not text[j].isspace() and text[j] != "$":
        j += 1
    return (text[i:j] or None), False


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed``/``\\fbox`` in ``text``.

    A box whose ``{`` is never closed (a truncated one) is skipped. No earlier box can close after
    such a brace (it keeps every enclosing group open), so earlier boxes are only scanned up to it,
    which keeps the search linear in the length of ``text``.
    """
    scan_limit = len(text)
    # The last occurrence of each command not yet rejected; only the consumed one is searched again,
    # so every character is passed over a bounded number of times.
    candidates = {cmd: text.rfind(cmd) for cmd in _BOX_COMMANDS}
    while True:
        cmd = max(candidates, key=candidates.__getitem__)
        pos = candidates[cmd]
        if pos < 0:
            return None
        content, unclosed = _box_content(text, pos, cmd, scan_limit)
        if content is not None:
            return content
        if unclosed:
            scan_limit = pos
        candidates[cmd] = text.rfind(cmd, 0, pos)


def _clean_tail_answer(raw: str) -> str:
    """Tidy an answer written inline after a phrase: cut at the end of the sentence, drop markdown
    emphasis, surrounding ``$`` and the final period."""
    ans = raw.strip()
    sentence_end = re.search(r"\.(?:\s|$)", ans)
    if sentence_end:
        ans = ans[: sentence_end.start()]
    ans = ans.strip().strip("*").strip()
    ans = ans.strip("$").strip()
    return ans.rstrip(".").strip()


def _last_match(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    last = None
    for last in pattern.finditer(text):  # noqa: B007 (only the last one is wanted)
        pass
    return last


def extract_answer(text: str, *, fallback: bool = True) -> str | None:
    """The final answer written in ``text``, or None if there is none.

    The content of the last complete ``\\boxed{...}`` or ``\\fbox{...}`` wins (also ``\\boxed 5``
    without braces; braces are matched by scanning, escaped ``\\{``/``\\}`` ignored; an unclosed
    box such as one cut off by truncation is skipped). With ``fallback=True`` and no box, the last
    "The answer is X" / "The final answer is X" (case-insensitive, rest of the sentence, trailing
    period and ``$`` stripped) is used, then the last GSM8K-style ``#### X`` (commas removed).
    An empty answer counts as none.
    """
    boxed = last_boxed(text)
    if boxed is not None:
        boxed = boxed.strip()
        return boxed or None
    if not fallback:
        return None
    phrase = _last_match(_FINAL_ANSWER_RE, text)
    if phrase is not None:
        line_end = text.find("\n", phrase.end())
        ans = _clean_tail_answer(text[phrase.end() : line_end if line_end >= 0 else len(text)])
        if ans:
            return ans
    hashes = _last_match(_GSM8K_RE, text)
    if hashes is not None:
        line_end = text.find("\n", hashes.end())
        ans = text[hashes.end() : line_end if line_end >= 0 else len(text)]
        ans = ans.replace(",", "").strip().strip("$").strip().rstrip(".").strip()
        if ans:
            return ans
    return None


# --------------------------------------------------------------------------------------------------
# Normalization (the fast path)
# --------------------------------------------------------------------------------------------------

_WRAPPER_COMMANDS = ("\\text", "\\textbf", "\\mathrm", "\\mathbf", "\\mbox")
_SPACING_RE = re.compile(r"\\[,;:! ]|\\q?quad(?![a-zA-Z])")
_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right)(?![a-zA-Z])")
_DEGREE_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?")


def _unwrap_commands(text: str, commands: Sequence[str]) -> str:
    """Replace ``\\cmd{X}`` by ``X`` for the given commands (braces matched, nesting allowed)."""
    out: list[str] = []
    i = 0
    n = len(text)
    while i < n:
        if text[i] == "\\":
            for cmd in commands:
                end = i + len(cmd)
                if text.startswith(cmd, i) and end < n and text[end] == "{":
                    close = _match_braces(text, end)
                    if close is not None:
                        out.append(_unwrap_commands(text[end + 1 : close], commands))
                        i = close + 1
                        break
            else:
                out.append(text[i : i + 2])
                i += 2
            continue
        out.append(text[i])
        i += 1
    return "".join(out)


def normalize_answer(answer: str) -> str:
    """A canonical string form of an answer, for exact comparison and for majority votes.

    Only rewrites that never change the meaning: drop ``$``, ``\\left``/``\\right``, LaTeX spacing
    commands and all whitespace; ``\\dfrac``/``\\tfrac`` become ``\\frac``; ``\\text{X}`` (and
    ``\\textbf``, ``\\mathrm``, ``\\mathbf``, ``\\mbox``) become ``X``; degree marks ``^\\circ`` and a
    final period are dropped. Different strings may still be equal answers (``1/2`` and
    ``\\frac{1}{2}``); that is math-verify's job.
    """
    s = answer.replace("$", "")
    s = _SPACING_RE.sub("", s)
    s = _LEFT_RIGHT_RE.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _DEGREE_RE.sub("", s)
    s = _unwrap_commands(s, _WRAPPER_COMMANDS)
    s = "".join(s.split())
    return s.rstrip(".")


# --------------------------------------------------------------------------------------------------
# The worker side (runs in the subprocesses)
# --------------------------------------------------------------------------------------------------


def _worker_verify(gold: str, answer: str) -> str:
    """math-verify on one (gold, answer) pair inside a worker; returns the verdict status."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    configs = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    gold_parsed = parse(f"\\boxed{{{gold}}}", extraction_config=configs, parsing_timeout=None)
    if not gold_parsed:
        return "gold_unparsed"
    answer_parsed = parse(f"\\boxed{{{answer}}}", extraction_config=configs, parsing_timeout=None)
    if not answer_parsed:
        return "unparsed"
    return "verified" if verify(gold_parsed, answer_parsed, timeout_seconds=None) else "mismatch"


def _set_limit(name: str, soft: int) -> None:
    """Lower (or raise, up to the hard limit) one resource limit of this process, if supported."""
    try:
        import resource

        which = getattr(resource, name)
        hard = resource.getrlimit(which)[1]
        if hard != resource.RLIM_INFINITY:
            soft = min(soft, hard)
        resource.setrlimit(which, (soft, hard))
    except (ImportError, AttributeError, ValueError, OSError):  # not POSIX, or not allowed
        pass


def _worker_main() -> None:
    """Serve grading requests: one JSON object per line in, one per line out."""
    import logging

    # The protocol owns the real stdout; anything printed by libraries goes to stderr instead.
    proto = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    limit_mb = int(os.environ.get("SELFDISTILL_GRADER_MEMORY_MB", "0"))
    if limit_mb > 0:
        _set_limit("RLIMIT_AS", limit_mb * 1024 * 1024)
    _set_limit("RLIMIT_CORE", 0)  # a worker ended by SIGXCPU (below) leaves no core file
    import math_verify  # noqa: F401  (import before announcing readiness)

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout disabled" warning
    proto.write(b'{"ready": true}\n')
    for line in sys.stdin.buffer:
        request = json.loads(line)
        # A second bound that needs no parent: the kernel ends this process once the task has used
        # `cpu_seconds` of CPU. The parent's wall-clock deadline comes first (a single-threaded task
        # cannot use more CPU than wall time); this one catches a worker whose parent was killed
        # while the task ran, and which would otherwise spin as an orphan.
        _set_limit("RLIMIT_CPU", math.ceil(time.process_time() + request["cpu_seconds"]))
        try:
            status = _worker_verify(request["gold"], request["answer"])
        except MemoryError:
            status = "error:MemoryError"
        except Exception as exc:  # a sympy failure on one answer must not end the worker
            status = f"error:{type(exc).__name__}"
        # Replies are far below PIPE_BUF bytes, so each arrives in one piece.
        proto.write(json.dumps({"id": request["id"], "status": status}).encode() + b"\n")


_WORKER_BOOT = (
    "import importlib.util, sys\n"
    "spec = importlib.util.spec_from_file_location('_selfdistill_grading_worker', sys.argv[1])\n"
    "module = importlib.util.module_from_spec(spec)\n"
    "sys.modules[spec.name] = module\n"
    "spec.loader.exec_module(module)\n"
    "module._worker_main()\n"
)


# --------------------------------------------------------------------------------------------------
# The parent side: a pool of killable workers
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """The outcome of grading one completion.

    ``status`` is one of: ``exact`` (normalized strings equal), ``verified`` / ``mismatch``
    (math-verify's answer), ``no_answer``, ``too_long`` (answer over ``max_answer_chars``),
    ``unparsed`` / ``gold_unparsed`` (math-verify could not read the answer / the gold),
    ``timeout`` (worker killed at the deadline), ``crashed`` (worker died) or ``error:<Exception>``.
    """

    score: float
    status: str
    answer: str | None


class _Worker:
    """One grading subprocess and its read buffer."""

    def __init__(self, memory_limit_mb: int | None) -> None:
        env = dict(os.environ)
        env["SELFDISTILL_GRADER_MEMORY_MB"] = str(memory_limit_mb or 0)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_BOOT, os.path.abspath(__file__)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            start_new_session=True,  # a Ctrl-C in the terminal is the parent's to handle
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin: IO[bytes] = self.proc.stdin
        self.stdout: IO[bytes] = self.proc.stdout
        self.buffer = b""
        self.ready = False
        self.started = time.monotonic()
        self.task: int | None = None  # index of the item being graded
        self.deadline = math.inf

    def fileno(self) -> int:
        return self.stdout.fileno()

    def send(self, index: int, gold: str, answer: str, timeout: float) -> None:
        request = {"id": index, "gold": gold, "answer": answer, "cpu_seconds": timeout + _CPU_MARGIN}
        self.stdin.write(json.dumps(request).encode() + b"\n")
        self.stdin.flush()
        self.task = index
        self.deadline = time.monotonic() + timeout

    def read_messages(self) -> list[dict[str, Any]] | None:
        """Messages that have arrived (call when readable), or None if the worker has exited."""
        chunk = os.read(self.fileno(), 65536)
        if not chunk:
            return None
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.stdin, self.stdout):
            with contextlib.suppress(OSError):
                pipe.close()


def _shutdown_workers(workers: list[_Worker], owner_pid: int | None = None) -> None:
    """Ask every worker to exit (end of input), then kill the ones that do not within a second.

    Does nothing in a process other than ``owner_pid``: a forked child holds copies of the pool's
    handles, and must not stop the workers that belong to its parent.
    """
    if owner_pid is not None and os.getpid() != owner_pid:
        return
    for worker in workers:
        with contextlib.suppress(OSError):
            worker.stdin.close()
    give_up = time.monotonic() + 1.0
    for worker in workers:
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.proc.wait(timeout=max(0.0, give_up - time.monotonic()))
        worker.kill()
    workers.clear()


def _default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


class Grader:
    """A reusable pool of grading workers; use as a context manager or call :meth:`close`.

    Args:
        workers: number of worker processes (default: CPU count, at most 4). They start on the
            first completion that needs math-verify and are reused across calls.
        timeout: default seconds per completion inside math-verify; past it the worker is killed
            and the completion scores 0.
        max_answer_chars: extracted answers longer than this score 0 without parsing.
        memory_limit_mb: address-space limit per worker (None: no limit).
        fast_path: score 1 without math-verify when the normalized answer and gold strings are
            equal. Turn off only to measure or test the math-verify path.

    One Grader may be shared by several threads; calls are served one at a time. A Grader must not
    be used in a process forked from the one that created it (make a new one there).
    """

    def __init__(
        self,
        *,
        workers: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS,
        memory_limit_mb: int | None = DEFAULT_MEMORY_LIMIT_MB,
        fast_path: bool = True,
    ) -> None:
        self.num_workers = _default_workers() if workers is None else int(workers)
        if self.num_workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        _check_timeout(timeout)
        if max_answer_chars < 1:
            raise ValueError(f"max_answer_chars must be >= 1, got {max_answer_chars}")
        self.timeout = float(timeout)
        self.max_answer_chars = int(max_answer_chars)
        self.memory_limit_mb = memory_limit_mb
        self.fast_path = fast_path
        self.stats = {"timeouts": 0, "crashes": 0, "worker_starts": 0}
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._closed = False
        # Runs at close(), at garbage collection, or at interpreter exit, whichever comes first.
        self._finalizer = weakref.finalize(self, _shutdown_workers, self._workers, self._pid)

    # ---- public API ------------------------------------------------------------------------------

    def grade(self, completion: str, gold: str, *, timeout: float | None = None) -> float:
        """1.0 if the completion's final answer equals ``gold``, else 0.0."""
        return self.grade_detailed([completion], [gold], timeout=timeout)[0].score

    def grade_many(
        self, completions: Sequence[str], golds: Sequence[str], *, timeout: float | None = None
    ) -> list[float]:
        """Scores (1.0 / 0.0) of ``completions[i]`` against ``golds[i]``, graded in parallel."""
        return [v.score for v in self.grade_detailed(completions, golds, timeout=timeout)]

    def grade_detailed(
        self, completions: Sequence[str], golds: Sequence[str], *, timeout: float | None = None
    ) -> list[Verdict]:
        """Like :meth:`grade_many` but returns a :class:`Verdict` (score, status, answer) per item."""
        if len(completions) != len(golds):
            raise ValueError(f"{len(completions)} completions but {len(golds)} golds")
        timeout = self.timeout if timeout is None else timeout
        _check_timeout(timeout)
        verdicts: list[Verdict | None] = [None] * len(completions)
        answers: list[str | None] = [None] * len(completions)
        gold_texts: list[str] = [""] * len(completions)
        queue: deque[int] = deque()
        for i, (completion, gold) in enumerate(zip(completions, golds, strict=True)):
            if not isinstance(completion, str):
                raise TypeError(f"completion {i} is {type(completion).__name__}, expected str")
            gold_text = _gold_text(gold, i)
            answer = extract_answer(completion)
            answers[i], gold_texts[i] = answer, gold_text
            if answer is None:
                verdicts[i] = Verdict(0.0, "no_answer", None)
            elif len(answer) > self.max_answer_chars:
                verdicts[i] = Verdict(0.0, "too_long", answer[: self.max_answer_chars])
            elif self.fast_path and normalize_answer(answer) == normalize_answer(gold_text):
                verdicts[i] = Verdict(1.0, "exact", answer)
            elif not gold_text:
                verdicts[i] = Verdict(0.0, "gold_unparsed", answer)
            else:
                queue.append(i)
        if queue:
            with self._lock:
                self._check_usable()
                try:
                    for i, status in self._run(queue, gold_texts, answers, timeout):
                        verdicts[i] = Verdict(1.0 if status == "verified" else 0.0, status, answers[i])
                except BaseException:
                    # Interrupted (Ctrl-C, a worker that cannot start): busy workers would answer
                    # a later call with stale results, so drop the whole pool; the next call
                    # starts a fresh one.
                    _shutdown_workers(self._workers)
                    raise
        assert all(v is not None for v in verdicts)
        return verdicts  # type: ignore[return-value]

    def close(self) -> None:
        """Stop the workers. Safe to call twice; the Grader cannot be used afterwards."""
        with self._lock:
            self._closed = True
            self._finalizer()

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- the pool --------------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError("this Grader is closed")
        if os.getpid() != self._pid:
            raise RuntimeError("this Grader was created in another process (fork); create a new one")

    def _start_worker(self) -> _Worker:
        worker = _Worker(self.memory_limit_mb)
        self.stats["worker_starts"] += 1
        return worker

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers[self._workers.index(worker)] = self._start_worker()

    def _run(
        self, queue: deque[int], golds: list[str], answers: list[str | None], timeout: float
    ) -> Iterator[tuple[int, str]]:
        """Feed the queued items to the workers; yields ``(index, status)`` as results arrive."""
        while len(self._workers) < self.num_workers:
            self._workers.append(self._start_worker())
        remaining = len(queue)
        while remaining:
            for worker in self._workers:
                if worker.ready and worker.task is None and queue:
                    i = queue.popleft()
                    answer = answers[i]
                    assert answer is not None
                    try:
                        worker.send(i, golds[i], answer, timeout)
                    except (BrokenPipeError, OSError):  # died while idle: retry on a new worker
                        queue.appendleft(i)
                        self._replace(worker)
            now = time.monotonic()
            deadlines = [w.deadline if w.ready else w.started + _WORKER_START_TIMEOUT for w in self._workers]
            wait_for = max(0.0, min(deadlines) - now)
            for worker in multiprocessing.connection.wait(self._workers, timeout=wait_for):
                assert isinstance(worker, _Worker)
                messages = worker.read_messages()
                if messages is None:  # the process exited
                    if not worker.ready:
                        code = worker.proc.wait()
                        raise RuntimeError(
                            f"a grading worker exited with code {code} while starting; is math-verify "
                            f"installed for {sys.executable}? (its stderr is above)"
                        )
                    if worker.task is not None:
                        self.stats["crashes"] += 1
                        yield worker.task, "crashed"
                        remaining -= 1
                    self._replace(worker)
                    continue
                for message in messages:
                    if message.get("ready"):
                        worker.ready = True
                    elif message["id"] == worker.task:
                        worker.task, worker.deadline = None, math.inf
                        yield message["id"], message["status"]
                        remaining -= 1
            now = time.monotonic()
            for worker in list(self._workers):
                if worker.task is not None and now >= worker.deadline:
                    self.stats["timeouts"] += 1
                    yield worker.task, "timeout"
                    remaining -= 1
                    self._replace(worker)
                elif not worker.ready and now >= worker.started + _WORKER_START_TIMEOUT:
                    raise RuntimeError(f"a grading worker did not start within {_WORKER_START_TIMEOUT:.0f} s")


def _check_timeout(timeout: float) -> None:
    if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")


def _gold_text(gold: object, index: int) -> str:
    """The gold answer as a string: numbers are converted, ``$...$`` around it is dropped, and a gold
    holding a ``\\boxed{...}`` (a whole reference solution) is replaced by the box's content."""
    if isinstance(gold, bool) or not isinstance(gold, (str, int, float)):
        raise TypeError(f"gold {index} is {type(gold).__name__}, expected str")
    text = str(gold)
    boxed = last_boxed(text) if ("\\boxed" in text or "\\fbox" in text) else None
    return (boxed if boxed is not None else text).strip().strip("$").strip()


# --------------------------------------------------------------------------------------------------
# Module-level convenience (one lazily created Grader)
# --------------------------------------------------------------------------------------------------

_default: Grader | None = None
_default_lock = threading.Lock()


def _default_grader(workers: int | None) -> Grader:
    """The shared Grader, (re)created when missing, after a fork, or for another worker count.

    A replaced Grader is not closed here (another thread may be using it); its workers stop when
    the last reference to it goes.
    """
    global _default
    with _default_lock:
        wanted = _default_workers() if workers is None else workers
        stale = _default is not None and (_default._pid != os.getpid() or _default._closed)
        if _default is None or stale or _default.num_workers != wanted:
            _default = Grader(workers=wanted)
        return _default


@atexit.register
def _close_default_grader() -> None:
    with _default_lock:
        if _default is not None and _default._pid == os.getpid():
            _default.close()


def grade(completion: str, gold: str, *, timeout: float = DEFAULT_TIMEOUT) -> float:
    """1.0 if the final answer of ``completion`` is equivalent to ``gold`` (math-verify), else 0.0.

    Bounded in time from any thread: math-verify runs in a worker process that is killed after
    ``timeout`` seconds (the completion then scores 0).
    """
    return _default_grader(None).grade(completion, gold, timeout=timeout)


def grade_many(
    completions: Sequence[str],
    golds: Sequence[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    workers: int | None = None,
) -> list[float]:
    """Scores of ``completions[i]`` against ``golds[i]`` over the shared worker pool.

    ``timeout`` bounds each completion; ``workers`` sets the pool size (default: CPU count, at most
    4). A trainer that grades every step should own a :class:`Grader` instead.
    """
    return _default_grader(workers).grade_many(completions, golds, timeout=timeout)


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def grade_file(
    path: str | os.PathLike[str],
    *,
    completion_field: str,
    gold_field: str,
    out_path: str | os.PathLike[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    workers: int | None = None,
) -> dict[str, float | int | str]:
    """Grade a JSONL file of completions and write one verdict per row.

    Each line of ``path`` is a JSON object holding ``completion_field`` and ``gold_field`` (blank
    lines are skipped). Verdicts go to ``out_path`` (default ``<stem>.graded.jsonl`` beside the
    input) as ``{"line", "correct", "status", "extracted", "gold"}``, written to a temporary file
    and renamed, so a crash never leaves a partial file. Returns ``{"n", "correct", "accuracy",
    "out_path"}``. Raises ``ValueError`` naming the file and line for bad JSON or a missing field.
    """
    src = Path(path)
    out = Path(out_path) if out_path is not None else src.with_name(f"{src.stem}.graded.jsonl")
    line_numbers: list[int] = []
    completions: list[str] = []
    golds: list[str] = []
    with src.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{src}:{line_no}: invalid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise ValueError(f"{src}:{line_no}: expected a JSON object, got {type(row).__name__}")
            for field in (completion_field, gold_field):
                if field not in row:
                    raise ValueError(f"{src}:{line_no}: missing field {field!r} (fields present: {sorted(row)})")
            completion, gold = row[completion_field], row[gold_field]
            if not isinstance(completion, str):
                raise ValueError(f"{src}:{line_no}: field {completion_field!r} is not a string")
            if isinstance(gold, bool) or not isinstance(gold, (str, int, float)):
                raise ValueError(f"{src}:{line_no}: field {gold_field!r} is not a string or number")
            line_numbers.append(line_no)
            completions.append(completion)
            golds.append(str(gold))
    verdicts = _default_grader(workers).grade_detailed(completions, golds, timeout=timeout)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for line_no, gold, verdict in zip(line_numbers, golds, verdicts, strict=True):
                record = {
                    "line": line_no,
                    "correct": verdict.score,
                    "status": verdict.status,
                    "extracted": verdict.answer,
                    "gold": gold,
                }
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp_name, out)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    correct = int(sum(v.score for v in verdicts))
    n = len(verdicts)
    return {"n": n, "correct": correct, "accuracy": correct / n if n else 0.0, "out_path": str(out)}
