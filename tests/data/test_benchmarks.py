"""Benchmark loaders on the real files, the generic loader on TRL / verl style files, and errors."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selfdistill.data import BENCHMARKS, DATA_ROOT_ENV, DataFormatError, Problem, load_benchmark, load_problems
from selfdistill.grading import last_boxed

EXPECTED_ROWS = {
    ("aime24", "test"): 30,
    ("aime25", "test"): 30,
    ("amc23", "test"): 40,
    ("math500", "test"): 500,
    ("minerva_math", "test"): 272,
    ("olympiadbench", "test"): 675,
    ("gsm8k", "test"): 1319,
    ("gsm8k", "train"): 7473,
}


@pytest.fixture(scope="module")
def benchmarks(data_root: Path) -> dict[tuple[str, str], list[Problem]]:
    return {(name, split): load_benchmark(name, data_root, split) for name, split in EXPECTED_ROWS}


def test_every_benchmark_and_split_is_listed():
    assert {(name, split) for name, splits in BENCHMARKS.items() for split in splits} == set(EXPECTED_ROWS)


@pytest.mark.parametrize(("name", "split"), list(EXPECTED_ROWS))
def test_benchmark_rows_are_complete(benchmarks, name, split):
    problems = benchmarks[name, split]
    assert len(problems) == EXPECTED_ROWS[name, split]
    assert len({p.id for p in problems}) == len(problems), "ids must be unique within a benchmark"
    for p in problems:
        assert p.problem.strip() and p.answer.strip() and p.answer == p.answer.strip()
        assert p.source == name
        assert p.solution is None or p.solution.strip()


def test_answers_and_solutions_spot_checks(benchmarks):
    gsm8k_test = benchmarks["gsm8k", "test"]
    assert gsm8k_test[0].answer == "18"
    assert gsm8k_test[0].id == "gsm8k-0"
    assert gsm8k_test[0].problem.startswith("Janet\u2019s ducks lay 16 eggs per day.")
    assert gsm8k_test[0].solution == (
        "Janet sells 16 - 3 - 4 = 9 duck eggs a day.\n"
        "She makes 9 * 2 = $18 every day at the farmer\u2019s market."
    )
    assert gsm8k_test[2].answer == "70000"  # "#### 70,000" in the file: commas stripped
    train = benchmarks["gsm8k", "train"]
    assert train[0].answer == "72" and train[0].id == "gsm8k-train-0"
    for p in gsm8k_test + train:
        assert "<<" not in p.solution and ">>" not in p.solution and "####" not in p.solution
        assert "," not in p.answer

    aime25 = benchmarks["aime25", "test"]
    assert (aime25[0].answer, aime25[1].answer) == ("70", "588")  # 70.0, 588.0 in the file
    assert all(p.answer.lstrip("-").isdigit() for p in aime25 + benchmarks["amc23", "test"])
    assert all(p.solution is None for p in aime25)
    assert aime25[0].problem.startswith("Find the sum of all integer bases")

    amc23 = benchmarks["amc23", "test"]
    assert amc23[0].answer == "27" and "-1" in {p.answer for p in amc23}
    assert all(p.solution is None for p in amc23)

    aime24 = benchmarks["aime24", "test"]
    assert aime24[0].id == "60" and aime24[0].answer == "204"
    assert all(p.solution for p in aime24)
    assert {p.answer for p in aime24} >= {"25", "73"}  # stored as "025", "073"

    math500 = benchmarks["math500", "test"]
    assert math500[0].id == "test/precalculus/807.json"
    assert math500[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"

    minerva = benchmarks["minerva_math", "test"]
    assert minerva[0].answer == "1.6"  # "...=\boxed{1.6} \mathrm{~cm}"
    assert minerva[1].answer == "4.5e33"
    assert all(last_boxed(p.solution).strip() == p.answer for p in minerva)
    assert "56.0" in {p.answer for p in minerva}  # a boxed answer is text: its digits are kept

    olympiad = benchmarks["olympiadbench", "test"]
    assert olympiad[0].id == "1606" and olympiad[0].answer == "2"
    assert olympiad[1].answer == "\\frac{1}{2 n+2}"  # "$\frac{1}{2 n+2}$" in the file
    assert all("$" not in p.answer.replace("\\$", "") for p in olympiad)
    assert "69,84" in {p.answer for p in olympiad}  # "$69$,$84$"
    assert sum("\n\n" in p.solution for p in olympiad) > 100  # several solutions joined


def test_data_root_from_environment(monkeypatch, data_root):
    monkeypatch.setenv(DATA_ROOT_ENV, str(data_root))
    assert len(load_benchmark("amc23")) == 40
    monkeypatch.delenv(DATA_ROOT_ENV)
    with pytest.raises(FileNotFoundError, match=DATA_ROOT_ENV) as error:
        load_benchmark("amc23")
    assert "docs/benchmarks.md" in str(error.value)


def test_unknown_benchmark_or_split(data_root):
    with pytest.raises(ValueError, match="gsm8k"):
        load_benchmark("gsm9k", data_root)
    with pytest.raises(ValueError, match="train"):
        load_benchmark("aime24", data_root, split="train")
    with pytest.raises(FileNotFoundError, match="aime24"):
        load_benchmark("aime24", data_root / "nowhere")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


TRL_ROWS = [
    {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2+3?"},
            {"role": "assistant", "content": "Let me see."},
            {"role": "user", "content": "What is 2+5?"},
        ],
        "privileged_context": "2+5 = 7.",
        "answer": 7,
    },
    {"prompt": [{"role": "user", "content": "Halve 9."}], "privileged_context": "9/2 = 4.5", "answer": 4.5},
]


VERL_ROWS = [
    {
        "data_source": "my_math",
        "prompt": [{"role": "user", "content": "Compute 6*7."}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": "42"},
        "extra_info": {"split": "train", "index": 10},
    },
    {
        "data_source": "my_math",
        "prompt": [{"role": "user", "content": "Compute 10-1."}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": "9"},
        "extra_info": {"split": "train", "index": 11},
    },
]


def test_generic_loader_trl_jsonl(tmp_path):
    problems = load_problems(write_jsonl(tmp_path / "trl.jsonl", TRL_ROWS))
    assert problems == [
        Problem("trl.jsonl-0", "What is 2+5?", "7", "2+5 = 7.", "trl.jsonl"),
        Problem("trl.jsonl-1", "Halve 9.", "4.5", "9/2 = 4.5", "trl.jsonl"),
    ]


def test_generic_loader_verl_parquet(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(VERL_ROWS), path)
    problems = load_problems(path, id_field="extra_info.index", source="my_math")
    assert [(p.id, p.problem, p.answer, p.solution, p.source) for p in problems] == [
        ("10", "Compute 6*7.", "42", None, "my_math"),
        ("11", "Compute 10-1.", "9", None, "my_math"),
    ]


def test_generic_loader_explicit_fields_and_plain_jsonl(tmp_path):
    rows = [{"q": "1+1?", "meta": {"gold": 2.0}, "work": "1+1=2", "key": "a"}]
    problems = load_problems(
        write_jsonl(tmp_path / "mine.jsonl", rows),
        problem_field="q",
        answer_field="meta.gold",
        solution_field="work",
        id_field="key",
    )
    assert problems == [Problem("a", "1+1?", "2", "1+1=2", "mine.jsonl")]
    plain = [{"id": 5, "question": "3*3?", "final_answer": ["9"], "solution": None}]
    assert load_problems(write_jsonl(tmp_path / "plain.jsonl", plain)) == [
        Problem("5", "3*3?", "9", None, "plain.jsonl")
    ]


def test_generic_loader_parquet_matches_jsonl(tmp_path):
    rows = [{"problem": f"p{i}", "answer": str(i), "solution": f"s{i}"} for i in range(4)]
    from_jsonl = load_problems(write_jsonl(tmp_path / "d.jsonl", rows), source="d")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert load_problems(tmp_path / "d.parquet", source="d") == from_jsonl


def test_blank_lines_skipped_and_malformed_line_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"problem": "a", "answer": "1"}\n\n{"problem": "b", "answer": \n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"bad\.jsonl, line 3: malformed JSON"):
        load_problems(path)
    path.write_text(
        '{"problem": "a", "answer": "1"}\n\n   \n{"problem": "b", "answer": "2"}\n', encoding="utf-8"
    )
    assert [p.id for p in load_problems(path)] == ["bad.jsonl-0", "bad.jsonl-1"]
    path.write_text('{"problem": "a", "answer": "1"}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"bad\.jsonl, line 2: expected a JSON object"):
        load_problems(path)


def test_missing_and_empty_fields_named(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"problem": "a", "gt": "1"}, {"problem": "b"}])
    with pytest.raises(DataFormatError, match=r"rows\.jsonl, line 2: missing field 'gt'"):
        load_problems(path, answer_field="gt")
    with pytest.raises(DataFormatError, match=r"rows\.jsonl, line 1: no answer field; looked for answer"):
        load_problems(path)
    with pytest.raises(DataFormatError, match=r"line 1: missing field 'why'"):
        load_problems(path, answer_field="gt", solution_field="why")

    path = write_jsonl(
        tmp_path / "empty.jsonl", [{"problem": "a", "answer": "1"}, {"problem": "b", "answer": " "}]
    )
    with pytest.raises(DataFormatError, match=r"empty\.jsonl, line 2: empty answer"):
        load_problems(path)
    path = write_jsonl(tmp_path / "none.jsonl", [{"problem": "a", "answer": None}])
    with pytest.raises(DataFormatError, match=r"none\.jsonl, line 1: empty answer"):
        load_problems(path)
    path = write_jsonl(tmp_path / "noq.jsonl", [{"text": "a", "answer": "1"}])
    with pytest.raises(DataFormatError, match=r"noq\.jsonl, line 1: no problem field"):
        load_problems(path)


def test_parquet_errors_name_the_row(tmp_path):
    path = tmp_path / "rows.parquet"
    pq.write_table(
        pa.Table.from_pylist([{"problem": "a", "answer": "1"}, {"problem": "b", "answer": ""}]), path
    )
    with pytest.raises(DataFormatError, match=r"rows\.parquet, row 2: empty answer"):
        load_problems(path)


def test_duplicate_ids_rejected(tmp_path):
    rows = [{"id": 1, "problem": "a", "answer": "1"}, {"id": 2, "problem": "b", "answer": "2"}]
    rows.append({"id": 1, "problem": "c", "answer": "3"})
    with pytest.raises(DataFormatError, match=r"line 3: duplicate id '1' \(first at .*line 1\)"):
        load_problems(write_jsonl(tmp_path / "dup.jsonl", rows))


def test_benchmark_file_with_broken_row(tmp_path):
    folder = tmp_path / "gsm8k"
    folder.mkdir()
    write_jsonl(folder / "test.jsonl", [{"question": "q", "answer": "2+2=4\n#### 4"}, {"question": "q2"}])
    with pytest.raises(DataFormatError, match=r"test\.jsonl, line 2: missing field 'answer'"):
        load_benchmark("gsm8k", tmp_path)
    write_jsonl(folder / "test.jsonl", [{"question": "q", "answer": "the answer is 4"}])
    with pytest.raises(DataFormatError, match=r"line 1: .*'####'"):
        load_benchmark("gsm8k", tmp_path)


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("problem,answer\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match="unsupported file type"):
        load_problems(path)
