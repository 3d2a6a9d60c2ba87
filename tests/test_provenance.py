"""What made a run (environment.json and its one line), progress lines in logs, and checkpoints that load
where a user would load them."""

from __future__ import annotations

import io
import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console

from selfdistill.cli import main as cli_main
from selfdistill.progress import Progress, StepProgress
from selfdistill.provenance import ENVIRONMENT_FILE, collect, git_state, record_environment, summary_line
from selfdistill.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


def run_cli(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    return int(exit_info.value.code)


# --------------------------------------------------------------------------------------------------
# provenance


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


# --------------------------------------------------------------------------------------------------
# progress in a log


def test_progress_writes_plain_lines_when_not_a_terminal():
    log = io.StringIO()
    with Progress(console=Console(file=log, force_terminal=False), log_every=0.05) as bar:
        task = bar.add_task("[bold]warm start", total=10, status="")
        for step in range(1, 4):
            bar.update(task, completed=step, status=f"[red]loss {1 / step:.3f}[/red]")
        time.sleep(0.3)
    lines = [line for line in log.getvalue().splitlines() if line.startswith("[")]
    assert lines, log.getvalue()
    assert lines[-1].endswith("] warm start: 3/10 (30%) | loss 0.333")  # markup stripped


def test_progress_on_a_terminal_or_quiet_writes_no_plain_lines():
    for console in (Console(file=io.StringIO(), force_terminal=True), Console(file=io.StringIO(), quiet=True)):
        with Progress(console=console, log_every=0.05) as bar:
            bar.add_task("eval", total=4)
            time.sleep(0.2)
        assert "eval: 0/4" not in console.file.getvalue()


def test_step_progress_lines_carry_the_training_status(monkeypatch, capsys):
    monkeypatch.setenv("SELFDISTILL_PROGRESS_EVERY", "0.05")
    with StepProgress(3) as bar:  # pytest's captured stdout is not a terminal
        bar.update({"reward": 0.25, "entropy": 1.5, "response_length": 7, "seconds": 0.5})
        time.sleep(0.3)
    out = capsys.readouterr().out
    assert "train: 1/3 (33%) | reward 0.250 | H 1.500 | len 7 | 0.5s/step" in out


# --------------------------------------------------------------------------------------------------
# run folders and checkpoints


def tiny_run(tmp_path: Path, **model) -> Path:
    from selfdistill.config import config_from_dict

    config = config_from_dict({
        "model": {"path": "tiny", **model},
        "data": {"dataset": "synthetic:operation_chains", "num_problems": 8},
        "rollout": {"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 8},
        "optim": {"steps": 1, "lr": 1e-3},
        "logging": {"output_dir": str(tmp_path / "run"), "progress": False, "tensorboard": False},
    })
    return Trainer(config, reward_fn=lambda texts, problems: [len(t) % 3 / 2 for t in texts]).run()


def write_tiny_benchmark(root: Path) -> Path:
    rows = [{"problem": f"What is {a} + {b}?", "solution": f"{a} + {b} = {a + b}.", "answer": str(a + b),
             "subject": "Arithmetic", "level": 1, "unique_id": f"sum/{a}-{b}"} for a, b in [(1, 2), (3, 4)]]
    (root / "math500").mkdir(parents=True)
    (root / "math500" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_full_fine_tuning_checkpoint_loads_with_from_pretrained_and_eval(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tiny_run(tmp_path)
    environment = json.loads((run / ENVIRONMENT_FILE).read_text())
    assert environment["packages"]["torch"] == torch.__version__
    checkpoint = sorted(run.glob("checkpoint-*"))[-1]
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    from safetensors.torch import load_file

    saved = load_file(str(checkpoint / "model.safetensors"))
    state = model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in saved.items())
    assert tokenizer("What is 1 + 2?").input_ids

    data = write_tiny_benchmark(tmp_path / "data")
    args = ["--benchmarks", "math500", "--n", "2", "--max-new-tokens", "6", "--data-root", str(data), "--no-progress"]
    assert run_cli(["eval", "--model", str(checkpoint), *args, "--out", str(tmp_path / "eval-ckpt")]) == 0
    assert run_cli(["eval", "--model", str(run), *args, "--out", str(tmp_path / "eval-run")]) == 0  # latest checkpoint
    rows = [(tmp_path / name / "samples.jsonl").read_text() for name in ("eval-ckpt", "eval-run")]
    assert rows[0] == rows[1] and len(rows[0].splitlines()) == 4
    assert (tmp_path / "eval-ckpt" / ENVIRONMENT_FILE).is_file()
    summary_md = (tmp_path / "eval-ckpt" / "summary.md").read_text()
    assert "Environment: selfdistill " in summary_md and f"torch {torch.__version__}" in summary_md


def test_a_lora_run_given_as_model_says_to_use_adapter(tmp_path, capsys):
    run = tiny_run(tmp_path, lora_rank=4)
    data = write_tiny_benchmark(tmp_path / "data")
    code = run_cli(["eval", "--model", str(run), "--benchmarks", "math500", "--data-root", str(data),
                    "--out", str(tmp_path / "eval")])
    assert code == 2
    assert "is a LoRA checkpoint: evaluate it as --model <the base model> --adapter" in capsys.readouterr().err


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
