"""Progress for training, evaluation and the study: rich bars on a terminal, plain lines in a log.

rich draws its bars only on a terminal; with the output going to a file it shows them once, at the end,
so a log of a 15-minute run says nothing for 15 minutes. `Progress` is rich's, plus: when its console is
not a terminal, a thread writes one plain line per unfinished task every `log_every` seconds (default 30,
or $SELFDISTILL_PROGRESS_EVERY): `[12:30] warm start: 1200/5000 (24%), 3:05 elapsed | loss 0.412`.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import rich.progress
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

PROGRESS_EVERY_ENV = "SELFDISTILL_PROGRESS_EVERY"
DEFAULT_LOG_EVERY = 30.0


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class Progress(rich.progress.Progress):
    """rich.progress.Progress that also writes plain progress lines when its console is not a terminal."""

    def __init__(self, *columns: Any, log_every: float | None = None, **kwargs: Any) -> None:
        super().__init__(*columns, **kwargs)
        if log_every is None:
            log_every = float(os.environ.get(PROGRESS_EVERY_ENV, DEFAULT_LOG_EVERY))
        self.log_every = log_every
        self._stop_logging = threading.Event()
        self._log_thread: threading.Thread | None = None

    @property
    def logs_lines(self) -> bool:
        """Whether plain lines are written: enabled, not quiet, and the console is not a terminal."""
        return not self.disable and not self.console.quiet and not self.console.is_terminal and self.log_every > 0

    def log_lines(self) -> list[str]:
        """One line per unfinished task (what the thread writes)."""
        lines = []
        with self._lock:
            tasks = [task for task in self._tasks.values() if task.visible and not task.finished]
            for task in tasks:
                position = f"{task.completed:.0f}/{task.total:.0f}" if task.total else f"{task.completed:.0f}"
                if task.total:
                    position += f" ({100 * task.completed / task.total:.0f}%)"
                status = task.fields.get("status")
                status = Text.from_markup(str(status)).plain if status else ""
                elapsed = task.elapsed or 0.0
                lines.append(f"[{_clock(elapsed)}] {Text.from_markup(task.description).plain.strip()}: {position}"
                             + (f" | {status}" if status else ""))
        return lines

    def _write_lines(self) -> None:
        for line in self.log_lines():
            print(line, file=self.console.file, flush=True)

    def _log_loop(self) -> None:
        while not self._stop_logging.wait(self.log_every):
            self._write_lines()

    def start(self) -> None:
        super().start()
        if self.logs_lines and self._log_thread is None:
            self._stop_logging.clear()
            self._log_thread = threading.Thread(target=self._log_loop, name="progress-log", daemon=True)
            self._log_thread.start()

    def stop(self) -> None:
        if self._log_thread is not None:
            self._stop_logging.set()
            self._log_thread.join()
            self._log_thread = None
        super().stop()


class StepProgress:
    """A bar over optimizer steps showing reward, entropy, response length and seconds per step."""

    def __init__(self, total: int, *, start: int = 0, enabled: bool = True, description: str = "train") -> None:
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            disable=not enabled,
        )
        self.task = self.progress.add_task(description, total=total, completed=start, status="")

    def __enter__(self) -> StepProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def update(self, metrics: dict[str, Any]) -> None:
        parts = [f"reward {metrics['reward']:.3f}"]
        if "entropy" in metrics:
            parts.append(f"H {metrics['entropy']:.3f}")
        if "teacher_entropy" in metrics:
            parts.append(f"H_T {metrics['teacher_entropy']:.3f}")
        parts.append(f"len {metrics['response_length']:.0f}")
        if "dasd/push_fraction" in metrics:
            parts.append(f"push {metrics['dasd/push_fraction']:.2f}")
        parts.append(f"{metrics['seconds']:.1f}s/step")
        if metrics.get("skipped"):
            parts.append("[red]skipped (non-finite)[/red]")
        self.progress.update(self.task, advance=1, status=" | ".join(parts))
