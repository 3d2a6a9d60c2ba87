"""selfdistill.progress: plain progress lines in logs, none on a terminal, the training status per step."""

from __future__ import annotations

import io
import time

from rich.console import Console

from selfdistill.progress import Progress, StepProgress


def test_progress_writes_plain_lines_when_not_a_terminal():
    log = io.StringIO()
    with Progress(console=Console(file=log, force_terminal=False), log_every=0.05) as bar:
        task = bar.add_task("[bold]warm start", total=10, status="")
        for step in range(1, 4):
            bar.update(task, completed=step, status=f"[red]loss {1 / step:.3f}[/red]")
        time.sleep(0.3)
    lines = [line for line in log.getvalue().splitlines() if line.startswith("[")]
    assert lines, log.getvalue()
    assert lines[-1].endswith("] warm start: 3/10 (30%) | loss 0.333")  # markup stripped


def test_progress_on_a_terminal_or_quiet_writes_no_plain_lines():
    for console in (Console(file=io.StringIO(), force_terminal=True), Console(file=io.StringIO(), quiet=True)):
        with Progress(console=console, log_every=0.05) as bar:
            bar.add_task("eval", total=4)
            time.sleep(0.2)
        assert "eval: 0/4" not in console.file.getvalue()


def test_step_progress_lines_carry_the_training_status(monkeypatch, capsys):
    monkeypatch.setenv("SELFDISTILL_PROGRESS_EVERY", "0.05")
    with StepProgress(3) as bar:  # pytest's captured stdout is not a terminal
        bar.update({"reward": 0.25, "entropy": 1.5, "response_length": 7, "seconds": 0.5})
        time.sleep(0.3)
    out = capsys.readouterr().out
    assert "train: 1/3 (33%) | reward 0.250 | H 1.500 | len 7 | 0.5s/step" in out
