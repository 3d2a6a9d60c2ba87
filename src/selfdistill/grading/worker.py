"""The grading worker: a plain ``python`` subprocess that runs math-verify on one pair at a time.

Protocol (JSON lines): the worker writes ``{"ready": true}`` once math-verify is imported, then
answers each request ``{"id", "gold", "answer", "cpu_seconds"}`` on stdin with ``{"id", "status"}``
on stdout, where status is ``verified``, ``mismatch``, ``unparsed``, ``gold_unparsed`` or
``error:<Exception>``. End of input ends it. The parent side is :mod:`selfdistill.grading.pool`.

A worker is started by :func:`start_command`: the interpreter loads this file by path (under the
name ``_selfdistill_grading_worker``), so it never imports the caller's ``__main__`` (as
``multiprocessing``'s spawn and forkserver starts do) nor the rest of the package, and start-up
costs one math-verify import, about half a second.

This module must only import the standard library at top level (math-verify is imported inside
the worker, torch and the package never): the worker loads it stand-alone.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

MEMORY_LIMIT_ENV = "SELFDISTILL_GRADER_MEMORY_MB"
"""Environment variable carrying the worker's address-space limit in MiB (0: none)."""


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
    limit_mb = int(os.environ.get(MEMORY_LIMIT_ENV, "0"))
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


def start_command() -> list[str]:
    """The command line that starts one worker with this interpreter (the parent sets
    :data:`MEMORY_LIMIT_ENV` in its environment)."""
    return [sys.executable, "-c", _WORKER_BOOT, os.path.abspath(__file__)]
