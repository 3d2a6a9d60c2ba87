"""Checkpoints written atomically: a run killed mid-write resumes from the previous complete one.

Layout of `<run>/checkpoint-<step>/`:
    model.safetensors | adapter/      full weights, or the LoRA adapter (loadable with peft)
    config.json, generation_config.json, tokenizer files
                                      full fine-tuning: the folder is a Hugging Face model folder, so
                                      `AutoModelForCausalLM.from_pretrained(checkpoint)` and
                                      `selfdistill eval --model checkpoint` open it
    teacher.safetensors               the EMA teacher (ema mode only)
    sharded/                          distributed.strategy fsdp2 instead of teacher.safetensors and optimizer.pt:
                                      each process's shards of the trained weights, AdamW state and EMA teacher
                                      (torch.distributed.checkpoint), loadable by any number of processes; the
                                      whole weights are still written as above, gathered on the first process
    optimizer.pt, scheduler.pt        state dicts (loaded with weights_only=True)
    state.json                        step, data cursor, RNG states, config
    COMPLETE                          written last; a folder without it is ignored
Everything is first written to `checkpoint-<step>.tmp`, then renamed into place.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

PREFIX = "checkpoint-"
MARKER = "COMPLETE"


@dataclass
class TrainingState:
    """What, beside tensors, a run needs to continue exactly."""

    step: int
    cursor: int
    config: dict[str, Any]


def _is_lora(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config")


def save_weights(model: torch.nn.Module, folder: Path, tokenizer: Any = None, *,
                 state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """The trainable weights: a peft adapter folder under LoRA; else a Hugging Face model folder (config,
    `model.safetensors`, and the tokenizer when given) that `from_pretrained` opens. `state_dict`: the whole
    weights gathered by the caller (a sharded model's), written instead of the model's own tensors."""
    tensors = {} if state_dict is None else {"state_dict": state_dict}
    if _is_lora(model):
        model.save_pretrained(folder / "adapter", safe_serialization=True, **tensors)
    elif hasattr(model, "save_pretrained"):
        model.save_pretrained(folder, safe_serialization=True, **tensors)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
    elif state_dict is None:
        save_model(model, str(folder / "model.safetensors"))
    else:
        save_file(state_dict, str(folder / "model.safetensors"))


def load_weights(model: torch.nn.Module, folder: Path) -> None:
    if _is_lora(model):
        from peft import set_peft_model_state_dict

        state = load_file(str(folder / "adapter" / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(model, state)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"{folder}: adapter keys do not match the model: {result.unexpected_keys[:5]}")
    else:
        missing, unexpected = load_model(model, str(folder / "model.safetensors"), strict=True)
        if missing or unexpected:
            raise ValueError(f"{folder}: weights do not match the model (missing {missing}, unexpected {unexpected})")


def save_checkpoint(
    run_dir: Path,
    state: TrainingState,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    teacher_state: dict[str, torch.Tensor] | None,
    keep: int,
    tokenizer: Any = None,
) -> Path:
    """Write `<run>/checkpoint-<step>` atomically and keep only the last `keep` checkpoints. With full
    fine-tuning and a `tokenizer`, the checkpoint is a complete Hugging Face model folder."""
    final = run_dir / f"{PREFIX}{state.step:06d}"
    tmp = run_dir / f"{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_weights(model, tmp, tokenizer)
    if teacher_state is not None:
        tensors = {k: v.detach().clone().contiguous() for k, v in teacher_state.items()}  # unshare tied weights
        save_file(tensors, str(tmp / "teacher.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    return _finish_checkpoint(tmp, final, state, scheduler=scheduler, keep=keep)


def _finish_checkpoint(tmp: Path, final: Path, state: TrainingState, *, scheduler: Any, keep: int,
                       **extra: Any) -> Path:
    """Add the schedule, RNG and step (`extra` into state.json) to the finished `tmp` folder, mark it complete,
    rename it to `final`, and keep only the last `keep` checkpoints of its run."""
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
    payload = {"step": state.step, "cursor": state.cursor, "config": state.config,
               "python_random": _jsonable(random.getstate()), **extra}
    (tmp / "state.json").write_text(json.dumps(payload, indent=1))
    (tmp / MARKER).write_text("ok\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in complete_checkpoints(final.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, tuple | list) else value


def _tuplify(value: Any) -> Any:
    return tuple(_tuplify(v) for v in value) if isinstance(value, list) else value


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    found = [p for p in Path(run_dir).glob(f"{PREFIX}*") if p.is_dir() and (p / MARKER).exists()
             and not p.name.endswith(".tmp")]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or the latest complete checkpoint of a run folder."""
    path = Path(path)
    if (path / MARKER).exists():
        return path
    found = complete_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"{path}: no complete checkpoint (folders named {PREFIX}<step> with a {MARKER} file)")
    return found[-1]


def read_state(checkpoint: Path) -> TrainingState:
    payload = json.loads((checkpoint / "state.json").read_text())
    return TrainingState(step=payload["step"], cursor=payload["cursor"], config=payload["config"])


def load_checkpoint(
    checkpoint: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> tuple[TrainingState, dict[str, torch.Tensor] | None]:
    """Restore weights, optimizer, scheduler and RNG states; returns the state and the EMA teacher."""
    load_weights(model, checkpoint)
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True))
    teacher_file = checkpoint / "teacher.safetensors"
    teacher = load_file(str(teacher_file)) if teacher_file.exists() else None
    return _restore_progress(checkpoint, scheduler), teacher


def _restore_progress(checkpoint: Path, scheduler: Any) -> TrainingState:
    """What `_finish_checkpoint` wrote: the schedule and the RNG states restored; the step, cursor and config."""
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))
    torch.set_rng_state(torch.load(checkpoint / "rng.pt", weights_only=True)["torch"])
    payload = json.loads((checkpoint / "state.json").read_text())
    random.setstate(_tuplify(payload["python_random"]))
    return read_state(checkpoint)


# --------------------------------------------------------------------------------------------
# Sharded checkpoints (distributed.strategy: fsdp2)


def save_sharded_checkpoint(
    run_dir: Path,
    state: TrainingState,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    teacher_model: torch.nn.Module | None,
    full_state: dict[str, torch.Tensor],
    keep: int,
    tokenizer: Any = None,
) -> Path | None:
    """Every process writes its shards of the weights, AdamW state and EMA teacher (`teacher_model`, or None)
    with `torch.distributed.checkpoint` into `<checkpoint>/sharded/`; the first process adds the whole weights
    `full_state` (gathered by the caller) as a Hugging Face folder or peft adapter, as `save_checkpoint` does, and
    the schedule, RNG and step. Atomic as `save_checkpoint`: all of it goes to `checkpoint-<step>.tmp`, renamed
    once complete. A collective: every process calls it; the first returns the folder, the others None."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    is_main = dist.get_rank() == 0
    final = run_dir / f"{PREFIX}{state.step:06d}"
    tmp = run_dir / f"{final.name}.tmp"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    shards = _sharded_state(model, optimizer, teacher_model)
    dcp.save(shards, checkpoint_id=str(tmp / "sharded"))
    del shards
    if is_main:
        save_weights(model, tmp, tokenizer, state_dict=full_state)
        _finish_checkpoint(tmp, final, state, scheduler=scheduler, keep=keep, processes=dist.get_world_size())
    dist.barrier()
    return final if is_main else None


def _sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   teacher_model: torch.nn.Module | None) -> dict[str, Any]:
    """The state `torch.distributed.checkpoint` saves and loads: this process's shards, under their global names
    and shapes (so another number of processes can load them)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    options = StateDictOptions(ignore_frozen_params=True)  # under LoRA the frozen base comes from model.path
    model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
    shards = {"model": model_state, "optimizer": optimizer_state}
    if teacher_model is not None:
        shards["teacher"] = get_model_state_dict(teacher_model)
    return shards


def load_sharded_checkpoint(
    checkpoint: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    teacher_model: torch.nn.Module | None,
) -> TrainingState:
    """Restore what `save_sharded_checkpoint` wrote into a sharded model, its optimizer and EMA teacher, whatever
    the number of processes that wrote it and that reads it; then the schedule and RNG states."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

    if not (checkpoint / "sharded").is_dir():
        raise ValueError(f"{checkpoint}: no sharded/ folder; it was written with distributed.strategy ddp, so "
                         "resume it with distributed.strategy=ddp")
    shards = _sharded_state(model, optimizer, teacher_model)
    dcp.load(shards, checkpoint_id=str(checkpoint / "sharded"))
    set_state_dict(model, optimizer, model_state_dict=shards["model"], optim_state_dict=shards["optimizer"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    if teacher_model is not None:
        set_model_state_dict(teacher_model, shards["teacher"])
    return _restore_progress(checkpoint, scheduler)
