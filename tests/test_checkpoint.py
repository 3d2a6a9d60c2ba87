"""Checkpoints load where a user would load them: from_pretrained and eval; a LoRA run points to its adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from selfdistill.cli import main as cli_main
from selfdistill.provenance import ENVIRONMENT_FILE
from selfdistill.trainer import Trainer


def run_cli(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    return int(exit_info.value.code)


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
