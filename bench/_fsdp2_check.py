"""One process of gpu_check.py's `fsdp2` check, started by `torchrun --nproc_per_node <GPUs>`: our trainer with
`distributed.strategy: fsdp2` on the built-in tiny model, dasd with an EMA teacher in bfloat16, 3 steps and a
checkpoint; writes what it found to <out>/rank<r>.json.

    torchrun --standalone --nproc_per_node 2 bench/_fsdp2_check.py OUT_FOLDER

What passes (each process): no step skipped and finite losses; every trained parameter, its gradient's shard and
the AdamW state float32 and sharded (DTensors on the accelerator's device; with one process the shard is the whole
tensor); every trained parameter moved; the output layer gathered in bfloat16 for the fused pass (the mixed
precision policy on a GPU); a checkpoint with the sharded state and a Hugging Face folder.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch
from _harness import trained_weights, training_problems

from selfdistill.config import config_from_dict
from selfdistill.forward import output_weight
from selfdistill.trainer import Trainer


def main(out: Path) -> None:
    rank = int(os.environ.get("RANK", "0"))
    config = config_from_dict({
        "model": {"path": "tiny", "dtype": "bfloat16"},
        "data": {"dataset": "synthetic:operation_chains", "num_problems": 16},
        "rollout": {"prompts_per_step": 4 * int(os.environ.get("WORLD_SIZE", "1")), "group_size": 4,
                    "max_new_tokens": 32},
        "objective": {"name": "dasd", "teacher": "ema"},
        "optim": {"steps": 3, "lr": 1e-4, "micro_batch_size": 8},
        "logging": {"output_dir": str(out / "run"), "progress": False, "tensorboard": False, "sample_every": 0},
        "distributed": {"strategy": "fsdp2"},
    })
    trainer = Trainer(config, reward_fn=lambda completions, problems: [(len(t) % 5) / 4 for t in completions])
    problems = []
    before = trained_weights(trainer)
    gathered_dtypes = set()
    real_fused_pass = trainer._fused_pass

    def watched(*args, **kwargs):  # inside the gathered block: the output weight as the fused pass reads it
        gathered_dtypes.add(str(output_weight(trainer.model).dtype))
        return real_fused_pass(*args, **kwargs)

    trainer._fused_pass = watched
    metrics = [trainer.train_step() for _ in range(3)]
    device = trainer.device
    for name, p in trainer.model.named_parameters():
        if not hasattr(p, "to_local"):
            problems.append(f"{name} is not sharded")
            break
        if p.requires_grad and (p.dtype != torch.float32 or p.to_local().device.type != device.type):
            problems.append(f"{name}: {p.dtype} on {p.to_local().device}")
            break
    problems += training_problems(trainer, before)
    if any(m["skipped"] for m in metrics) or not all(math.isfinite(m["loss"]) for m in metrics):
        problems.append(f"skipped or non-finite: {[(m['loss'], m['skipped']) for m in metrics]}")
    expected = "torch.bfloat16" if device.type == "cuda" else "torch.float32"
    if gathered_dtypes != {expected}:
        problems.append(f"the gathered output weight was {gathered_dtypes}, expected {expected}")
    checkpoint = trainer.save()
    if rank == 0 and not ((checkpoint / "sharded").is_dir() and (checkpoint / "model.safetensors").exists()):
        problems.append(f"checkpoint {checkpoint} lacks sharded/ or model.safetensors")
    trainer.grader.close()
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    result = {"rank": rank, "world": trainer.world, "device": str(device), "problems": problems,
              "losses": [m["loss"] for m in metrics], "seconds": [m["seconds"] for m in metrics], "peak_mib": peak}
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
