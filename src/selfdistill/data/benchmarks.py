"""Math problems in one schema: the public benchmark files and the user's own JSONL / Parquet files.

Every loader returns a list of `Problem`. The benchmark files keep the field names of the
repositories they were copied from (see docs/benchmarks.md); `load_benchmark` knows each layout,
`load_problems` auto-detects the common conventions (plain, TRL, verl) or takes a field mapping.

Errors are never skipped: a malformed line, a missing field or an empty answer raises
`DataFormatError` naming the file and the 1-based line (JSONL) or row (Parquet).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from selfdistill.grading import last_boxed
from selfdistill.paths import data_cache_dir

DATA_ROOT_ENV = "SELFDISTILL_DATA_ROOT"
MANIFEST = "selfdistill-data.json"
"""The file `selfdistill data fetch` writes into a data folder it filled (what was fetched, with checksums)."""

# Field names tried, in order, when load_problems is given no mapping.
PROBLEM_FIELDS = ("problem", "question", "prompt")
ANSWER_FIELDS = ("answer", "final_answer", "reward_model.ground_truth")
SOLUTION_FIELDS = ("solution", "privileged_context")
ID_FIELDS = ("id",)


@dataclass(frozen=True)
class Problem:
    """One math problem in the library's schema.

    id: unique within its source. problem: the statement shown to the student.
    answer: the gold final answer as text (numbers without a spurious ".0").
    solution: a worked reference solution (privileged context for the teacher), or None.
    source: the benchmark name, or the file name for the user's own data.
    """

    id: str
    problem: str
    answer: str
    solution: str | None
    source: str


class DataFormatError(ValueError):
    """A data file that cannot be read as problems; the message names the file and line."""


class _RowError(ValueError):
    """A problem with one row; the loader adds the file and line and re-raises DataFormatError."""


class _RowFields(NamedTuple):
    problem: str
    answer: str
    solution: str | None
    id: str | None  # None: the loader numbers the row


# --------------------------------------------------------------------------------------------
# Text helpers


_CALCULATOR_NOTE = re.compile(r"<<[^<>]*>>")  # GSM8K's "<<48/2=24>>" annotations
_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")


def _answer_text(value: Any) -> str:
    """A gold answer as text: 70.0 -> "70", 0.5 -> "0.5", lists joined with ", "."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(part for part in (_answer_text(item) for item in value) if part)
    return str(value).strip()


def _strip_math_delimiters(answer: str) -> str:
    """Remove unescaped `$` signs: "$\\frac{1}{2}$" -> "\\frac{1}{2}", "$69$,$84$" -> "69,84"."""
    return _UNESCAPED_DOLLAR.sub("", answer).strip()


def _message_content(content: Any) -> str:
    """A chat message's content as text (a plain string, or a list of typed parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    raise _RowError(f"message content of type {type(content).__name__} is not text")


def _problem_text(value: Any) -> str:
    """The problem statement; a TRL-style list of chat messages gives its last user message."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        user_turns = [m for m in value if isinstance(m, dict) and m.get("role") == "user"]
        if not user_turns:
            raise _RowError("the prompt is a list of messages with no user message")
        return _message_content(user_turns[-1].get("content"))
    raise _RowError(f"the problem is of type {type(value).__name__}, expected text or chat messages")


def _solution_text(value: Any) -> str | None:
    """A worked solution as text, or None when absent; lists of solutions are joined by blank lines."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        value = "\n\n".join(str(part).strip() for part in value if part is not None)
    text = str(value)
    return text if text.strip() else None


# --------------------------------------------------------------------------------------------
# Reading rows, and turning rows into problems


def _read_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (location, row) for each row of a .jsonl or .parquet file; location is "file, line N"."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # lazy: only the Parquet path needs it

        for number, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield f"{path}, row {number}", row
        return
    if path.suffix != ".jsonl":
        raise DataFormatError(f"{path}: unsupported file type {path.suffix!r}; expected .jsonl or .parquet")
    with path.open(encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            location = f"{path}, line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataFormatError(f"{location}: malformed JSON ({error.msg})") from error
            if not isinstance(row, dict):
                raise DataFormatError(f"{location}: expected a JSON object, got {type(row).__name__}")
            yield location, row


def _build_problems(
    path: Path, source: str, id_prefix: str, parse_row: Callable[[dict[str, Any]], _RowFields]
) -> list[Problem]:
    """Parse every row of `path` with `parse_row`, checking what every Problem must satisfy."""
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    problems: list[Problem] = []
    line_of_id: dict[str, str] = {}
    for index, (location, row) in enumerate(_read_rows(path)):
        try:
            fields = parse_row(row)
        except KeyError as error:
            raise DataFormatError(f"{location}: missing field {error.args[0]!r}") from error
        except _RowError as error:
            raise DataFormatError(f"{location}: {error}") from error
        if not fields.problem.strip():
            raise DataFormatError(f"{location}: empty problem")
        if not fields.answer.strip():
            raise DataFormatError(f"{location}: empty answer")
        problem_id = fields.id if fields.id is not None else f"{id_prefix}-{index}"
        if problem_id in line_of_id:
            raise DataFormatError(
                f"{location}: duplicate id {problem_id!r} (first at {line_of_id[problem_id]})"
            )
        line_of_id[problem_id] = location
        problems.append(Problem(problem_id, fields.problem, fields.answer, fields.solution, source))
    return problems


_MISSING = object()


def _lookup(row: dict[str, Any], field: str) -> Any:
    """The value at `field`; a dotted name walks nested dicts. Returns _MISSING when absent."""
    if field in row:
        return row[field]
    value: Any = row
    for key in field.split("."):
        if not isinstance(value, dict) or key not in value:
            return _MISSING
        value = value[key]
    return value


def _pick(row: dict[str, Any], field: str | None, candidates: tuple[str, ...], what: str) -> Any:
    """The named field (required), or the first candidate present; _MISSING if none is."""
    if field is not None:
        value = _lookup(row, field)
        if value is _MISSING:
            raise _RowError(f"missing field {field!r} ({what})")
        return value
    for candidate in candidates:
        value = _lookup(row, candidate)
        if value is not _MISSING:
            return value
    return _MISSING


def load_problems(
    path: str | os.PathLike[str],
    *,
    problem_field: str | None = None,
    answer_field: str | None = None,
    solution_field: str | None = None,
    id_field: str | None = None,
    source: str | None = None,
) -> list[Problem]:
    """Load the user's own problems from a `.jsonl` or `.parquet` file.

    A field left as None is auto-detected: the problem from `problem`, `question` or `prompt`
    (a TRL-style list of chat messages gives its last user message); the answer from `answer`,
    `final_answer` or `reward_model.ground_truth` (verl); the solution from `solution` or
    `privileged_context` (TRL), else None; the id from `id`, else "<source>-<row index>".
    Dotted names address nested dicts. A field named explicitly must be present in every row.
    `source` defaults to the file name.
    """
    path = Path(path)
    source = source if source is not None else path.name

    def parse_row(row: dict[str, Any]) -> _RowFields:
        problem = _pick(row, problem_field, PROBLEM_FIELDS, "problem")
        if problem is _MISSING:
            raise _RowError(f"no problem field; looked for {', '.join(PROBLEM_FIELDS)} (pass problem_field=)")
        answer = _pick(row, answer_field, ANSWER_FIELDS, "answer")
        if answer is _MISSING:
            raise _RowError(f"no answer field; looked for {', '.join(ANSWER_FIELDS)} (pass answer_field=)")
        solution = _pick(row, solution_field, SOLUTION_FIELDS, "solution")
        row_id = _pick(row, id_field, ID_FIELDS, "id")
        return _RowFields(
            problem=_problem_text(problem),
            answer=_answer_text(answer),
            solution=None if solution is _MISSING else _solution_text(solution),
            id=None if row_id is _MISSING or row_id is None else str(row_id),
        )

    return _build_problems(path, source, source, parse_row)


# --------------------------------------------------------------------------------------------
# The benchmark files: one small parser per layout


def _aime24_row(row: dict[str, Any]) -> _RowFields:
    # Answers are 3-digit strings such as "025"; the integer is the answer.
    answer = _answer_text(row["answer"])
    answer = str(int(answer)) if answer.isdigit() else answer
    return _RowFields(row["problem"], answer, _solution_text(row["solution"]), str(row["id"]))


def _aime25_row(row: dict[str, Any]) -> _RowFields:
    return _RowFields(row["question"], _answer_text(row["answer"]), None, str(row["id"]))


def _amc23_row(row: dict[str, Any]) -> _RowFields:
    return _RowFields(row["problem"], _answer_text(row["answer"]), None, str(row["id"]))


def _math500_row(row: dict[str, Any]) -> _RowFields:
    return _RowFields(
        row["problem"], _answer_text(row["answer"]), _solution_text(row["solution"]), row["unique_id"]
    )


def _minerva_row(row: dict[str, Any]) -> _RowFields:
    # The original file has no answer field: the answer is the last \boxed{...} of the solution. A file
    # written by `selfdistill data fetch` from a source that gives the answer (and maybe no solution) has one.
    solution = row.get("solution")
    if row.get("answer") not in (None, ""):
        answer: str | None = _answer_text(row["answer"])
    elif solution is None:
        raise _RowError("neither an answer nor a solution to take the answer from")
    else:
        answer = last_boxed(solution)
        if answer is None:
            raise _RowError("no closed \\boxed{...} in the solution to take the answer from")
    return _RowFields(row["problem"], answer.strip(), _solution_text(solution), str(row["idx"]))


def _olympiadbench_row(row: dict[str, Any]) -> _RowFields:
    problem = row["question"]
    if row.get("context"):
        problem = f"{row['context']}\n\n{problem}"
    answers = [_strip_math_delimiters(str(item)) for item in row["final_answer"]]
    return _RowFields(problem, ", ".join(answers), _solution_text(row["solution"]), str(row["id"]))


def _gsm8k_row(row: dict[str, Any]) -> _RowFields:
    # "answer" holds the worked solution, with "<<a*b=c>>" calculator notes, then "#### <final>".
    text = row["answer"]
    if "####" not in text:
        raise _RowError("the answer has no '####' separator before the final answer")
    worked, _, final = text.rpartition("####")
    solution = _CALCULATOR_NOTE.sub("", worked).strip()
    return _RowFields(row["question"], final.replace(",", "").strip(), solution or None, None)


_ROW_PARSERS: dict[str, Callable[[dict[str, Any]], _RowFields]] = {
    "aime24": _aime24_row,
    "aime25": _aime25_row,
    "amc23": _amc23_row,
    "math500": _math500_row,
    "minerva_math": _minerva_row,
    "olympiadbench": _olympiadbench_row,
    "gsm8k": _gsm8k_row,
}

# Benchmark name -> the splits shipped for it (files <root>/<name>/<split>.jsonl).
BENCHMARKS: dict[str, tuple[str, ...]] = {
    "aime24": ("test",),
    "aime25": ("test",),
    "amc23": ("test",),
    "math500": ("test",),
    "minerva_math": ("test",),
    "olympiadbench": ("test",),
    "gsm8k": ("test", "train"),
}


def resolve_data_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding the benchmark files, first found of: `root`, $SELFDISTILL_DATA_ROOT, and the
    folder `selfdistill data fetch` writes to by default (`<cache>/data`, where it has fetched something)."""
    if root is not None:
        return Path(root).expanduser()
    from_env = os.environ.get(DATA_ROOT_ENV)
    if from_env:
        return Path(from_env).expanduser()
    fetched = data_cache_dir()
    if (fetched / MANIFEST).is_file():
        return fetched
    raise FileNotFoundError(
        f"no benchmark data found. Either download the benchmarks from the Hugging Face Hub with "
        f"`selfdistill data fetch` (written to {fetched}, found there from then on), or point "
        f"{DATA_ROOT_ENV} (or root= / --data-root) at your own folder holding aime24/, math500/, gsm8k/ ... "
        "(each with <split>.jsonl). docs/benchmarks.md lists the files and their sources."
    )


def load_benchmark(
    name: str, root: str | os.PathLike[str] | None = None, split: str = "test"
) -> list[Problem]:
    """Load a benchmark (a key of BENCHMARKS) from `<root>/<name>/<split>.jsonl` as Problems.

    `root` defaults to $SELFDISTILL_DATA_ROOT. Ids are the file's own ids where it has them,
    else "<name>-<row index>" ("<name>-<split>-<row index>" for splits other than test).
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    if split not in BENCHMARKS[name]:
        raise ValueError(
            f"benchmark {name!r} has no split {split!r}; available: {', '.join(BENCHMARKS[name])}"
        )
    folder = resolve_data_root(root)
    path = folder / name / f"{split}.jsonl"
    if not path.exists():
        raise FileNotFoundError(
            f"data file not found: {path} (download it with `selfdistill data fetch --benchmarks {name} "
            f"--dest {folder}`, or see docs/benchmarks.md)"
        )
    id_prefix = name if split == "test" else f"{name}-{split}"
    return _build_problems(path, name, id_prefix, _ROW_PARSERS[name])
