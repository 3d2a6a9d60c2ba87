"""`selfdistill data fetch` and `data list`: the seven benchmarks from the Hugging Face Hub, for anyone.

Each benchmark split comes from one public Hub dataset (SOURCES; docs/benchmarks.md names them). The
fetch downloads the dataset's data files with `huggingface_hub.snapshot_download` (the Hub's own
client, with its cache and its offline mode), reads the split's Parquet or JSONL files, converts each
row into the layout `load_benchmark` reads (the field names of the original files, see
docs/benchmarks.md), and checks it before anything is written: the row count must be the benchmark's,
and every row must load as a `Problem`. The files are written into a temporary folder inside the
destination and moved into place only once all of them passed; a manifest (`selfdistill-data.json`,
written last) records each file's rows, SHA-256, source dataset and Hub revision, and `data list`
checks the files against it. A download that fails (offline, HF_HUB_OFFLINE=1, an unknown dataset)
raises `FetchError` and leaves the destination as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfdistill.data.benchmarks import BENCHMARKS, DATA_ROOT_ENV, MANIFEST, DataFormatError, load_benchmark
from selfdistill.paths import data_cache_dir

MANIFEST_FORMAT = 1


class FetchError(RuntimeError):
    """The benchmarks could not be fetched; nothing was written."""


@dataclass(frozen=True)
class Source:
    """Where one benchmark split comes from on the Hub, and how many rows it must have."""

    repo: str  # Hub dataset id
    split: str  # the split's name on the Hub (its files are named after it)
    rows: int  # the benchmark's row count; a different count is an error
    config: str | None = None  # the dataset's sub-folder, where it has several (gsm8k: "main")

    @property
    def url(self) -> str:
        return f"https://huggingface.co/datasets/{self.repo}"


# (benchmark, split) -> its Hub source. Row counts are those of the benchmarks as published.
SOURCES: dict[tuple[str, str], Source] = {
    ("aime24", "test"): Source("HuggingFaceH4/aime_2024", "train", 30),
    ("aime25", "test"): Source("math-ai/aime25", "test", 30),
    ("amc23", "test"): Source("math-ai/amc23", "test", 40),
    ("math500", "test"): Source("HuggingFaceH4/MATH-500", "test", 500),
    ("minerva_math", "test"): Source("math-ai/minervamath", "test", 272),
    ("olympiadbench", "test"): Source("math-ai/olympiadbench", "test", 675),
    ("gsm8k", "test"): Source("openai/gsm8k", "test", 1319, config="main"),
    ("gsm8k", "train"): Source("openai/gsm8k", "train", 7473, config="main"),
}


# --------------------------------------------------------------------------------------------
# Converting a Hub row into the layout the loader reads (the original files' field names)

_ABSENT = object()


def _first(row: dict[str, Any], names: tuple[str, ...], what: str, default: Any = _ABSENT) -> Any:
    """The value of the first of `names` present (and not None) in `row`."""
    for name in names:
        if row.get(name) is not None:
            return row[name]
    if default is not _ABSENT:
        return default
    raise DataFormatError(f"no {what} column; looked for {', '.join(names)}; the row has {', '.join(sorted(row))}")


def _aime24(row: dict[str, Any], index: int) -> dict[str, Any]:
    return {"id": _first(row, ("id",), "id", index), "problem": _first(row, ("problem", "question"), "problem"),
            "solution": _first(row, ("solution",), "solution", None),
            "answer": _first(row, ("answer",), "answer"), "url": _first(row, ("url",), "url", None)}


def _aime25(row: dict[str, Any], index: int) -> dict[str, Any]:
    return {"id": str(_first(row, ("id",), "id", index)), "question": _first(row, ("question", "problem"), "problem"),
            "answer": _first(row, ("answer",), "answer")}


def _amc23(row: dict[str, Any], index: int) -> dict[str, Any]:
    return {"id": _first(row, ("id",), "id", index), "problem": _first(row, ("problem", "question"), "problem"),
            "answer": _first(row, ("answer",), "answer"), "url": _first(row, ("url",), "url", None)}


def _math500(row: dict[str, Any], index: int) -> dict[str, Any]:
    return {"problem": _first(row, ("problem",), "problem"), "solution": _first(row, ("solution",), "solution", None),
            "answer": _first(row, ("answer",), "answer"), "subject": row.get("subject"), "level": row.get("level"),
            "unique_id": _first(row, ("unique_id",), "unique_id")}


def _minerva(row: dict[str, Any], index: int) -> dict[str, Any]:
    converted = {"idx": _first(row, ("idx", "id"), "idx", index),
                 "problem": _first(row, ("problem", "question"), "problem"),
                 "solution": _first(row, ("solution",), "solution", None), "type": row.get("type")}
    answer = _first(row, ("answer", "final_answer"), "answer", None)
    if answer is not None:
        converted["answer"] = answer
    return converted


def _olympiadbench(row: dict[str, Any], index: int) -> dict[str, Any]:
    answer = _first(row, ("final_answer", "answer"), "answer")
    solution = _first(row, ("solution",), "solution", [])
    return {"id": _first(row, ("id",), "id", index), "question": _first(row, ("question", "problem"), "problem"),
            "context": row.get("context"), "solution": solution if isinstance(solution, list) else [solution],
            "final_answer": list(answer) if isinstance(answer, (list, tuple)) else [answer]}


def _gsm8k(row: dict[str, Any], index: int) -> dict[str, Any]:
    return {"question": _first(row, ("question",), "question"), "answer": _first(row, ("answer",), "answer")}


CONVERTERS: dict[str, Callable[[dict[str, Any], int], dict[str, Any]]] = {
    "aime24": _aime24,
    "aime25": _aime25,
    "amc23": _amc23,
    "math500": _math500,
    "minerva_math": _minerva,
    "olympiadbench": _olympiadbench,
    "gsm8k": _gsm8k,
}


# --------------------------------------------------------------------------------------------
# Reading a downloaded dataset folder


def split_files(folder: Path, split: str, config: str | None = None) -> list[Path]:
    """The Parquet / JSONL files of `split` in a dataset folder, in name order (shards in sequence).

    Follows the Hub's naming conventions: a file named after the split (`test.jsonl`,
    `test-00000-of-00001.parquet`, `data/test-*`) or inside a folder named after it (`test/0000.parquet`);
    with `config`, only files under the `<config>/` folder.
    """
    pattern = re.compile(rf"^{re.escape(split)}([-_.]|$)")
    found = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if not path.is_file() or path.suffix not in (".parquet", ".jsonl") or relative.parts[0].startswith("."):
            continue
        if config is not None and relative.parts[0] != config:
            continue
        if pattern.match(path.name) or (len(relative.parts) > 1 and relative.parts[-2] == split):
            found.append(path)
    return found


def read_split(folder: Path, source: Source) -> list[dict[str, Any]]:
    """Every row of the source's split in a downloaded dataset folder."""
    files = split_files(folder, source.split, source.config)
    if not files:
        present = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        raise FetchError(f"{source.repo}: no Parquet or JSONL file for split {source.split!r}"
                         f"{f' of config {source.config!r}' if source.config else ''}; files: {present}")
    rows: list[dict[str, Any]] = []
    for path in files:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            rows.extend(pq.read_table(path).to_pylist())
        else:
            with path.open(encoding="utf-8") as file:
                rows.extend(json.loads(line) for line in file if line.strip())
    return rows


def convert_rows(benchmark: str, rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    convert = CONVERTERS[benchmark]
    return [convert(row, index) for index, row in enumerate(rows)]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as file:
        for row in rows:
            file.write(json.dumps(row, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------------------------
# The fetch


def download(source: Source) -> Path:
    """The local folder of the source's data files, downloaded (or found in the Hub cache) by
    `huggingface_hub.snapshot_download`. Raises FetchError naming the dataset when it cannot."""
    from huggingface_hub import snapshot_download

    patterns = ["*.parquet", "*.jsonl", "**/*.parquet", "**/*.jsonl"]
    try:
        return Path(snapshot_download(source.repo, repo_type="dataset", allow_patterns=patterns))
    except Exception as error:  # the Hub client's errors differ by version: name whatever it raised
        offline = " HF_HUB_OFFLINE is set, so the Hub client does not go online." if os.environ.get(
            "HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") else ""
        raise FetchError(
            f"could not download {source.repo} from the Hugging Face Hub ({type(error).__name__}: {error}).{offline} "
            f"Nothing was written. Without network access, copy the files by hand and set {DATA_ROOT_ENV} "
            "(docs/benchmarks.md lists them)."
        ) from error


def build_split(benchmark: str, split: str, folder: Path, source: Source, out_root: Path,
                *, expected_rows: int | None) -> dict[str, Any]:
    """Convert one split from a dataset folder into `<out_root>/<benchmark>/<split>.jsonl` and check it:
    the row count (unless `expected_rows` is None) and that every row loads. Returns its manifest entry."""
    rows = convert_rows(benchmark, read_split(folder, source))
    if expected_rows is not None and len(rows) != expected_rows:
        raise FetchError(f"{source.repo} ({source.split}): {len(rows)} rows, expected {expected_rows} for "
                         f"{benchmark}/{split}; the dataset may have changed. Nothing was written.")
    path = out_root / benchmark / f"{split}.jsonl"
    _write_jsonl(path, rows)
    loaded = load_benchmark(benchmark, out_root, split=split)  # raises DataFormatError naming the line
    if len(loaded) != len(rows):
        raise FetchError(f"{path}: wrote {len(rows)} rows but {len(loaded)} loaded")
    revision = folder.name if folder.parent.name == "snapshots" else None  # the Hub cache names it by commit
    return {"rows": len(rows), "sha256": _sha256(path), "source": source.repo, "config": source.config,
            "source_split": source.split, "revision": revision}


def read_manifest(root: Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    if not path.is_file():
        return {"format": MANIFEST_FORMAT, "files": {}}
    return json.loads(path.read_text(encoding="utf-8"))


def _selected(benchmarks: Iterable[str] | None) -> list[tuple[str, str]]:
    names = list(BENCHMARKS) if benchmarks is None else list(benchmarks)
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    return [(name, split) for name in names for split in BENCHMARKS[name]]


def fetch(
    benchmarks: Iterable[str] | None = None,
    dest: str | os.PathLike[str] | None = None,
    *,
    download_fn: Callable[[Source], Path] = download,
    sources: dict[tuple[str, str], Source] | None = None,
    check_rows: bool = True,
    log: Callable[[str], None] = lambda message: None,
) -> Path:
    """Fetch benchmarks (default: all seven) into `dest` (default: the data cache, `<cache>/data`).

    Everything is downloaded and checked first; then the files are moved into place and the manifest
    updated, so a failure leaves `dest` as it was. `download_fn(source) -> folder` gives a dataset's
    local folder (the Hub by default; a local copy of a dataset works too). Returns `dest`.
    """
    dest = Path(dest).expanduser() if dest is not None else data_cache_dir()
    sources = SOURCES if sources is None else sources
    wanted = _selected(benchmarks)
    folders: dict[str, Path] = {}
    for key in wanted:  # download everything before writing anything
        source = sources[key]
        if source.repo not in folders:
            log(f"downloading {source.repo} ...")
            folders[source.repo] = download_fn(source)
    created = not dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=dest))
    done = False
    try:
        entries = {}
        for benchmark, split in wanted:
            source = sources[(benchmark, split)]
            entry = build_split(benchmark, split, folders[source.repo], source, tmp,
                                expected_rows=source.rows if check_rows else None)
            entries[f"{benchmark}/{split}.jsonl"] = entry
            log(f"{benchmark}/{split}.jsonl: {entry['rows']} rows from {source.repo}")
        manifest = read_manifest(dest)
        for name in entries:  # all checked: move into place (renames within one folder)
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / name, dest / name)
        manifest["format"] = MANIFEST_FORMAT
        manifest["files"].update({name: {**entry, "fetched": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
                                  for name, entry in entries.items()})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp / MANIFEST, dest / MANIFEST)
        done = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not done and created:
            shutil.rmtree(dest, ignore_errors=True)  # the folder was made for this fetch: take it away again
    return dest


# --------------------------------------------------------------------------------------------
# What is present where


def search_order(root: str | os.PathLike[str] | None = None) -> list[tuple[str, Path | None]]:
    """The folders `load_benchmark` looks in, in order: (what, folder or None when not set)."""
    env = os.environ.get(DATA_ROOT_ENV)
    return [("--data-root / root=", Path(root).expanduser() if root else None),
            (f"${DATA_ROOT_ENV}", Path(env).expanduser() if env else None),
            ("fetch cache", data_cache_dir())]


def check_file(root: Path, name: str) -> dict[str, Any]:
    """State of `<root>/<name>`: present, rows (lines), and against the manifest (if any) whether its
    SHA-256 and rows still match what was fetched."""
    path = root / name
    if not path.is_file():
        return {"present": False}
    with path.open(encoding="utf-8") as file:
        rows = sum(1 for line in file if line.strip())
    state: dict[str, Any] = {"present": True, "rows": rows}
    entry = read_manifest(root)["files"].get(name)
    if entry is None:
        state["verified"] = None  # not fetched by selfdistill: nothing to check against
    else:
        state["verified"] = rows == entry["rows"] and _sha256(path) == entry["sha256"]
        state["source"] = entry.get("source")
    return state


def list_data(root: str | os.PathLike[str] | None = None) -> str:
    """A text table of every benchmark split in each folder of the search order."""
    lines = ["The benchmark loaders look in, in order:"]
    for what, folder in search_order(root):
        lines.append(f"  {what:20s} {folder if folder is not None else '(not set)'}")
    for what, folder in search_order(root):
        if folder is None or not folder.is_dir():
            continue
        lines.append("")
        lines.append(f"{folder}  ({what})")
        for benchmark, split in _selected(None):
            name = f"{benchmark}/{split}.jsonl"
            state = check_file(folder, name)
            if not state["present"]:
                status = "missing"
            else:
                expected = SOURCES[(benchmark, split)].rows
                status = f"{state['rows']} rows" + ("" if state["rows"] == expected else f" (expected {expected})")
                if state["verified"] is True:
                    status += f", checksum ok ({state['source']})"
                elif state["verified"] is False:
                    status += ", CHANGED since fetched (checksum or rows differ from the manifest)"
                else:
                    status += " (not fetched by selfdistill: no checksum to compare)"
            lines.append(f"  {name:28s} {status}")
    return "\n".join(lines)
