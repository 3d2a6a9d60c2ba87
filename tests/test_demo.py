"""The README's first command, in its quick form, end to end on the real SmolLM2-135M-Instruct."""

import json
import math
import os
import subprocess
import sys

import pytest

from selfdistill.demo import DemoSettings


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "selfdistill", "demo", "--quick", "--out", str(out)],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"report: {out / 'report.md'}" in " ".join(proc.stdout.split())
    report = (out / "report.md").read_text()
    assert "| Avg@k |" in report and "training.png" in report
    assert "Environment: selfdistill " in report  # the one-line provenance
    for name in ("training.png", "pass_at_k.png", "eval_before.jsonl", "eval_after.jsonl", "summary.json",
                 "train/config.json", "train/samples.jsonl", "adapter/adapter_model.safetensors",
                 "environment.json", "train/environment.json"):
        assert (out / name).exists(), name
    metrics = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == DemoSettings.quick().steps
    for row in metrics:
        assert all(math.isfinite(v) for v in row.values() if isinstance(v, float)), row
        assert "dasd/push_fraction" in row and "teacher_entropy" in row
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["after"]["macro"]["avg@n"] <= 1.0


def test_demo_settings_validate():
    with pytest.raises(ValueError, match="--method"):
        DemoSettings(method="sideways")
    with pytest.raises(ValueError, match="steps"):
        DemoSettings(steps=0)
    assert DemoSettings.quick(method="opsd").method == "opsd"
