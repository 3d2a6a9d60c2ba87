"""Rich progress bars for training and evaluation."""

from __future__ import annotations

from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


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
