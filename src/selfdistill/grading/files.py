"""Grading a JSONL file of completions: what ``selfdistill grade`` runs."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from selfdistill.grading.pool import DEFAULT_TIMEOUT, default_grader


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
    verdicts = default_grader(workers).grade_detailed(completions, golds, timeout=timeout)
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
