"""What a run trains on and when: the problems `data.dataset` names, their order in each epoch, the seeds
derived from the run's seed, and the optimizer with its learning-rate schedule (warm-up + cosine)."""

from __future__ import annotations

import hashlib
import math
import random
from pathlib import Path

import torch

from selfdistill.config import ConfigError, OptimConfig, TrainConfig
from selfdistill.data import BENCHMARKS, SYNTHETIC_TASKS, Problem, load_benchmark, load_problems


def load_training_problems(config: TrainConfig) -> list[Problem]:
    """The problems named by `data.dataset`: `synthetic:<task>`, a benchmark name, or a file."""
    data = config.data
    if data.dataset.startswith("synthetic:"):
        task = data.dataset.split(":", 1)[1]
        if task not in SYNTHETIC_TASKS:
            raise ConfigError(f"data.dataset: unknown synthetic task {task!r}; choose one of {sorted(SYNTHETIC_TASKS)}")
        return SYNTHETIC_TASKS[task](data.num_problems, seed=config.optim.seed, **data.task_options)
    if data.dataset in BENCHMARKS:
        problems = load_benchmark(data.dataset, root=data.root, split=data.split)
    else:
        path = Path(data.dataset)
        if not path.exists():
            raise ConfigError(f"data.dataset: {data.dataset!r} is no synthetic task, benchmark or existing file")
        problems = load_problems(path)
    return problems[: data.num_problems] if data.num_problems else problems


def seed_for(*parts: int) -> int:
    """A 32-bit seed derived from `parts` (e.g. the run's seed and an epoch or a global prompt index)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def epoch_order(num_problems: int, epoch: int, seed: int, shuffle: bool) -> list[int]:
    """The order of the problems in `epoch`: shuffled by a seed of (`seed`, `epoch`), or as given."""
    order = list(range(num_problems))
    if shuffle:
        random.Random(seed_for(seed, epoch)).shuffle(order)
    return order


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay toward `min_ratio`, reached after the last step."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(
    params: list[torch.nn.Parameter], optim: OptimConfig
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over `params` (`optim.*`) and its schedule, `lr_factor` of the scheduler's step count."""
    # The fused kernel: one pass per parameter and no update-sized temporaries (the for-loop AdamW that is
    # torch's default on CPUs allocates a parameter-sized tensor per update).
    optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=optim.adam_betas, weight_decay=optim.weight_decay,
                                  fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(s, warmup_steps=optim.warmup_steps, total_steps=optim.steps, min_ratio=optim.min_lr_ratio),
    )
    return optimizer, scheduler
