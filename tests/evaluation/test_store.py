"""selfdistill.evaluation.store: reading back samples.jsonl after an interrupted write."""

from __future__ import annotations

import json

import pytest

from selfdistill.evaluation.store import load_records
from tests.evaluation.helpers import _record


def test_load_records_drops_only_a_half_written_last_line(tmp_path):
    path = tmp_path / "samples.jsonl"
    record = _record("a", "p", 0, 1.0, "1")
    line = json.dumps(record.__dict__) + "\n"
    path.write_text(line + line.replace('"sample_index": 0', '"sample_index": 1') + '{"source": "a", "pro')
    assert [r.sample_index for r in load_records(path)] == [0, 1]
    assert path.read_text().endswith('"pro')  # untouched without repair
    assert len(load_records(path, repair=True)) == 2 and path.read_text().endswith("}\n")
    path.write_text(line + "not json\n" + line)
    with pytest.raises(ValueError, match="line 2"):
        load_records(path)
