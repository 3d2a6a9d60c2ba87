"""The trainer's set-up, checked and decided once before the first step: the launchers it refuses, how the
processes split a step, the trained model made ready (LoRA, sparse embedding gradient, gradient checkpointing),
how micro-batches are packed, and every prompt checked."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from selfdistill.config import ConfigError, ModelConfig, TrainConfig
from selfdistill.data import Problem
from selfdistill.forward import pack, pack_shared, shared_prefix_blocker
from selfdistill.prompts import PromptBuilder

if TYPE_CHECKING:
    from accelerate.utils import DistributedType

log = logging.getLogger(__name__)


def refuse_sharding(kind: DistributedType) -> None:
    """accelerate's FSDP and DeepSpeed plugins are not wired into this trainer (it shards with FSDP2 itself, under
    `distributed.strategy: fsdp2`): refuse them rather than run a replica under a sharding launcher. `kind`: the
    accelerator's `distributed_type`."""
    from accelerate.utils import DistributedType

    if kind in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        raise ConfigError(f"accelerate launch: {kind.value} is not supported by selfdistill's own trainer; launch "
                          "plain processes (torchrun, or accelerate launch --multi_gpu) and set "
                          "distributed.strategy=fsdp2 to shard the model, or use the TRL route, "
                          "selfdistill.integrations.trl, which runs under TRL's FSDP / DeepSpeed support")


def check_process_split(config: TrainConfig, world: int) -> None:
    """A step's prompts must split evenly over the `world` processes, and each process's rollouts into
    `optim.mini_batches` parts."""
    if config.rollout.prompts_per_step % world:
        raise ConfigError(f"rollout.prompts_per_step={config.rollout.prompts_per_step} must be divisible by "
                          f"the number of processes ({world})")
    rows_per_process = config.rollout.prompts_per_step // world * config.rollout.group_size
    if config.optim.mini_batches > rows_per_process:
        raise ConfigError(f"optim.mini_batches={config.optim.mini_batches} exceeds the {rows_per_process} rollouts "
                          f"each of the {world} processes has per step")


def prepare_model(model: torch.nn.Module, cfg: ModelConfig) -> torch.nn.Module:
    """`model` made ready to train under `cfg` (`model.*`): LoRA adapters when `lora_rank > 0`, a sparse gradient
    for a trained embedding, gradient checkpointing when asked for; in train mode."""
    if cfg.lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        targets = [t for t in cfg.lora_targets if t in names]
        if not targets:
            raise ConfigError(f"model.lora_targets: none of {cfg.lora_targets} is a module of this model")
        head = model.get_output_embeddings()
        head_names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if module is head}
        if head_names & set(targets):
            raise ConfigError(f"model.lora_targets: {sorted(head_names & set(targets))} is the output layer; the "
                              "fused token statistics use its base weight, so an adapter there would never "
                              "learn. Leave it out (or train it fully with lora_rank 0)")
        lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=targets, bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    embedding = model.get_input_embeddings()
    if isinstance(embedding, torch.nn.Embedding) and embedding.weight.requires_grad:
        # A sparse gradient (the rows looked up), added by autograd into the dense .grad that `Trainer._update`
        # makes first: no dense [V,d] embedding gradient is formed per backward pass.
        embedding.sparse = True
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora_rank > 0:
            model.enable_input_require_grads()
    model.train()
    return model


def choose_packing(model: torch.nn.Module, *, shared_prefix: bool, has_teacher: bool,
                   sharded: bool = False) -> tuple[Callable, Callable]:
    """How micro-batches are packed for the student and for the teacher: `pack_shared` (each distinct
    prompt runs once) where `shared_prefix` (`optim.shared_prefix`) is on and `model` (the prepared one)
    allows it, else `pack`. Decided here only (the trainer calls them as its `pack_student` / `pack_teacher`);
    a shared prefix the model does not allow is logged with the reason (for the teacher only when there is one).
    `sharded` (fsdp2): responses padded to 2 columns at least, so every process makes the same decoder calls."""
    if not shared_prefix:
        return pack, pack
    shared = functools.partial(pack_shared, min_response_width=2) if sharded else pack_shared
    packing = []
    for role, backward in (("student", True), ("teacher", False)):
        blocker = shared_prefix_blocker(model, backward=backward)
        if blocker is not None and (role == "student" or has_teacher):
            log.warning("optim.shared_prefix: the %s forward packs every row's prompt in full: %s", role, blocker)
        packing.append(pack if blocker else shared)
    return packing[0], packing[1]


def check_prompts(prompts: PromptBuilder, problems: list[Problem], *, needs_teacher: bool) -> None:
    """Fail before the first rollout if any prompt is over the limit or lacks its context."""
    for problem in problems:
        prompts.student_ids(problem)
        if needs_teacher and prompts.template.context != "sibling":
            prompts.teacher_ids(problem)
