"""write_json_atomic / write_text_atomic: whole files or none, nothing left beside them."""

from __future__ import annotations

import json

import pytest

from selfdistill.atomic import write_json_atomic, write_text_atomic


def test_json_is_written_whole_and_replaces_the_old_file(tmp_path) -> None:
    path = tmp_path / "summary.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"b": "ü", "c": [1.5]}, indent=2)
    assert json.loads(path.read_text(encoding="utf-8")) == {"b": "ü", "c": [1.5]}
    assert path.read_text(encoding="utf-8").endswith("]\n}\n") and "ü" in path.read_text(encoding="utf-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_a_value_that_cannot_be_written_leaves_the_old_file_untouched(tmp_path) -> None:
    path = tmp_path / "eval.json"
    write_json_atomic(path, {"kept": True})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"kept": True}
    write_text_atomic(path, "plain\n")
    assert path.read_text() == "plain\n"
