"""What every bench script shares: resident memory, timing, a worker in its own process, Markdown tables.

    from _harness import rss_mib, run_worker, serve_worker, markdown_table   # bench/ is the script's folder

A script that measures in a subprocess (so that the peak resident memory is the worker's own) gives its parser a
hidden `--worker` option and, when it is set, calls `serve_worker(its_function, args.worker)`; the parent calls
`run_worker(__file__, spec)` and gets the function's JSON result back, or {"error": "<one line>"}.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")
RESULT_PREFIX = "RESULT "  # the worker's result line on its stdout: RESULT <json>
WORKER_FLAG = "--worker"

# ----------------------------------------------------------------------------------------------
# memory


def rss_mib() -> float:
    """Resident memory of this process now (MiB)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss_mib() -> float:
    """The highest resident memory of this process so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


class MemoryTimeline:
    """Resident memory at each phase's entry and exit and the highest value in between, for the phases entered
    while `recording` is on; a background thread samples it every 2 ms."""

    def __init__(self) -> None:
        self.recording = False
        self.step_start: float | None = None  # resident memory when recording began (set by the caller)
        self.events: list[list] = []  # [name, MiB at entry, highest MiB, MiB at exit], in the order entered
        self._open: list[list] = []  # the events of the phases entered and not yet left
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            now = rss_mib()
            for event in list(self._open):
                event[2] = max(event[2], now)
            time.sleep(0.002)

    def start_recording(self) -> None:
        self.recording = True
        self.step_start = rss_mib()

    def enter(self, name: str) -> None:
        if self.recording:
            now = rss_mib()
            self._open.append([name, now, now, None])
            self.events.append(self._open[-1])

    def exit(self) -> None:
        if self._open:
            event = self._open.pop()
            event[3] = rss_mib()
            event[2] = max(event[2], event[3])


# ----------------------------------------------------------------------------------------------
# timing


def synchronize() -> None:
    """Wait for the GPU (when there is one), so that wall time covers the work queued on it."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_runs(run: Callable[[], T], repeats: int) -> tuple[float, list[float], T]:
    """Run `run` once untimed (a warm-up), then `repeats` times timed: (warm-up seconds, the timed seconds, what the
    last run returned). Report `statistics.median` of the timed seconds."""
    start = time.perf_counter()
    value = run()
    warmup = time.perf_counter() - start
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        value = run()
        seconds.append(time.perf_counter() - start)
    return warmup, seconds, value


class PhaseTimer:
    """Exclusive wall time per named phase: time spent in a nested phase counts only for the inner one; with a
    MemoryTimeline, the memory of each phase too."""

    def __init__(self, memory: MemoryTimeline | None = None) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self._stack: list[list] = []  # [name, start, seconds spent in nested phases]
        self.memory = memory

    def enter(self, name: str) -> None:
        synchronize()
        self._stack.append([name, time.perf_counter(), 0.0])
        if self.memory is not None:
            self.memory.enter(name)

    def exit(self) -> None:
        synchronize()
        name, start, nested = self._stack.pop()
        elapsed = time.perf_counter() - start
        self.totals[name] += elapsed - nested
        if self._stack:
            self._stack[-1][2] += elapsed
        if self.memory is not None:
            self.memory.exit()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.enter(name)
        try:
            yield
        finally:
            self.exit()

    def wrap(self, owner: object, attribute: str, phase: str | Callable[[], str]) -> None:
        """Replace `owner.attribute` (a function or method) by one timed as `phase` (a name, or a function
        returning the name at call time)."""
        original = getattr(owner, attribute)

        def timed(*args, **kwargs):
            with self.phase(phase() if callable(phase) else phase):
                return original(*args, **kwargs)

        setattr(owner, attribute, timed)

    def wrap_backward(self) -> None:
        """Time every `Tensor.backward` call as "backward" and gradient clipping as "grad clip" (for the rest of
        this process: call it in a worker only)."""
        import torch

        original = torch.Tensor.backward

        def backward(tensor, *args, **kwargs):
            with self.phase("backward"):
                return original(tensor, *args, **kwargs)

        torch.Tensor.backward = backward
        self.wrap(torch.nn.utils, "clip_grad_norm_", "grad clip")

    def snapshot(self) -> dict[str, float]:
        return dict(self.totals)


def per_step_phases(snapshots: list[dict[str, float]], step_seconds: list[float]) -> dict[str, float]:
    """Mean seconds per step of each phase over the timed steps, from cumulative snapshots taken at each
    timed step's start and end (pairs), plus "other" = step time - the phases."""
    sums: dict[str, float] = defaultdict(float)
    for begin, end in zip(snapshots[0::2], snapshots[1::2], strict=True):
        for name, total in end.items():
            sums[name] += total - begin.get(name, 0.0)
    n = len(step_seconds)
    phases = {name: value / n for name, value in sums.items() if value > 0}
    phases["other"] = max(0.0, statistics.fmean(step_seconds) - sum(phases.values()))
    return phases


# ----------------------------------------------------------------------------------------------
# a worker in its own process, JSON in and out


def trained_weights(trainer) -> dict:
    """A copy of each trained parameter of a `selfdistill.trainer.Trainer` (this process's shard under fsdp2), to
    compare with after training (`training_problems`)."""
    from selfdistill.parallel import local_shard

    return {n: local_shard(p.detach()).clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def training_problems(trainer, before: dict) -> list[str]:
    """What a few trainer steps got wrong, as lines: AdamW state not float32, trained parameters that did not move
    since `before` (`trained_weights`)."""
    import torch

    from selfdistill.parallel import local_shard

    problems = []
    state_dtypes = {str(s["exp_avg"].dtype) for s in trainer.optimizer.state.values()}
    if state_dtypes != {"torch.float32"}:
        problems.append(f"AdamW state in {state_dtypes}")
    still = [n for n, p in trainer.model.named_parameters()
             if n in before and torch.equal(local_shard(p.detach()), before[n])]
    if still:
        problems.append(f"{len(still)} parameters did not move ({still[0]} ...)")
    return problems


def error_line(error: BaseException, limit: int | None = None) -> str:
    """`<type>: <message>` on one line (whitespace runs folded), cut to `limit` characters."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"[:limit]


def serve_worker(run: Callable[[dict], dict], payload: str) -> None:
    """The worker side: `run(json.loads(payload))`, printed as the result line; an exception becomes
    {"error": its line} (traceback on stderr)."""
    try:
        result = run(json.loads(payload))
    except Exception as error:  # report why, in one line, to the parent
        traceback.print_exc()
        result = {"error": error_line(error)}
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_worker(script: str, spec: dict, *, timeout: float | None = None, env: dict[str, str] | None = None) -> dict:
    """The parent side: run `python script --worker <spec as JSON>` with `env` added to this environment; returns
    the worker's result, or {"error": why it produced none}."""
    command = [sys.executable, os.path.abspath(script), WORKER_FLAG, json.dumps(spec)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    stderr = proc.stderr.strip().splitlines()
    if proc.returncode < 0:
        return {"error": f"killed by signal {-proc.returncode} (out of memory?)"}
    return {"error": stderr[-1] if stderr else f"exit status {proc.returncode} and no result"}


# ----------------------------------------------------------------------------------------------
# tables


def fmt(value: float | None, digits: int = 2) -> str:
    """`value` with `digits` decimals, or "-" for None."""
    return "-" if value is None else f"{value:.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    """a / b as "1.23x", or "-" when either is missing or b is 0."""
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def markdown_table(columns: list[str], align: str, rows: list[list[str]]) -> list[str]:
    """A Markdown table's lines: `align` has one letter per column, "l" (left) or "r" (right)."""
    if len(align) != len(columns):
        raise ValueError(f"{len(columns)} columns but alignment {align!r}")
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    return ["| " + " | ".join(columns) + " |", rule, *("| " + " | ".join(map(str, row)) + " |" for row in rows)]
