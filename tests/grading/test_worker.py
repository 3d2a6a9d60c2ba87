"""selfdistill.grading.worker: the worker runs stand-alone and never outlives its parent."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.grading.helpers import SLACK, TOWER


def test_worker_module_loads_stand_alone() -> None:
    # Workers load grading/worker.py by path: its top level must import only the standard library,
    # never the package (whose __init__ may grow heavy imports) nor torch.
    from selfdistill.grading import worker

    assert worker.start_command()[-1] == os.path.abspath(worker.__file__)
    script = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('w', sys.argv[1])\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'selfdistill', 'torch', 'math_verify'}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, worker.__file__], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def _process_gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie waiting for its new parent to reap it counts)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_worker_busy_when_its_parent_dies_does_not_outlive_it() -> None:
    # The parent is killed while its worker grinds on the tower; the worker must not spin on as
    # an orphan (the kernel's CPU limit ends it a little after the timeout).
    script = (
        "import sys\n"
        "from selfdistill.grading import Grader\n"
        "g = Grader(workers=1, timeout=1.0, memory_limit_mb=None)\n"
        "g.grade(r'\\boxed{0.5}', '1/2')\n"
        "print(g._workers[0].proc.pid, flush=True)\n"
        f"g.grade({TOWER!r}, '5')\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        worker_pid = int(parent.stdout.readline())
        time.sleep(0.3)  # the tower is being worked on now
        assert not _process_gone(worker_pid)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 1.0 + 2.0 + SLACK + 2.0
    while not _process_gone(worker_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _process_gone(worker_pid)
