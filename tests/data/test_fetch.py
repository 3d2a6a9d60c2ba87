"""`selfdistill data fetch` / `data list` and the loaders' search order.

The conversion is tested on small dataset folders written here in each Hub source's layout (Parquet
shards under data/ or a config folder, or one JSONL file, with the sources' column names), and on the
original benchmark files where they are present. The offline failure runs the real Hub client with
HF_HUB_OFFLINE=1 and an empty Hub cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selfdistill.data import BENCHMARKS, load_benchmark, resolve_data_root
from selfdistill.data.benchmarks import DataFormatError
from selfdistill.data.fetch import MANIFEST, SOURCES, FetchError, Source, fetch, list_data, split_files

REPO = Path(__file__).resolve().parents[2]


def _parquet(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def make_hub_folders(root: Path) -> dict[str, Path]:
    """One small folder per Hub dataset of SOURCES, laid out and named as on the Hub."""
    folders = {repo: root / repo.replace("/", "__") for repo in {s.repo for s in SOURCES.values()}}
    _parquet(folders["HuggingFaceH4/aime_2024"] / "data" / "train-00000-of-00001.parquet", [
        {"id": 60, "problem": "Every morning Aya walks 9 km.", "solution": "So $s=2.5$ ... \\boxed{204}",
         "answer": "204", "url": "https://artofproblemsolving.com/a", "year": "2024"},
        {"id": 61, "problem": "Let $ABC$ be a triangle.", "solution": "...", "answer": "025",
         "url": "https://artofproblemsolving.com/b", "year": "2024"},
    ])
    _jsonl(folders["math-ai/aime25"] / "test.jsonl", [
        {"problem": "Find the sum of all integer bases $b>9$.", "answer": "70", "id": "0"},
        {"problem": "On triangle $ABC$ ...", "answer": "588", "id": "1"},
    ])
    _parquet(folders["math-ai/amc23"] / "test-00000-of-00001.parquet", [
        {"id": 0, "question": "Cities A and B are 45 miles apart.", "answer": 27.0, "url": "u0"},
        {"id": 1, "question": "Positive reals x and y ...", "answer": -1.5, "url": "u1"},
    ])
    _jsonl(folders["HuggingFaceH4/MATH-500"] / "test.jsonl", [
        {"problem": "Convert $(0,3)$ to polar.", "solution": "... $\\boxed{(3,\\frac{\\pi}{2})}$.",
         "answer": "\\left( 3, \\frac{\\pi}{2} \\right)", "subject": "Precalculus", "level": 2,
         "unique_id": "test/precalculus/807.json"},
    ])
    _jsonl(folders["math-ai/minervamath"] / "test.jsonl", [
        {"question": "Each of the two Magellan telescopes has a diameter of 6.5 m.", "answer": "1.6"},
        {"question": "A star has a parallax of 0.01 arcsec.", "answer": "100"},
    ])
    _jsonl(folders["math-ai/olympiadbench"] / "test.jsonl", [
        {"id": 1606, "question": "Xenia and Sergey play a game.", "solution": ["Step one.", "Step two."],
         "final_answer": ["$69$,$84$"], "context": None, "unit": None},
        {"id": 1607, "question": "Find all f.", "solution": ["..."], "final_answer": ["$f(x)=x$"],
         "context": "Let $f$ be a function."},
    ])
    gsm8k = folders["openai/gsm8k"]
    _parquet(gsm8k / "main" / "test-00000-of-00001.parquet", [
        {"question": "Janet's ducks lay 16 eggs.", "answer": "16 - 3 - 4 = <<16-3-4=9>>9\n#### 18"},
    ])
    _parquet(gsm8k / "main" / "train-00000-of-00001.parquet", [
        {"question": "Natalia sold clips to 48 friends.", "answer": "48/2 = <<48/2=24>>24\n#### 72"},
        {"question": "Weng earns $12 an hour.", "answer": "12/60 = <<12/60=0.2>>0.2\n#### 1,000"},
    ])
    _parquet(gsm8k / "socratic" / "test-00000-of-00001.parquet", [  # another config: must be ignored
        {"question": "wrong config", "answer": "x\n#### 0"},
    ])
    return folders


@pytest.fixture
def hub(tmp_path) -> dict[str, Path]:
    return make_hub_folders(tmp_path / "hub")


def test_fetch_writes_every_source_in_the_loaders_layout(hub, tmp_path):
    dest = fetch(None, tmp_path / "data", download_fn=lambda s: hub[s.repo], check_rows=False)

    aime24 = load_benchmark("aime24", dest)
    assert [(p.id, p.answer) for p in aime24] == [("60", "204"), ("61", "25")]
    assert aime24[0].solution.endswith("\\boxed{204}")
    aime25 = load_benchmark("aime25", dest)
    assert [(p.id, p.problem[:8], p.answer, p.solution) for p in aime25][0] == ("0", "Find the", "70", None)
    assert [(p.id, p.problem[:6], p.answer) for p in load_benchmark("amc23", dest)] == [
        ("0", "Cities", "27"), ("1", "Positi", "-1.5")]
    (math500,) = load_benchmark("math500", dest)
    assert (math500.id, math500.answer) == ("test/precalculus/807.json", "\\left( 3, \\frac{\\pi}{2} \\right)")
    minerva = load_benchmark("minerva_math", dest)
    assert [(p.id, p.answer, p.solution) for p in minerva] == [("0", "1.6", None), ("1", "100", None)]  # row index
    olympiad = load_benchmark("olympiadbench", dest)
    assert [(p.id, p.answer) for p in olympiad] == [("1606", "69,84"), ("1607", "f(x)=x")]
    assert olympiad[0].solution == "Step one.\n\nStep two."
    assert olympiad[1].problem.startswith("Let $f$ be a function.\n\nFind all f.")
    (test_row,) = load_benchmark("gsm8k", dest)
    assert (test_row.answer, test_row.solution) == ("18", "16 - 3 - 4 = 9")  # the main config, not socratic
    assert [p.answer for p in load_benchmark("gsm8k", dest, split="train")] == ["72", "1000"]

    manifest = json.loads((dest / MANIFEST).read_text())
    assert sorted(manifest["files"]) == sorted(f"{b}/{s}.jsonl" for b, splits in BENCHMARKS.items() for s in splits)
    entry = manifest["files"]["amc23/test.jsonl"]
    assert (entry["rows"], entry["source"]) == (2, "math-ai/amc23")
    assert not [p for p in dest.iterdir() if p.name.startswith(".fetch-")]  # the temporary folder is gone


def test_row_count_mismatch_writes_nothing(hub, tmp_path):
    dest = tmp_path / "data"
    with pytest.raises(FetchError, match=r"HuggingFaceH4/aime_2024 \(train\): 2 rows, expected 30"):
        fetch(["aime24", "aime25"], dest, download_fn=lambda s: hub[s.repo])
    assert not dest.exists()  # no file, no manifest, no temporary folder
    dest.mkdir()
    (dest / "mine.txt").write_text("kept")
    with pytest.raises(FetchError, match=r"math-ai/aime25 \(test\): 2 rows, expected 30"):
        fetch(["aime25"], dest, download_fn=lambda s: hub[s.repo])
    assert [p.name for p in dest.iterdir()] == ["mine.txt"]


def test_a_source_without_a_needed_column_writes_nothing(hub, tmp_path):
    _jsonl(hub["math-ai/aime25"] / "test.jsonl", [{"prompt": "no problem column", "answer": "1"}])
    dest = tmp_path / "data"
    with pytest.raises(DataFormatError, match="no problem column; looked for question, problem"):
        fetch(["aime25"], dest, download_fn=lambda s: hub[s.repo], check_rows=False)
    assert not dest.exists()


def test_a_second_fetch_adds_to_the_manifest_and_list_checks_the_files(hub, tmp_path, monkeypatch):
    monkeypatch.delenv("SELFDISTILL_DATA_ROOT", raising=False)
    monkeypatch.setenv("SELFDISTILL_CACHE", str(tmp_path / "cache"))
    dest = tmp_path / "data"
    fetch(["aime24"], dest, download_fn=lambda s: hub[s.repo], check_rows=False)
    fetch(["amc23"], dest, download_fn=lambda s: hub[s.repo], check_rows=False)
    assert sorted(json.loads((dest / MANIFEST).read_text())["files"]) == ["aime24/test.jsonl", "amc23/test.jsonl"]

    listing = list_data(dest)
    assert "aime24/test.jsonl            2 rows (expected 30), checksum ok (HuggingFaceH4/aime_2024)" in listing
    assert "math500/test.jsonl           missing" in listing
    assert f"fetch cache          {tmp_path / 'cache' / 'data'}" in listing

    with (dest / "amc23" / "test.jsonl").open("a") as file:
        file.write(json.dumps({"id": 9, "problem": "added by hand", "answer": 1}) + "\n")
    assert "amc23/test.jsonl             3 rows (expected 40), CHANGED since fetched" in list_data(dest)


def test_split_files_follow_the_hub_naming(tmp_path):
    for name in ["main/test-00000-of-00002.parquet", "main/test-00001-of-00002.parquet", "main/train-0.parquet",
                 "socratic/test-0.parquet", "default/test/0000.parquet", "test.jsonl", "testing.jsonl",
                 ".cache/test.jsonl", "README.md"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    names = lambda files: [str(f.relative_to(tmp_path)) for f in files]  # noqa: E731
    assert names(split_files(tmp_path, "test", "main")) == ["main/test-00000-of-00002.parquet",
                                                             "main/test-00001-of-00002.parquet"]
    assert names(split_files(tmp_path, "test")) == ["default/test/0000.parquet", "main/test-00000-of-00002.parquet",
                                                     "main/test-00001-of-00002.parquet", "socratic/test-0.parquet",
                                                     "test.jsonl"]


def test_search_order_root_then_environment_then_fetch_cache(hub, tmp_path, monkeypatch):
    monkeypatch.delenv("SELFDISTILL_DATA_ROOT", raising=False)
    monkeypatch.setenv("SELFDISTILL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError) as error:
        resolve_data_root()
    assert "selfdistill data fetch" in str(error.value) and "SELFDISTILL_DATA_ROOT" in str(error.value)

    fetched = fetch(["aime25"], None, download_fn=lambda s: hub[s.repo], check_rows=False)
    assert fetched == tmp_path / "cache" / "data"
    assert resolve_data_root() == fetched
    assert [p.answer for p in load_benchmark("aime25")] == ["70", "588"]
    with pytest.raises(FileNotFoundError, match="selfdistill data fetch --benchmarks math500"):
        load_benchmark("math500")  # the fetch cache holds aime25 only

    monkeypatch.setenv("SELFDISTILL_DATA_ROOT", str(tmp_path / "mine"))
    assert resolve_data_root() == tmp_path / "mine"
    assert resolve_data_root(tmp_path / "given") == tmp_path / "given"


def test_offline_fetch_fails_clearly_and_writes_nothing(tmp_path):
    """The real Hub client with HF_HUB_OFFLINE=1 and an empty Hub cache, through the command line."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "SELFDISTILL_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO / "src")}
    dest = tmp_path / "data"
    result = subprocess.run([sys.executable, "-m", "selfdistill", "data", "fetch", "--benchmarks", "aime24,gsm8k",
                             "--dest", str(dest)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "could not download HuggingFaceH4/aime_2024 from the Hugging Face Hub" in result.stderr
    assert "HF_HUB_OFFLINE is set" in result.stderr and "Nothing was written" in result.stderr
    assert not dest.exists() and not (tmp_path / "cache").exists()


def test_converting_the_original_files_gives_the_same_problems(data_root, tmp_path):
    """The converters keep the original files' layout: fed the original files as a source, they write
    files that load as the same problems."""
    sources = {key: Source(f"local/{key[0]}", key[1], source.rows) for key, source in SOURCES.items()}
    dest = fetch(None, tmp_path / "data", download_fn=lambda s: data_root / s.repo.split("/")[1], sources=sources)
    for name, splits in BENCHMARKS.items():
        for split in splits:
            assert load_benchmark(name, dest, split=split) == load_benchmark(name, data_root, split=split), name
