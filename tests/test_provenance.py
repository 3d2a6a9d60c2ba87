"""What made a run: environment.json and its one line, also when a study writes into a log file."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import torch

from selfdistill.provenance import ENVIRONMENT_FILE, collect, git_state, record_environment, summary_line

REPO = Path(__file__).resolve().parents[1]


def test_collect_names_versions_threads_blas_and_hardware():
    record = collect()
    assert record["packages"]["torch"] == torch.__version__
    import transformers

    assert record["packages"]["transformers"] == transformers.__version__
    assert set(record["packages"]) >= {"torch", "transformers", "peft", "accelerate", "trl"}
    assert record["torch_threads"] == torch.get_num_threads()
    assert record["blas"] and record["hardware"]["cpu"] and record["python"].count(".") == 2
    if torch.cuda.is_available():
        assert record["hardware"]["gpus"] == [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    json.dumps(record)  # JSON-ready

    line = summary_line(record)
    assert "\n" not in line
    assert f"torch {torch.__version__}" in line and f"transformers {transformers.__version__}" in line
    assert f"{torch.get_num_threads()} threads, BLAS {record['blas']}" in line


def test_git_state_commit_and_dirty_flag(tmp_path):
    assert git_state(tmp_path) is None  # not a checkout
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "a.txt").write_text("one\n")
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert git_state(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "untracked.txt").write_text("x")
    assert git_state(tmp_path)["dirty"] is False  # untracked files (run folders) do not count
    (tmp_path / "a.txt").write_text("two\n")
    assert git_state(tmp_path) == {"commit": head, "dirty": True}
    line = summary_line({**collect(), "git": git_state(tmp_path)})
    assert f"@ {head[:10]} (dirty)" in line


def test_record_environment_keeps_earlier_records(tmp_path):
    first = record_environment(tmp_path)
    second = record_environment(tmp_path)
    stored = json.loads((tmp_path / ENVIRONMENT_FILE).read_text())
    assert stored["time"] == second["time"] and [r["time"] for r in stored["previous"]] == [first["time"]]


def test_study_into_a_log_file_reports_progress_and_records_its_environment(tmp_path):
    """`selfdistill study` with its output redirected to a file says where its warm start is while it runs
    (it used to print nothing until the end), and its folder records what made it from the start. The
    study is stopped once that is seen."""
    import os
    import sys

    out, log = tmp_path / "study", tmp_path / "study.log"
    env = {**os.environ, "SELFDISTILL_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "SELFDISTILL_PROGRESS_EVERY": "1"}
    # --rebuild-warm-start: the quick study uses the shipped warm start; this trains one, so there is progress
    argv = [sys.executable, "-m", "selfdistill", "study", "--quick", "--methods", "grpo", "--rebuild-warm-start",
            "--out", str(out)]
    with log.open("w") as file:
        process = subprocess.Popen(argv, env=env, cwd=REPO, stdout=file, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and process.poll() is None:
                if [line for line in log.read_text().splitlines() if "] warm start: " in line and "%)" in line]:
                    break
                time.sleep(0.5)
        finally:
            process.terminate()
            process.wait(timeout=60)
    lines = log.read_text().splitlines()
    assert [line for line in lines if re.search(r"^\[\d+:\d\d\] warm start: \d+/\d+ \(\d+%\)", line)], lines[:20]
    assert json.loads((out / ENVIRONMENT_FILE).read_text())["packages"]["torch"] == torch.__version__
