"""The parent side of grading: a pool of killable worker processes, with time bounds.

A :class:`Grader` scores each completion in three steps. Cheap checks in the calling process: no
answer gives 0; an answer longer than ``max_answer_chars`` gives 0; an answer equal to the gold
after :func:`~selfdistill.grading.extract.normalize_answer` gives 1 (no math-verify needed).
Everything else goes to a worker process (:mod:`selfdistill.grading.worker`) that runs
math-verify. math-verify's own timeouts are switched off (they use ``signal.alarm``, which only
works on the main thread of the main interpreter); instead the parent gives every task a deadline
and kills the worker that misses it. A killed task scores 0 and a fresh worker takes the dead one's
place. Each worker also runs under a CPU-time limit a little above the timeout (set by the kernel,
so it holds even if the parent dies mid-task) and an address-space limit (``memory_limit_mb``).
The calling side installs no signal handler, so grading works from any thread.

:func:`grade` and :func:`grade_many` share one lazily created Grader.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import multiprocessing.connection
import os
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

from selfdistill.grading.extract import extract_answer, gold_answer, normalize_answer
from selfdistill.grading.worker import MEMORY_LIMIT_ENV, start_command

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
        env[MEMORY_LIMIT_ENV] = str(memory_limit_mb or 0)
        self.proc = subprocess.Popen(
            start_command(),
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
            gold_text = gold_answer(gold, i)
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


# --------------------------------------------------------------------------------------------------
# Module-level convenience (one lazily created Grader)
# --------------------------------------------------------------------------------------------------

_default: Grader | None = None
_default_lock = threading.Lock()


def default_grader(workers: int | None) -> Grader:
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
    return default_grader(None).grade(completion, gold, timeout=timeout)


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
    return default_grader(workers).grade_many(completions, golds, timeout=timeout)
