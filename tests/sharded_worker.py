"""Worker of tests/test_parallel.py: trains the tiny model on replayed rollouts, one case after another, and writes what
each optimizer update did (loss, gradient norm, the gathered weights after it) for the test to compare.

    python tests/sharded_worker.py --out DIR --record REPLAY_DIR --cases dasd,opsd      # 1 process: sample, record
    torchrun --nproc_per_node 2 tests/sharded_worker.py --out DIR --replay REPLAY_DIR --strategy fsdp2 ...
    ... --resume DIR/opsd_ema/checkpoint-000001 --out OTHER_DIR                          # continue a run

Why replay: two runs sample the same rollouts only while every logit they compute is bit-equal; once the sharded
run's sums round differently, a sampled token flips and the runs part (see issue #26). So the reference run (one
process) records the rollouts it sampled, per global prompt index, and the run under test reads them back
instead of sampling: both update on the same rollouts, and any difference left is the update's own.

`--check-shards` also checks, before and after every optimizer step of a sharded run, that no parameter, gradient,
AdamW state tensor or EMA-teacher tensor is held whole on a process (its local size is its 1/N share).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import torch

from selfdistill.config import config_from_dict
from selfdistill.scoring import RolloutGroup
from selfdistill.trainer import Trainer

CASES = {
    "dasd": {"objective": {"name": "dasd"}},
    "opsd": {"objective": {"name": "opsd"}},
    # PPO mini-batches in the same consecutive parts every epoch: shuffled, each process draws from its own rows,
    # so the parts would depend on the process count (see `optim.shuffle_minibatches`)
    "grpo": {"objective": {"name": "grpo"},
             "optim": {"ppo_epochs": 2, "mini_batches": 2, "shuffle_minibatches": False}},
    "opsd_ema": {"objective": {"name": "opsd", "teacher": "ema", "ema_decay": 0.5}},
    "dasd_live": {"objective": {"name": "dasd", "teacher": "live"}},
    "opsd_lora": {"objective": {"name": "opsd"}, "model": {"lora_rank": 4, "lora_alpha": 8.0}},
    # activations recomputed in the backward pass: each decoder layer's forward runs again there, and FSDP2
    # gathers its weights again for it
    "opsd_recompute": {"objective": {"name": "opsd"}, "model": {"gradient_checkpointing": True}},
    # the output layer as its own FSDP unit (the tiny model ties it to the embedding): a copy with it untied
    "opsd_untied": {"objective": {"name": "opsd"}, "model": {"path": "UNTIED"}},
    # the scoring pass with a teacher: its output weight kept (copied) for the updates; one rollout step (4 updates:
    # beyond them dasd's float noise between the layouts grows past the tolerances, under DDP as under FSDP2)
    "dasd_ppo": {"objective": {"name": "dasd"},
                 "optim": {"ppo_epochs": 2, "mini_batches": 2, "steps": 1, "shuffle_minibatches": False}},
}


def untied_tiny(folder: Path) -> Path:
    """The tiny model with its output layer untied from the embedding (a copy of it), written once to `folder`."""
    if not (folder / "config.json").exists():
        from selfdistill.models import load_model

        tied, tokenizer = load_model("tiny")
        config = tied.config
        config.tie_word_embeddings = False
        untied = type(tied)(config)
        untied.load_state_dict(tied.state_dict(), strict=False)
        untied.lm_head.weight.data.copy_(tied.get_input_embeddings().weight.data)
        untied.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def case_config(case: str, strategy: str, out: Path, steps: int, checkpoint_every: int = 0,
                untied: Path | None = None):
    values = {
        "model": {"path": "tiny"},
        "data": {"dataset": "synthetic:operation_chains", "num_problems": 16},
        "rollout": {"prompts_per_step": 4, "group_size": 2, "max_new_tokens": 10},
        "optim": {"steps": steps, "lr": 1e-3, "micro_batch_size": 3, "chunk_tokens": 16},
        "logging": {"output_dir": str(out / case), "progress": False, "tensorboard": False,
                    "checkpoint_every": checkpoint_every, "keep_checkpoints": 10},
        "distributed": {"strategy": strategy},
    }
    for section, entries in CASES[case].items():
        values.setdefault(section, {}).update(entries)
    if values["model"]["path"] == "UNTIED":
        values["model"]["path"] = str(untied)
    return config_from_dict(values)


def length_reward(completions, problems):
    return [(len(text) % 5) / 4 for text in completions]


class ReplayTrainer(Trainer):
    """The trainer with its rollouts recorded to, or replayed from, `replay_file` (per global prompt index), and
    every optimizer update's loss, gradient norm and gathered weights kept in `self.updates`."""

    def __init__(self, *args, replay_file: Path, record: bool, check_shards: bool, **kwargs):
        self.replay_file, self.record = replay_file, record
        self.recorded = {} if record else json.loads(replay_file.read_text())
        self.check_shards = check_shards
        self.updates: list[dict] = []
        self.violations: list[str] = []
        super().__init__(*args, **kwargs)

    def _rollouts(self, picked):
        if self.record:
            group = super()._rollouts(picked)
            for p, (k, _) in enumerate(picked):
                rows = [r for r, q in enumerate(group.prompt_of_row) if q == p]
                self.recorded[str(k)] = [[group.responses[r], group.texts[r], group.truncated[r],
                                          float(group.rewards[r])] for r in rows]
            self.replay_file.write_text(json.dumps(self.recorded))
            return group
        prompt_of_row, responses, texts, truncated, rewards = [], [], [], [], []
        for p, (k, _) in enumerate(picked):
            for response, text, cut, reward in self.recorded[str(k)]:
                prompt_of_row.append(p)
                responses.append(response)
                texts.append(text)
                truncated.append(cut)
                rewards.append(reward)
        return RolloutGroup([problem for _, problem in picked], prompt_of_row, responses, texts, truncated,
                            torch.tensor(rewards, dtype=torch.float32))

    def _optimizer_update(self, *args, **kwargs):
        if self.check_shards:
            real_step = self.optimizer.step

            def checked_step(*a, **k):
                self._check_local("before the step", with_grads=True)
                out = real_step(*a, **k)
                self._check_local("after the step", with_grads=False)
                return out

            self.optimizer.step = checked_step
        loss, grad_norm, skipped = super()._optimizer_update(*args, **kwargs)
        if self.check_shards:
            del self.optimizer.step
        record = {"step": self.step, "loss": loss, "grad_norm": grad_norm, "skipped": skipped,
                  "weights": self.parallel.full_state_dict(self.model)}
        self.updates.append(record)
        return loss, grad_norm, skipped

    def train_step(self):
        metrics = super().train_step()
        if self.teacher is not None and self.teacher.mode == "ema":
            self.updates[-1]["teacher"] = self.parallel.full_state_dict(self.teacher.copy)
        return metrics

    def _check_local(self, when: str, *, with_grads: bool) -> None:
        """Every trained tensor a 1/N shard: a DTensor whose local first dimension is at most ceil(dim0 / N)."""
        tensors = []
        for name, p in self.model.named_parameters():
            tensors.append((f"parameter {name}", p))
            if with_grads and p.requires_grad:
                if p.grad is None:
                    self.violations.append(f"{when}: {name} has no gradient")
                else:
                    tensors.append((f"gradient {name}", p.grad))
        for p in self.params:
            for key, value in self.optimizer.state.get(p, {}).items():
                if key != "step":
                    tensors.append((f"AdamW {key}", value))
        if self.teacher is not None and self.teacher.copy is not None:
            tensors += [(f"teacher {name}", p) for name, p in self.teacher.copy.named_parameters()]
        world = self.world
        for label, t in tensors:
            if not hasattr(t, "to_local"):
                self.violations.append(f"{when}: {label} is a plain tensor of shape {tuple(t.shape)}")
                continue
            local = t.to_local()
            share = math.ceil(t.shape[0] / world) * math.prod(t.shape[1:])
            if local.numel() > share or (world > 1 and local.numel() == t.numel()):
                self.violations.append(f"{when}: {label} holds {local.numel()} of {t.numel()} entries locally")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--record", type=Path, help="sample, and record the rollouts in this folder")
    parser.add_argument("--replay", type=Path, help="replay the rollouts recorded in this folder")
    parser.add_argument("--check-shards", action="store_true")
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--resume", type=Path, help="continue from this checkpoint (one case)")
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    for case in args.cases.split(","):
        replay_dir = args.record or args.replay
        replay_dir.mkdir(parents=True, exist_ok=True)
        config = case_config(case, args.strategy, args.out, args.steps, args.checkpoint_every,
                             untied=untied_tiny(replay_dir / "tiny-untied") if case == "opsd_untied" else None)
        trainer = ReplayTrainer(config, reward_fn=length_reward, resume=args.resume,
                                replay_file=replay_dir / f"{case}.json", record=args.record is not None,
                                check_shards=args.check_shards)
        trainer.run()
        trainer_world = trainer.world
        (args.out / f"{case}.violations.{rank}.json").write_text(json.dumps(trainer.violations))
        if rank == 0:
            torch.save({"updates": trainer.updates, "world": trainer_world}, args.out / f"{case}.pt")


if __name__ == "__main__":
    main()
