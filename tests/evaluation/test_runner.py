"""`selfdistill eval` / `report` and the runner behind them, on the real benchmark files.

The summary is checked against the metric functions applied to samples.jsonl; a run killed with
SIGKILL part-way (from inside, right after its k-th batch of records reached the disk) and resumed
gives the same samples and summary as an uninterrupted run; a half-written last line is dropped;
other settings into the same folder are an error; the report renders tables and PNGs.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import matplotlib.image
import pytest
import torch

from selfdistill.cli import main as cli_main
from selfdistill.data import load_benchmark
from selfdistill.evaluation.metrics import (
    avg_at_k,
    epistemic_density,
    macro_average,
    maj_at_k,
    pass_at_k_table,
    response_length,
    truncation_rate,
)
from selfdistill.evaluation.report import compare_runs, summary_markdown
from selfdistill.evaluation.runner import default_ks, evaluate_problems, problem_seed, summarize
from selfdistill.evaluation.store import EvalSettings, SampleRecord
from selfdistill.grading import normalize_answer
from selfdistill.models import load_model
from selfdistill.rollout import Rollouts, make_backend
from selfdistill.rollout.hf import HFBackend
from tests.evaluation.helpers import _record

# --batch-size 2: one problem per generate call, so a run writes several batches (resume tests kill it between).
TINY_ARGS = ["--model", "tiny", "--benchmarks", "math500,gsm8k", "--limit", "3", "--n", "2", "--max-new-tokens", "8",
             "--batch-size", "2"]


def run_cli(argv: list[str]) -> int:
    """`selfdistill ARGV` in this process; returns its exit code."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    return int(exit_info.value.code)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def check_summary_against_samples(run_dir: Path) -> dict:
    """Recompute every number of summary.json from samples.jsonl with the metric functions."""
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = read_jsonl(run_dir / "samples.jsonl")
    by_source: dict[str, dict[str, list[dict]]] = {}
    for row in rows:
        by_source.setdefault(row["source"], {}).setdefault(row["problem_id"], []).append(row)
    assert list(summary["benchmarks"]) == list(by_source)
    expected_rows = {}
    for source, problems in by_source.items():
        groups = [sorted(group, key=lambda r: r["sample_index"]) for group in problems.values()]
        n = len(groups[0])
        assert all([r["sample_index"] for r in group] == list(range(n)) for group in groups)
        correct = [[r["correct"] for r in group] for group in groups]
        answers = [[r["extracted"] for r in group] for group in groups]
        flat = [r for group in groups for r in group]
        ks = default_ks(n)
        expected = {
            "problems": len(groups),
            "n": n,
            "avg@n": avg_at_k(correct),
            **{f"pass@{k}": v for k, v in pass_at_k_table([int(sum(c)) for c in correct], n, ks).items()},
            "maj@n": maj_at_k(answers, correct, key=normalize_answer),
            "mean_length": response_length([r["num_tokens"] for r in flat])["mean"],
            "truncation_rate": truncation_rate([r["truncated"] for r in flat]),
            "epistemic_per_1k": sum(epistemic_density(r["completion"], r["num_tokens"]) for r in flat) / len(flat),
            "mean_entropy": sum(r["mean_entropy"] for r in flat) / len(flat),
        }
        got = summary["benchmarks"][source]
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-12), (source, key)
        expected_rows[source] = expected
    for key in ("avg@n", "pass@1", "pass@2", "maj@n", "mean_length", "truncation_rate", "mean_entropy"):
        macro = macro_average({source: row[key] for source, row in expected_rows.items()})
        assert summary["macro"][key] == pytest.approx(macro, abs=1e-12), key
    assert summary["macro"]["problems"] == sum(row["problems"] for row in expected_rows.values())
    return summary


def accuracy_table(summary: dict) -> dict:
    return {"benchmarks": summary["benchmarks"], "macro": summary["macro"]}


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, data_root) -> Path:
    """An uninterrupted tiny eval: math500 + gsm8k, 3 problems each, 2 samples of 8 tokens."""
    out = tmp_path_factory.mktemp("eval") / "full"
    assert run_cli(["eval", *TINY_ARGS, "--out", str(out), "--data-root", str(data_root), "--no-progress"]) == 0
    return out


def test_summarize_hand_worked():
    records = [
        # a: 1 of 4 correct; "1/2" gets two votes and is wrong
        _record("a", "p1", 0, 0.0, "1/2", tokens=10, text="Wait, maybe 1/2."),
        _record("a", "p1", 1, 0.0, "1/2", tokens=30),
        _record("a", "p1", 2, 1.0, "3", tokens=20, truncated=True),
        _record("a", "p1", 3, 0.0, None, tokens=40),
        # a: 3 of 4 correct, "\dfrac{1}{2}" and "\frac{1}{2}" vote together
        _record("a", "p2", 3, 1.0, "\\dfrac{1}{2}", entropy=3.0),
        _record("a", "p2", 0, 1.0, "\\frac{1}{2}"),
        _record("a", "p2", 1, 0.0, "2"),
        _record("a", "p2", 2, 1.0, "\\frac{1}{2}"),
        # b: one problem, 4 of 4 correct, no entropy on one sample -> no mean entropy for b
        *[_record("b", "q", j, 1.0, "7", entropy=None if j == 0 else 2.0) for j in range(4)],
    ]
    summary = summarize(records)
    a, b, macro = summary["benchmarks"]["a"], summary["benchmarks"]["b"], summary["macro"]
    assert list(summary["benchmarks"]) == ["a", "b"]
    assert (a["problems"], a["n"]) == (2, 4)
    assert a["avg@n"] == pytest.approx((0.25 + 0.75) / 2)
    # pass@2 = 1 - C(n-c,2)/C(n,2): c=1 -> 1 - 3/6 = 0.5; c=3 -> 1 - 0 = 1
    assert a["pass@2"] == pytest.approx(0.75)
    assert a["pass@4"] == pytest.approx(1.0)
    assert a["maj@n"] == pytest.approx(0.5)  # p1 votes "1/2" (wrong), p2 votes \frac{1}{2} (right)
    assert a["mean_length"] == pytest.approx((10 + 30 + 20 + 40 + 4 * 10) / 8)
    assert a["truncation_rate"] == pytest.approx(1 / 8)
    assert a["epistemic_per_1k"] == pytest.approx(1000 * 2 / 10 / 8)  # "Wait", "maybe" in 10 tokens
    assert a["epistemic_per_response"] == pytest.approx(2 / 8)
    assert a["mean_entropy"] == pytest.approx((7 * 1.0 + 3.0) / 8)
    assert b["avg@n"] == 1.0 and b["mean_entropy"] is None
    assert macro["avg@n"] == pytest.approx((0.5 + 1.0) / 2)
    assert macro["problems"] == 3 and macro["mean_entropy"] is None
    assert [key for key in a if key.startswith("pass@")] == ["pass@1", "pass@2", "pass@4"]
    assert list(summarize(records, ks=[1, 3])["benchmarks"]["a"]).count("pass@3") == 1
    assert default_ks(6) == [1, 2, 4, 6] and default_ks(1) == [1] and default_ks(16) == [1, 2, 4, 8, 16]
    markdown = summary_markdown(summary)
    assert "| **macro** | 3 | 4 | 75.0 |" in markdown


def test_summarize_rejects_unfinished_runs():
    with pytest.raises(ValueError, match="different numbers of samples"):
        summarize([_record("a", "p1", 0, 1.0, "1"), _record("a", "p1", 1, 1.0, "1"), _record("a", "p2", 0, 1.0, "1")])
    with pytest.raises(ValueError, match="duplicate"):
        summarize([_record("a", "p1", 0, 1.0, "1"), _record("a", "p1", 0, 1.0, "1")])
    with pytest.raises(ValueError):
        summarize([])


def test_samples_are_seeded_per_problem(tiny, data_root):
    model, tokenizer = tiny
    problems = load_benchmark("math500", data_root)[:2] + load_benchmark("gsm8k", data_root)[:1]
    kwargs = {"n": 2, "temperature": 1.0, "max_new_tokens": 6, "progress": False}
    together = evaluate_problems(model, tokenizer, problems, **kwargs)
    batches: list[list[SampleRecord]] = []
    # batch_size=2 rows: one problem per generate call, where `together` had all three in one call.
    alone = evaluate_problems(model, tokenizer, problems[2:] + problems[:1], on_records=batches.append,
                              batch_size=2, **kwargs)
    by_key = {r.key: r for r in together}
    assert [r.key for r in together] == [(p.source, p.id, j) for p in problems for j in range(2)]
    assert all(by_key[r.key].completion == r.completion for r in alone)  # order and company do not matter
    assert [len(batch) for batch in batches] == [2, 2] and [r for b in batches for r in b] == alone
    first_done = {(problems[0].source, problems[0].id, 0)}
    skipped = evaluate_problems(model, tokenizer, problems[:1], skip=first_done, **kwargs)
    assert [r.key for r in skipped] == [(problems[0].source, problems[0].id, 1)]
    assert skipped[0].completion == by_key[skipped[0].key].completion
    assert evaluate_problems(model, tokenizer, problems[:1], skip={r.key for r in together}, **kwargs) == []
    assert len({r.completion for r in together}) > 1  # the problems do not share one stream
    assert problem_seed(0, "math500", "a") == problem_seed(0, "math500", "a") != problem_seed(1, "math500", "a")
    with pytest.raises(ValueError, match="appears twice"):
        evaluate_problems(model, tokenizer, problems[:1] * 2, **kwargs)


def test_hf_token_entropy_matches_a_forward_pass(tiny):
    model, tokenizer = tiny
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]  # different lengths: the batch is left-padded
    temperature = 0.7
    backend = HFBackend(model, tokenizer, return_entropy=True)
    rollouts = backend.generate(prompts, num_samples=2, temperature=temperature, top_p=1.0, max_new_tokens=7, seed=3)
    assert rollouts.token_entropy is not None and rollouts.token_entropy.shape == rollouts.response_ids.shape
    for row in range(len(rollouts)):
        prompt = prompts[int(rollouts.prompt_index[row])]
        length = int(rollouts.lengths[row])
        ids = torch.tensor([prompt + rollouts.response_ids[row, :length].tolist()])  # [1, P + L]
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1 : len(prompt) - 1 + length]  # [L, V]
        log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)  # [L, V]
        expected = -(log_probs.exp() * log_probs).sum(-1)  # [L]
        torch.testing.assert_close(rollouts.token_entropy[row, :length], expected, atol=2e-4, rtol=1e-4)
        assert rollouts.token_entropy[row, length:].eq(0).all()
    assert HFBackend(model, tokenizer).generate(
        prompts, num_samples=1, temperature=1.0, top_p=1.0, max_new_tokens=3, seed=0
    ).token_entropy is None  # opt-in only
    with pytest.raises(ValueError, match="token_entropy"):
        Rollouts(**{**vars(rollouts), "token_entropy": rollouts.token_entropy[:, :-1]})


def test_eval_writes_files_and_consistent_summary(full_run):
    for name in ("settings.json", "samples.jsonl", "summary.json", "summary.md", "summary.csv"):
        assert (full_run / name).is_file(), name
    rows = read_jsonl(full_run / "samples.jsonl")
    assert len(rows) == 2 * 3 * 2
    assert set(rows[0]) == {"source", "problem_id", "sample_index", "completion", "extracted", "correct",
                            "num_tokens", "truncated", "mean_entropy"}
    assert all(1 <= r["num_tokens"] <= 8 and r["mean_entropy"] > 0 for r in rows)
    summary = check_summary_against_samples(full_run)
    assert summary["settings"]["n"] == 2 and summary["timing"]["new_samples"] == 12
    csv_lines = (full_run / "summary.csv").read_text().splitlines()
    assert csv_lines[0].startswith("benchmark,problems,n,avg@n,pass@1,pass@2,maj@n")
    assert [line.split(",")[0] for line in csv_lines[1:]] == ["math500", "gsm8k", "macro"]
    assert "| **macro** |" in (full_run / "summary.md").read_text()


def test_resume_after_sigkill_gives_the_same_run(full_run, tmp_path, data_root):
    out = tmp_path / "killed"
    script = tmp_path / "kill_after_two_batches.py"
    script.write_text(textwrap.dedent("""
        import os, signal, sys
        from selfdistill.cli import main
        from selfdistill.evaluation import runner

        real_evaluate = runner.evaluate_problems

        def evaluate_then_die(*args, on_records, **kwargs):
            calls = []

            def write_then_maybe_die(records):
                on_records(records)  # the real writer: the batch is on disk now
                calls.append(len(records))
                if len(calls) == 2:
                    os.kill(os.getpid(), signal.SIGKILL)

            return real_evaluate(*args, on_records=write_then_maybe_die, **kwargs)

        runner.evaluate_problems = evaluate_then_die
        main(sys.argv[1:])
    """))
    argv = ["eval", *TINY_ARGS, "--out", str(out), "--data-root", str(data_root), "--no-progress"]
    killed = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert len(read_jsonl(out / "samples.jsonl")) == 4 and not (out / "summary.json").exists()
    with (out / "samples.jsonl").open("a") as file:  # what a kill in the middle of a write leaves
        file.write('{"source": "gsm8k", "problem_id": "gsm8k-0", "sample_ind')

    assert run_cli(argv) == 0
    resumed = check_summary_against_samples(out)
    full = json.loads((full_run / "summary.json").read_text())
    assert accuracy_table(resumed) == accuracy_table(full)
    assert resumed["timing"]["resumed_samples"] == 4 and resumed["timing"]["new_samples"] == 8
    samples = {(r["source"], r["problem_id"], r["sample_index"]): r for r in read_jsonl(out / "samples.jsonl")}
    reference = {(r["source"], r["problem_id"], r["sample_index"]): r for r in read_jsonl(full_run / "samples.jsonl")}
    assert samples.keys() == reference.keys() and len(read_jsonl(out / "samples.jsonl")) == 12
    for key, row in reference.items():
        assert samples[key]["completion"] == row["completion"]
        assert samples[key]["mean_entropy"] == pytest.approx(row["mean_entropy"], abs=1e-5)
    # A finished folder re-run does no work and keeps the table.
    assert run_cli(argv) == 0
    again = json.loads((out / "summary.json").read_text())
    assert accuracy_table(again) == accuracy_table(full) and again["timing"]["new_samples"] == 0


def test_eval_with_a_lora_adapter(full_run, tmp_path, data_root):
    from peft import LoraConfig, get_peft_model

    base, _ = load_model("tiny")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    get_peft_model(base, config).save_pretrained(tmp_path / "adapter")
    out = tmp_path / "adapted"
    argv = ["eval", *TINY_ARGS, "--adapter", str(tmp_path / "adapter"), "--out", str(out)]
    assert run_cli([*argv, "--data-root", str(data_root), "--no-progress"]) == 0
    check_summary_against_samples(out)
    assert json.loads((out / "settings.json").read_text())["adapter"] == str(tmp_path / "adapter")
    adapted = [r["completion"] for r in read_jsonl(out / "samples.jsonl")]
    assert adapted != [r["completion"] for r in read_jsonl(full_run / "samples.jsonl")]  # the adapter acts
    assert run_cli(["eval", *TINY_ARGS, "--adapter", str(tmp_path), "--out", str(tmp_path / "x"),
                    "--data-root", str(data_root), "--no-progress"]) == 2  # not an adapter folder
    assert not (tmp_path / "x").exists()  # checked before the run folder is made


def test_other_settings_into_the_same_folder_is_an_error(full_run, data_root, capsys):
    before = (full_run / "samples.jsonl").read_text()
    argv = ["eval", *TINY_ARGS, "--out", str(full_run), "--data-root", str(data_root), "--no-progress"]
    changed = [*argv[: argv.index("--n")], "--n", "3", *argv[argv.index("--n") + 2 :]]
    assert run_cli(changed) == 2
    error = capsys.readouterr().err
    assert "n: 2 in the folder, 3 now" in error and "max_new_tokens" not in error
    assert run_cli([*argv, "--temperature", "1.0"]) == 2
    assert "temperature: 0.6 in the folder, 1.0 now" in capsys.readouterr().err
    assert (full_run / "samples.jsonl").read_text() == before


def test_settings_validation_and_vllm_message(tmp_path, data_root, capsys):
    with pytest.raises(ValueError, match="unknown benchmarks"):
        EvalSettings(model="tiny", benchmarks=("math5000",))
    assert run_cli(["eval", "--model", "tiny", "--benchmarks", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown benchmarks" in capsys.readouterr().err
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"pip install selfdistill\[vllm\]"):
            make_backend("vllm", "some/folder", None)


def test_report_renders_tables_and_plots(full_run, tmp_path, data_root, capsys):
    hot = tmp_path / "hot"
    argv = ["eval", *TINY_ARGS, "--temperature", "1.5", "--out", str(hot), "--data-root", str(data_root)]
    assert run_cli([*argv, "--no-progress"]) == 0
    capsys.readouterr()
    out = tmp_path / "report"
    assert run_cli(["report", str(full_run), str(hot), "--out", str(out), "--labels", "cool,hot"]) == 0
    printed = capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert "| cool |" in printed and report in printed
    for section in ("## macro", "## math500", "## gsm8k"):
        block = report.split(section, 1)[1].split("##", 1)[0]
        assert "| cool |" in block and "| hot |" in block and "pass@2" in block
    hot_length = json.loads((hot / "summary.json").read_text())["benchmarks"]["gsm8k"]["mean_length"]
    assert f"| hot | 3 | 2 | 0.0 | 0.0 | 0.0 | 0.0 | {hot_length:.1f} |" in report
    for name in ("pass_at_k.png", "lengths.png", "epistemic.png"):
        image = matplotlib.image.imread(out / name)
        assert image.shape[0] > 300 and image.shape[1] > 800, name
        assert f"]({name})" in report
    files = compare_runs([full_run, hot], tmp_path / "default_labels")
    assert "| full |" in files["report"].read_text()
    with pytest.raises(FileNotFoundError, match="summary.json"):
        compare_runs([tmp_path], tmp_path / "bad")


@pytest.mark.slow
def test_smollm2_gsm8k_eval_and_resume(tmp_path, data_root):
    args = ["--model", "smollm2", "--benchmarks", "gsm8k", "--limit", "5", "--n", "2", "--max-new-tokens", "64",
            "--temperature", "0.6", "--data-root", str(data_root), "--no-progress"]
    full = tmp_path / "full"
    assert run_cli(["eval", *args, "--out", str(full)]) == 0
    summary = check_summary_against_samples(full)
    rows = read_jsonl(full / "samples.jsonl")
    assert len(rows) == 10 and all(1 <= r["num_tokens"] <= 64 for r in rows)
    assert all(0.0 < r["mean_entropy"] < math.log(49152) for r in rows)
    # Resume: keep the first problem's samples and half of a line, as a kill would leave them.
    part = tmp_path / "part"
    part.mkdir()
    (part / "settings.json").write_text((full / "settings.json").read_text())
    lines = (full / "samples.jsonl").read_text().splitlines(keepends=True)
    (part / "samples.jsonl").write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])
    assert run_cli(["eval", *args, "--out", str(part)]) == 0
    resumed = check_summary_against_samples(part)
    # The resumed run decodes the other four problems in a smaller batch than the full run did: the same
    # samples, with logits (and so entropies) equal up to the floating-point differences of the batched
    # forward pass (SmolLM2, 30 layers), as the rollout backend documents.
    table, resumed_table = accuracy_table(summary), accuracy_table(resumed)
    assert resumed_table.keys() == table.keys()
    for part_name, rows in table.items():
        for name, metrics in rows.items():
            assert resumed_table[part_name][name] == pytest.approx(metrics, rel=1e-5), (part_name, name)
    assert resumed["timing"]["resumed_samples"] == 2
    # The half line was replaced, not kept; every sample is the uninterrupted run's (floats to 1e-5).
    full_rows, part_rows = read_jsonl(full / "samples.jsonl"), read_jsonl(part / "samples.jsonl")
    assert len(part_rows) == len(full_rows)
    for got, want in zip(part_rows, full_rows, strict=True):
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == (pytest.approx(value, rel=1e-5) if isinstance(value, float) else value), key
