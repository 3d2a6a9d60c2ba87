"""selfdistill.grading.pool: equivalence grading, the time bound of the worker pool, threads and forks.

The figure tests at the bottom grade the real MATH-500 and GSM8K reference solutions."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from selfdistill.grading import Grader, grade, grade_many
from tests.grading.helpers import BOUNDED, SLACK, TOWER

NESTED_FRACS = "\\boxed{" + "\\frac{1}{" * 50 + "2" + "}" * 50 + "}"


@pytest.fixture(scope="module")
def grader() -> Grader:
    with Grader(workers=2, timeout=2.0) as g:
        yield g


@pytest.mark.parametrize(
    ("completion", "gold", "score"),
    [
        (r"so \boxed{\frac12}", "0.5", 1.0),
        (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
        (r"\boxed{\dfrac{2}{4}}", r"\frac{1}{2}", 1.0),
        (r"\boxed{x=5}", "5", 1.0),
        (r"\boxed{5}", "x=5", 1.0),
        (r"\boxed{2125}", "2,125", 1.0),
        (r"\boxed{90^\circ}", "90", 1.0),
        (r"\boxed{5\text{ cm}}", "5", 1.0),
        (r"\boxed{[1,2)}", r"[1, 2)", 1.0),
        (r"\boxed{\frac{\sqrt{3}}{3}}", r"\frac{1}{\sqrt{3}}", 1.0),
        (r"\boxed{(1,2)}", "[1,2]", 0.0),
        (r"\boxed{0.51}", r"\frac12", 0.0),
        (r"\boxed{3}", "4", 0.0),
        (r"\boxed{100!}", "5", 0.0),
        ("I don't know", "4", 0.0),
        ("#### 1,234", "1234", 1.0),
    ],
)
def test_grade_equivalence(grader: Grader, completion: str, gold: str, score: float) -> None:
    assert grader.grade(completion, gold) == score


def test_grade_detailed_statuses(grader: Grader) -> None:
    verdicts = grader.grade_detailed(
        [r"\boxed{7}", r"\boxed{0.5}", r"\boxed{0.6}", "nothing", "\\boxed{" + "1" * 5000 + "}"],
        ["7", r"\frac12", r"\frac12", "3", "1"],
    )
    assert [v.status for v in verdicts] == ["exact", "verified", "mismatch", "no_answer", "too_long"]
    assert [v.score for v in verdicts] == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert verdicts[0].answer == "7" and verdicts[3].answer is None


def test_fast_path_needs_no_worker() -> None:
    with Grader(workers=1) as g:
        assert g.grade_many([r"\boxed{\dfrac{1}{2}}", "#### 18"], [r"\frac{1}{2}", "18"]) == [1.0, 1.0]
        assert g.stats["worker_starts"] == 0


def test_gold_may_be_a_number_or_wrapped_in_dollars(grader: Grader) -> None:
    assert grader.grade_many([r"\boxed{18}", r"\boxed{0.5}"], [18, r"$\frac{1}{2}$"]) == [1.0, 1.0]


@pytest.mark.parametrize(
    "completion",
    [TOWER, r"\boxed{9^{9^{9^{9}}}}", NESTED_FRACS, "\\boxed{" + "1" * 1_000_000 + "}", "y" * 1_000_000],
    ids=["tower", "tower9", "nested-fracs", "1MB-box", "1MB-text"],
)
def test_pathological_answers_are_bounded(grader: Grader, completion: str) -> None:
    assert grader.grade(r"\boxed{1}", "1") == 1.0  # a worker is up (an earlier case may have had one replaced)
    start = time.perf_counter()
    assert grader.grade(completion, "5") == 0.0
    assert time.perf_counter() - start < grader.timeout + SLACK


def test_timeout_kills_the_worker_and_the_pool_recovers() -> None:
    # Without the answer-length filter and the fast path, only the process bound stands between
    # sympy and an hour of big-integer arithmetic.
    with Grader(workers=2, timeout=1.5, max_answer_chars=10**7, memory_limit_mb=None, fast_path=False) as g:
        # The two replacement workers start inside the timed call: its length is not a figure to hold to the
        # second on a loaded machine; the statuses and the timeout count are the behaviour under test.
        start = time.perf_counter()
        verdicts = g.grade_detailed([TOWER, NESTED_FRACS, r"\boxed{0.5}", r"\boxed{3}"], ["5", "5", "1/2", "3"])
        elapsed = time.perf_counter() - start
        assert [v.status for v in verdicts] == ["timeout", "timeout", "verified", "verified"]
        assert [v.score for v in verdicts] == [0.0, 0.0, 1.0, 1.0]
        assert g.stats["timeouts"] == 2
        assert g.stats["worker_starts"] == 4
        assert elapsed < BOUNDED
        # The replacements work, and a new call is not answered with stale results.
        assert g.grade_many([r"\boxed{2}", r"\boxed{1/3}"], ["2", r"\frac{1}{3}"]) == [1.0, 1.0]


def test_crashed_worker_scores_zero_and_is_replaced() -> None:
    with Grader(workers=1, timeout=60.0) as g:
        assert g.grade(r"\boxed{0.5}", "1/2") == 1.0  # the worker is up
        result: list = []
        thread = threading.Thread(target=lambda: result.extend(g.grade_detailed([TOWER], ["5"])))
        thread.start()
        deadline = time.monotonic() + 30
        while g._workers[0].task is None and time.monotonic() < deadline:
            time.sleep(0.01)
        g._workers[0].proc.kill()
        thread.join(timeout=30)
        assert [v.status for v in result] == ["crashed"]
        assert g.stats["crashes"] == 1
        assert g.grade(r"\boxed{0.25}", "1/4") == 1.0


def test_works_off_the_main_thread_with_a_bound() -> None:
    # math-verify's own timeouts would raise "signal only works in main thread" here.
    results: list = []
    errors: list = []

    def work() -> None:
        try:
            with Grader(workers=2, timeout=1.5) as g:
                g.grade_many([r"\boxed{0.5}", r"\boxed{2}"], ["1/2", "2"])  # both workers up before the clock starts
                start = time.perf_counter()
                results.append(g.grade_detailed([r"\boxed{\frac{2}{4}}", TOWER], ["0.5", "5"]))
                results.append(time.perf_counter() - start)
            results.append(grade(r"\boxed{\sqrt{4}}", "2", timeout=5.0))
        except BaseException as exc:  # reported on the main thread below
            errors.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=60)
    assert not errors, errors
    assert [(v.status, v.score) for v in results[0]] == [("verified", 1.0), ("timeout", 0.0)]
    assert results[1] < 1.5 + SLACK  # both workers were warm: the deadline, a kill and a pipe read
    assert results[2] == 1.0


def test_one_grader_shared_by_threads(grader: Grader) -> None:
    outputs: dict[int, list[float]] = {}

    def work(k: int) -> None:
        outputs[k] = grader.grade_many([rf"\boxed{{{k}/2}}", rf"\boxed{{{k}}}"], [str(k / 2), str(k + 1)])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert outputs == {k: [1.0, 0.0] for k in range(4)}


def test_close_stops_workers_and_forbids_use() -> None:
    g = Grader(workers=2)
    assert g.grade(r"\boxed{0.5}", "1/2") == 1.0
    procs = [w.proc for w in g._workers]
    assert len(procs) == 2 and all(p.poll() is None for p in procs)
    g.close()
    assert all(p.poll() is not None for p in procs)
    g.close()  # twice is fine
    with pytest.raises(RuntimeError, match="closed"):
        g.grade(r"\boxed{0.5}", "1/3")


def test_argument_validation(grader: Grader) -> None:
    with pytest.raises(ValueError, match="completions"):
        grader.grade_many(["a", "b"], ["1"])
    with pytest.raises(ValueError, match="timeout"):
        grader.grade("a", "1", timeout=0)
    with pytest.raises(ValueError, match="workers"):
        Grader(workers=0)
    with pytest.raises(TypeError, match="completion 0"):
        grader.grade_many([None], ["1"])  # type: ignore[list-item]


def test_module_level_functions() -> None:
    assert grade(r"\boxed{\frac{6}{8}}", "0.75") == 1.0
    assert grade_many([r"\boxed{1}", r"\boxed{2}", "none"], ["1", "3", "1"]) == [1.0, 0.0, 0.0]
    assert grade_many([], []) == []


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _own_and_shifted(solutions: list[str], golds: list[str]) -> tuple[float, float]:
    shifted = golds[1:] + golds[:1]
    scores = grade_many(solutions + solutions, golds + shifted)
    n = len(solutions)
    return sum(scores[:n]) / n, sum(scores[n:]) / n


def test_math500_reference_solutions(data_root: Path) -> None:
    rows = _read_jsonl(data_root / "math500" / "test.jsonl")
    assert len(rows) == 500
    own, other = _own_and_shifted([r["solution"] for r in rows], [r["answer"] for r in rows])
    assert own >= 0.97
    assert other <= 0.03


def test_gsm8k_reference_solutions(data_root: Path) -> None:
    rows = _read_jsonl(data_root / "gsm8k" / "test.jsonl")
    assert len(rows) == 1319
    golds = [r["answer"].rsplit("####", 1)[1].strip() for r in rows]  # commas kept, e.g. "2,125"
    own, other = _own_and_shifted([r["answer"] for r in rows], golds)
    assert own >= 0.97
    assert other <= 0.03


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_neither_uses_nor_stops_the_parents_pool() -> None:
    with Grader(workers=1) as g:
        assert g.grade(r"\boxed{0.5}", "1/2") == 1.0
        pid = os.fork()
        if pid == 0:  # the child reports through its exit code only
            code = 0
            try:
                try:
                    g.grade(r"\boxed{0.5}", "1/3")
                    code = 1
                except RuntimeError:
                    pass
                g.close()  # must leave the parent's workers alone
                if grade(r"\boxed{0.5}", "1/2") != 1.0:  # the module-level pool is rebuilt here
                    code = 2
            except BaseException:
                code = 3
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert g._workers[0].proc.poll() is None
        assert g.grade(r"\boxed{0.25}", "1/4") == 1.0
