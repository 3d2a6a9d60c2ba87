"""selfdistill.grading.files: `grade_file` verdicts and its errors naming file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selfdistill.grading import grade_file


def _write_jsonl(path: Path, rows: list) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_grade_file_writes_verdicts(tmp_path: Path) -> None:
    src = tmp_path / "run.jsonl"
    _write_jsonl(
        src,
        [
            {"out": r"so \boxed{0.5}", "gold": r"\frac12"},
            {"out": r"\boxed{3}", "gold": "4"},
            {"out": "no idea", "gold": 2},
        ],
    )
    summary = grade_file(src, completion_field="out", gold_field="gold")
    assert summary["n"] == 3 and summary["correct"] == 1
    assert summary["accuracy"] == pytest.approx(1 / 3)
    out = tmp_path / "run.graded.jsonl"
    assert summary["out_path"] == str(out)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["line"] for r in rows] == [1, 2, 3]
    assert [r["correct"] for r in rows] == [1.0, 0.0, 0.0]
    assert [r["status"] for r in rows] == ["verified", "mismatch", "no_answer"]
    assert rows[0]["extracted"] == "0.5" and rows[2]["gold"] == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.graded.jsonl", "run.jsonl"]  # no temp left


def test_grade_file_custom_out_path_and_blank_lines(tmp_path: Path) -> None:
    src = tmp_path / "a.jsonl"
    src.write_text('{"c": "\\\\boxed{1}", "g": "1"}\n\n', encoding="utf-8")
    out = tmp_path / "sub" / "verdicts.jsonl"
    assert grade_file(src, completion_field="c", gold_field="g", out_path=out)["correct"] == 1
    assert out.exists()


def test_grade_file_errors_name_file_and_line(tmp_path: Path) -> None:
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"c": "x", "g": "1"}\n{"c": oops}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        grade_file(bad_json, completion_field="c", gold_field="g")
    missing = tmp_path / "missing.jsonl"
    _write_jsonl(missing, [{"c": "x", "g": "1"}, {"c": "x", "g": "1"}, {"c": "y"}])
    with pytest.raises(ValueError, match=r"missing\.jsonl:3: missing field 'g'"):
        grade_file(missing, completion_field="c", gold_field="g")
    assert not (tmp_path / "missing.graded.jsonl").exists()
    assert not (tmp_path / "bad.graded.jsonl").exists()
