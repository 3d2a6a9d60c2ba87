"""Evaluation run folders: the settings (settings.json), the graded samples (samples.jsonl, appended as
generation calls finish) and the summary (summary.json), and what resuming a run reads back from them.

The sampling and grading loop that fills a folder is `selfdistill.evaluation.runner`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfdistill.atomic import write_json_atomic
from selfdistill.data import BENCHMARKS, Problem

log = logging.getLogger(__name__)


@dataclass
class SampleRecord:
    """One graded completion; the rows of ``samples.jsonl``."""

    source: str  # benchmark / task name (Problem.source)
    problem_id: str
    sample_index: int
    completion: str
    extracted: str | None  # grading.extract_answer(completion)
    correct: float  # 1.0 / 0.0
    num_tokens: int  # response tokens (EOS included)
    truncated: bool
    mean_entropy: float | None  # mean token entropy of the response when the backend gives it

    @property
    def key(self) -> tuple[str, str, int]:
        """(source, problem_id, sample_index): what identifies a sample across runs."""
        return (self.source, self.problem_id, self.sample_index)


SETTINGS_FILE = "settings.json"
SAMPLES_FILE = "samples.jsonl"
SUMMARY_FILE = "summary.json"


class SettingsMismatchError(ValueError):
    """A run folder holds samples made with other settings than the ones asked for now."""


@dataclass(frozen=True)
class EvalSettings:
    """Everything that decides which samples an evaluation run draws (stored in settings.json).

    A re-run into the same folder must have equal settings; it then resumes.
    """

    model: str  # "tiny", "smollm2", a model, checkpoint or run folder (see selfdistill.models.resolve_model)
    benchmarks: tuple[str, ...]  # keys of selfdistill.data.BENCHMARKS
    n: int = 16  # samples per problem
    temperature: float = 0.6
    top_p: float = 1.0
    max_new_tokens: int = 1024
    adapter: str | None = None  # a peft LoRA adapter folder applied to the model
    limit: int | None = None  # the first `limit` problems of each benchmark (None: all)
    split: str = "test"
    seed: int = 0
    max_prompt_tokens: int = 2048  # longer prompts raise (never truncated)
    backend: str = "hf"  # "hf" or "vllm"
    batch_size: int | None = None  # see evaluate_problems
    dtype: str = "float32"  # weights dtype: float32, bfloat16 or float16

    def __post_init__(self) -> None:
        object.__setattr__(self, "benchmarks", tuple(self.benchmarks))
        if not self.benchmarks:
            raise ValueError("no benchmarks given")
        unknown = [name for name in self.benchmarks if name not in BENCHMARKS]
        if unknown:
            raise ValueError(f"unknown benchmarks {unknown}; known: {', '.join(BENCHMARKS)}")
        if len(set(self.benchmarks)) != len(self.benchmarks):
            raise ValueError(f"a benchmark is listed twice: {list(self.benchmarks)}")
        if self.n < 1 or self.max_new_tokens < 1 or self.max_prompt_tokens < 1:
            raise ValueError("n, max_new_tokens and max_prompt_tokens must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or None, got {self.limit}")
        if self.backend not in ("hf", "vllm"):
            raise ValueError(f"backend must be 'hf' or 'vllm', got {self.backend!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {self.batch_size}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")

    def to_json(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["benchmarks"] = list(self.benchmarks)
        return values


def check_settings(stored: dict[str, Any], settings: EvalSettings, run_dir: Path) -> None:
    """Raise SettingsMismatchError naming every setting that differs from the stored ones."""
    wanted = settings.to_json()
    differing = [
        f"{name}: {stored.get(name)!r} in the folder, {value!r} now"
        for name, value in wanted.items()
        if stored.get(name) != value
    ]
    differing += [f"{name}: {stored[name]!r} in the folder, not a setting now" for name in stored if name not in wanted]
    if differing:
        raise SettingsMismatchError(
            f"{run_dir} holds an evaluation run with other settings ({'; '.join(differing)}); "
            "use another --out folder, or the same settings to resume"
        )


def record_to_json(record: SampleRecord) -> dict[str, Any]:
    return dataclasses.asdict(record)


def record_from_json(row: dict[str, Any]) -> SampleRecord:
    names = [f.name for f in dataclasses.fields(SampleRecord)]
    missing = [name for name in names if name not in row]
    if missing:
        raise ValueError(f"missing fields {missing}")
    return SampleRecord(**{name: row[name] for name in names})


def load_records(path: str | os.PathLike[str], *, repair: bool = False) -> list[SampleRecord]:
    """The records of a samples.jsonl file.

    A last line without its newline is what a killed run leaves behind: it is dropped (with
    ``repair=True`` the file is also cut back to the last complete line, so appending can go on).
    Any other bad line raises ValueError naming the file and line.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    complete_end = data.rfind(b"\n") + 1  # bytes up to and including the last newline
    if complete_end < len(data):
        log.warning("%s: dropping a half-written last line (%d bytes) left by an interrupted run",
                    path, len(data) - complete_end)
        if repair:
            with path.open("r+b") as file:
                file.truncate(complete_end)
    records = []
    for number, line in enumerate(data[:complete_end].decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(record_from_json(json.loads(line)))
        except (ValueError, TypeError) as error:
            raise ValueError(f"{path}, line {number}: not a sample record ({error})") from error
    return records


def append_records(path: Path, records: Sequence[SampleRecord]) -> None:
    """Append records as JSON lines in one write, flushed to disk."""
    if not records:
        return
    payload = "".join(json.dumps(record_to_json(r), ensure_ascii=False) + "\n" for r in records)
    with path.open("a", encoding="utf-8") as file:
        file.write(payload)
        file.flush()
        os.fsync(file.fileno())


def prepare_run_folder(out: Path, settings: EvalSettings) -> None:
    """Create `out` and write settings.json, or, when the folder already holds a run, check that its
    settings are `settings` (raises SettingsMismatchError naming what differs)."""
    out.mkdir(parents=True, exist_ok=True)
    settings_path, samples_path = out / SETTINGS_FILE, out / SAMPLES_FILE
    if settings_path.exists():
        check_settings(json.loads(settings_path.read_text(encoding="utf-8")), settings, out)
    elif samples_path.exists():
        raise SettingsMismatchError(f"{out} has {SAMPLES_FILE} but no {SETTINGS_FILE}; use an empty --out folder")
    else:
        write_json_atomic(settings_path, settings.to_json(), indent=2)


def done_records(samples_path: Path, problems: Sequence[Problem], n: int) -> list[SampleRecord]:
    """The records samples.jsonl already holds for `problems` with a sample index below `n`, in file order;
    the file is repaired first (see `load_records`), so new records can be appended to it."""
    wanted = {(p.source, p.id) for p in problems}
    return [r for r in load_records(samples_path, repair=True)
            if (r.source, r.problem_id) in wanted and r.sample_index < n]


def merge_records(
    done: Sequence[SampleRecord], new: Sequence[SampleRecord], problems: Sequence[Problem]
) -> list[SampleRecord]:
    """Resumed and new records, one per key (a later record wins), in problem order then sample index."""
    by_key = {r.key: r for r in done}
    by_key.update({r.key: r for r in new})
    order = {(p.source, p.id): i for i, p in enumerate(problems)}
    return sorted(by_key.values(), key=lambda r: (order[(r.source, r.problem_id)], r.sample_index))


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    """Write summary.json (atomically: a reader never sees half of it)."""
    write_json_atomic(out / SUMMARY_FILE, summary, indent=2)


__all__ = [
    "SAMPLES_FILE",
    "SETTINGS_FILE",
    "SUMMARY_FILE",
    "EvalSettings",
    "SampleRecord",
    "SettingsMismatchError",
    "append_records",
    "check_settings",
    "done_records",
    "load_records",
    "merge_records",
    "prepare_run_folder",
    "record_from_json",
    "record_to_json",
    "write_summary",
]
