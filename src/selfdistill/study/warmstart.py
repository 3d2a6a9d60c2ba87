"""The supervised warm start: a tiny model taught the study task partially, cached as a HF folder.

A randomly initialized tiny model (`models.build_tiny_model`) cannot be post-trained with rewards: it
never answers correctly. The warm start has two supervised stages (`WarmStartSettings`):

1. fine-tuning on worked solutions, loss on the response tokens only. A share of the examples
   (`teacher_fraction`) shows the worked solution inside the prompt, rendered by
   `PromptBuilder.teacher_ids`: the model learns to use privileged context the way a pretrained LLM
   does, which is what makes its own teacher-prompted self a better (privileged) teacher. The tiny
   model learns the format, the reading of the instructions and the copying here, but its modular
   arithmetic stays at chance;
2. the same fine-tuning plus an *arithmetic drill*, the stand-in for a real LLM's pretraining:
   short sequences of single operations drawn like the task's steps and written in the solutions'
   own line format ("7*3=1"), loss on the results only.

Both stages are short on purpose, so that the student ends partially right. That makes the result
sensitive to the arithmetic's rounding: the drill's accuracy rises late and abruptly, so two machines
whose BLAS sums in another order (another thread count, CPU or library) end the 1,400 steps with
different models (held-out student Avg@16 0.334, 0.257 and 0.103 in three runs of the same code; see
docs/study.md). The study therefore ships the warm start it was measured on: a standard Hugging Face
folder (model + tokenizer + `warm_start.json`) under ``assets/study-warmstart-<key>`` in this package,
listed with the SHA-256 of every file in ``assets/warm_starts.json``. `warm_start_dir` returns that
folder when its key (a hash of every setting) matches and its digests check; otherwise, or with
``rebuild=True`` (``selfdistill study --rebuild-warm-start``), it trains the warm start on one thread
into ``cache_dir()/study-warmstart-<key>``, written atomically by `models.build_cached_folder`.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from selfdistill.data import Problem
from selfdistill.forward import pack
from selfdistill.models import (
    MARKER,
    TINY_FORMAT,
    build_cached_folder,
    build_tiny_model,
    build_tiny_tokenizer,
    cache_dir,
    save_tiny_tokenizer,
)
from selfdistill.prompts import PromptBuilder
from selfdistill.study.search_task import SearchStudyTask
from selfdistill.study.settings import WarmStartSettings
from selfdistill.study.task import StudyTask

# Bump when the warm-start procedure changes in a way its settings do not show: it is part of the key.
WARM_START_FORMAT = 3
WARM_START_RECORD = "warm_start.json"
SHIPPED_DIR = Path(__file__).resolve().parent / "assets"
SHIPPED_INDEX = "warm_starts.json"
FIRST_LOSSES = 10  # the record keeps every one of the first steps' losses (a code change shows there first)
CONVERGENCE_FIELDS = ("drill_target", "drill_check_every", "drill_check_facts", "drill_max_steps")
BUILD_THREADS = 1  # the warm start is trained on one thread: the sum order does not depend on the machine's cores


def warm_start_key(task: StudyTask | SearchStudyTask, settings: WarmStartSettings) -> str:
    """12 hex digits of a hash over every setting that changes the warm-started weights."""
    values = asdict(settings)
    if settings.drill_target is None:  # the convergence knobs change nothing then (and older keys stay)
        for name in CONVERGENCE_FIELDS:
            del values[name]
    payload = {"format": WARM_START_FORMAT, "tiny_format": TINY_FORMAT, "task": task.to_json(), "settings": values}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def sft_loss(model: torch.nn.Module, prompt_ids: list[list[int]], response_ids: list[list[int]],
             pad_id: int) -> torch.Tensor:
    """Mean cross-entropy over the response tokens of a batch (prompt tokens carry no loss)."""
    batch = pack(prompt_ids, response_ids, pad_id=pad_id)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=batch.position_ids).logits  # [B, L, V]
    response_logits = batch.response_logits(logits)  # [B, T, V]
    token_loss = F.cross_entropy(response_logits.transpose(1, 2), batch.response_ids, reduction="none")  # [B, T]
    return (token_loss * batch.response_mask).sum() / batch.response_mask.sum()


def drill_sequences(
    tokenizer: Any, task: StudyTask | SearchStudyTask, rng: random.Random, *, num_facts: int, max_lines: int
) -> tuple[list[list[int]], list[list[bool]]]:
    """Arithmetic drill sequences: (token ids, True on the supervised tokens) per sequence.

    Each line is one drill line drawn by `task.drill_segments` (text pieces, each supervised or not: on
    operation chains "a op b=" then the result c; on the search task also " vs t" and the verdict " yes" or
    " no", so the comparison that ends a check line is drilled too), in the solutions' own line format; a
    sequence is a newline, then 1..max_lines lines, each ended by a newline, so that every line starts after
    a newline as solution lines do. `num_facts` lines in all.
    """
    newline = tokenizer.encode("\n", add_special_tokens=False)
    sequences, result_masks = [], []
    remaining = num_facts
    while remaining > 0:
        lines = min(remaining, rng.randint(1, max_lines))
        remaining -= lines
        ids, is_result = list(newline), [False] * len(newline)
        for _ in range(lines):
            for text, supervised in task.drill_segments(rng):
                piece = tokenizer.encode(text, add_special_tokens=False)
                ids += piece
                is_result += [supervised] * len(piece)
            ids += newline
            is_result += [False] * len(newline)
        sequences.append(ids)
        result_masks.append(is_result)
    return sequences, result_masks


def drill_loss(model: torch.nn.Module, sequences: list[list[int]], result_masks: list[list[bool]],
               pad_id: int) -> torch.Tensor:
    """Mean cross-entropy of the result tokens of drill sequences (right-padded into one batch)."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)  # [B, L]
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)  # [B, L]
    target_mask = torch.zeros((len(sequences), width), dtype=torch.float32)  # [B, L] 1 on result tokens
    for row, (ids, is_result) in enumerate(zip(sequences, result_masks, strict=True)):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        target_mask[row, : len(ids)] = torch.tensor(is_result, dtype=torch.float32)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # [B, L, V]
    # logits at column j predict the token at column j + 1
    token_loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")  # [B, L-1]
    mask = target_mask[:, 1:]  # [B, L-1]
    return (token_loss * mask).sum() / mask.sum()


DRILL_CHECK_SEED = 7_919  # the held-out drill facts' own stream (the training drill draws from the settings' seed)


@torch.no_grad()
def drill_accuracy(model: torch.nn.Module, tokenizer: Any, task: StudyTask | SearchStudyTask, *,
                   num_facts: int, max_lines: int, seed: int = DRILL_CHECK_SEED) -> float:
    """The share of held-out drill operations whose result the model predicts right (greedy, every result
    token), on `num_facts` facts drawn from their own seeded stream as the training drill draws them."""
    sequences, result_masks = drill_sequences(tokenizer, task, random.Random(seed), num_facts=num_facts,
                                              max_lines=max_lines)
    was_training = model.training
    model.eval()
    right = total = 0
    for ids, is_result in zip(sequences, result_masks, strict=True):
        input_ids = torch.tensor([ids])  # [1, L]
        predicted = model(input_ids=input_ids).logits[0, :-1].argmax(dim=-1)  # [L-1] token at j+1 from column j
        hits = (predicted == input_ids[0, 1:]).tolist()  # [L-1]
        run: list[bool] = []  # the hits of the result being read (a result may span several tokens)
        for hit, is_result_token in zip(hits, is_result[1:], strict=True):
            if is_result_token:
                run.append(hit)
            elif run:
                right, total, run = right + all(run), total + 1, []
        if run:
            right, total = right + all(run), total + 1
    model.train(was_training)
    return right / total


def train_warm_start(
    model: torch.nn.Module,
    tokenizer: Any,
    task: StudyTask | SearchStudyTask,
    problems: list[Problem],
    settings: WarmStartSettings,
    *,
    on_step: Callable[[int, float], None] | None = None,
    stop_after: int | None = None,
    drill_log: list[tuple[int, float]] | None = None,
) -> list[float]:
    """Run both warm-start stages on `model` in place; returns the loss of every step.

    `stop_after` ends the training after that many steps (the schedule stays the full one's): the
    shipped warm start's first losses can be checked against the code without the full training. With
    `settings.drill_target`, stage 2 stops once the held-out drill accuracy reaches it (`drill_log` receives
    every (step, accuracy) checked).

    Every step fine-tunes on `batch_size` problems, each prompted as the student (problem only) or,
    with probability `teacher_fraction`, as the teacher (`task.sft_example` says which teacher view,
    what the prompt shows and the target: on operation chains the worked solution in both), with the
    target followed by EOS. Stage 1 (`steps`) warms up to `lr` and decays with a cosine
    to zero; stage 2 (`drill_steps`) warms up to the constant `drill_lr` and adds the loss of
    `drill_facts` drill operations to every step.
    """
    rng = random.Random(settings.seed)
    views = task.teacher_views(settings.template)
    builders = {view: PromptBuilder(tokenizer, template=template) for view, template in views.items()}
    student_builder = PromptBuilder(tokenizer, template=settings.template)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)

    def lr_at(step: int) -> float:
        stage_step = step if step < settings.steps else step - settings.steps
        warmup = min(1.0, (stage_step + 1) / max(1, settings.warmup_steps))
        if step < settings.steps:
            return settings.lr * warmup * 0.5 * (1.0 + math.cos(math.pi * stage_step / settings.steps))
        return settings.drill_lr * warmup

    order: list[Problem] = []

    def task_loss() -> torch.Tensor:
        nonlocal order
        if len(order) < settings.batch_size:  # a fresh shuffled pass over the problems
            order += rng.sample(problems, len(problems))
        batch, order = order[: settings.batch_size], order[settings.batch_size :]
        as_teacher = [rng.random() < settings.teacher_fraction for _ in batch]
        examples = [task.sft_example(p, teacher, rng) for p, teacher in zip(batch, as_teacher, strict=True)]
        targets = [list(tokenizer.encode(target, add_special_tokens=False)) + [tokenizer.eos_token_id]
                   for _, _, target in examples]
        # Student and teacher prompts differ in length by ~2x: pack each prompt kind on its own (less
        # padding), then weight the mean losses by their token counts, so the result is the batch's token mean.
        total_tokens = sum(len(target) for target in targets)
        loss = torch.zeros(())
        for view in (None, *views):
            part = [i for i, (example_view, _, _) in enumerate(examples) if example_view == view]
            if not part:
                continue
            prompts = [student_builder.student_ids(examples[i][1]) if view is None
                       else builders[view].teacher_ids(examples[i][1]) for i in part]
            responses = [targets[i] for i in part]
            part_tokens = sum(len(r) for r in responses)
            loss = loss + sft_loss(model, prompts, responses, tokenizer.pad_token_id) * (part_tokens / total_tokens)
        return loss

    def converged(step: int) -> bool:
        """With a drill target: whether the held-out drill accuracy after `step` steps reaches it (checked every
        `drill_check_every` steps once the minimum `drill_steps` are done; recorded in `drill_checks`)."""
        drilled = step - settings.steps
        if settings.drill_target is None or drilled < settings.drill_steps or drilled % settings.drill_check_every:
            return False
        accuracy = drill_accuracy(model, tokenizer, task, num_facts=settings.drill_check_facts,
                                  max_lines=settings.drill_max_lines)
        drill_checks.append((step, accuracy))
        return accuracy >= settings.drill_target

    model.train()
    losses: list[float] = []
    drill_checks: list[tuple[int, float]] = []
    last = settings.total_steps if stop_after is None else min(stop_after, settings.total_steps)
    for step in range(last):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = task_loss()
        if step >= settings.steps:
            sequences, result_masks = drill_sequences(tokenizer, task, rng, num_facts=settings.drill_facts,
                                                      max_lines=settings.drill_max_lines)
            loss = loss + drill_loss(model, sequences, result_masks, tokenizer.pad_token_id)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step + 1, losses[-1])
        if converged(step + 1):
            break
    model.eval()
    if drill_log is not None:
        drill_log.extend(drill_checks)
    return losses


def warm_start_dir(
    task: StudyTask,
    settings: WarmStartSettings,
    *,
    cache: Path | None = None,
    on_step: Callable[[int, float], None] | None = None,
    rebuild: bool = False,
    shipped: Path | None = None,
) -> Path:
    """The warm-start folder for these settings: the shipped one if there is one for their key (and
    `rebuild` is false), else the cached one, trained on the first call on `BUILD_THREADS` thread(s)
    (see module doc). `shipped` replaces the package's assets folder (for tests).

    Besides the model and tokenizer the folder holds `warm_start.json`: the settings, the parameter
    count, the training seconds, the loss of each of the first steps and the loss curve (every 10th step
    and the last), and the torch / transformers versions and thread count it was built with.
    """
    key = warm_start_key(task, settings)
    if not rebuild:
        found = shipped_warm_start(key, shipped)
        if found is not None:
            return found
    final = Path(cache or cache_dir()) / f"study-warmstart-{key}"

    def write(folder: Path) -> dict:
        started = time.perf_counter()
        tokenizer = build_tiny_tokenizer()
        model = build_tiny_model(tokenizer, hidden_size=settings.hidden_size, num_layers=settings.num_layers,
                                 num_heads=settings.num_heads, intermediate_size=settings.intermediate_size,
                                 seed=settings.seed)
        sft_problems = task.splits().sft_train
        threads = torch.get_num_threads()
        torch.set_num_threads(BUILD_THREADS)
        try:
            drill_log: list[tuple[int, float]] = []
            losses = train_warm_start(model, tokenizer, task, sft_problems, settings, on_step=on_step,
                                      drill_log=drill_log)
        finally:
            torch.set_num_threads(threads)
        seconds = time.perf_counter() - started
        model.save_pretrained(folder)
        save_tiny_tokenizer(tokenizer, folder)  # reloads with the same 833 tokens
        record = {
            "task": task.to_json(),
            "settings": asdict(settings),
            "parameters": sum(p.numel() for p in model.parameters()),
            "train_seconds": round(seconds, 1),
            "loss_curve": {step: round(loss, 4) for step, loss in enumerate(losses, start=1)
                           if step % 10 == 0 or step == len(losses)},
            "first_losses": losses[:FIRST_LOSSES],
            "stage1_final_loss": _tail_mean(losses[: settings.steps]),
            "final_loss": _tail_mean(losses[settings.steps :] or losses),
            "steps_trained": len(losses),
            "drill_checks": {step: round(accuracy, 4) for step, accuracy in drill_log},
            "built_with": {"torch": torch.__version__, "transformers": _version("transformers"),
                           "threads": torch.get_num_threads()},
        }
        (folder / WARM_START_RECORD).write_text(json.dumps(record, indent=1) + "\n")
        return {"parameters": record["parameters"], "train_seconds": record["train_seconds"]}

    return build_cached_folder(final, write, what=f"study warm start {key}")


# ----------------------------------------------------------------------------------------------
# the shipped warm start


def file_digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file directly in `folder` (the build marker excluded), by file name."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())
            if _shipped_file(p)}


def read_shipped_index(shipped: Path | None = None) -> dict[str, Any]:
    """`assets/warm_starts.json`: key -> {"folder", "sha256": {file: digest}, "rebuild"}; {} if absent."""
    path = Path(shipped or SHIPPED_DIR) / SHIPPED_INDEX
    return json.loads(path.read_text()) if path.exists() else {}


class ShippedWarmStartError(RuntimeError):
    """The shipped warm-start folder does not match the digests recorded for it."""


def shipped_warm_start(key: str, shipped: Path | None = None) -> Path | None:
    """The shipped folder for `key` after checking every file's digest, or None if none is shipped."""
    root = Path(shipped or SHIPPED_DIR)
    entry = read_shipped_index(root).get(key)
    if entry is None:
        return None
    folder = root / entry["folder"]
    found = file_digests(folder) if folder.is_dir() else {}
    if found != entry["sha256"]:
        expected = entry["sha256"]
        bad = sorted(name for name in set(found) | set(expected) if found.get(name) != expected.get(name))
        raise ShippedWarmStartError(
            f"shipped warm start {folder} does not match its recorded digests ({', '.join(bad)}); reinstall the "
            "package or train it with `selfdistill study --rebuild-warm-start`")
    return folder


def ship_warm_start(folder: Path, key: str, shipped: Path | None = None) -> Path:
    """Copy a built warm-start folder into the assets as ``study-warmstart-<key>`` and record its digests."""
    root = Path(shipped or SHIPPED_DIR)
    root.mkdir(parents=True, exist_ok=True)
    name = f"study-warmstart-{key}"
    target = root / name
    if target.exists():
        shutil.rmtree(target)
    target.mkdir()
    for path in sorted(Path(folder).iterdir()):
        if _shipped_file(path):
            shutil.copy2(path, target / path.name)
    index = read_shipped_index(root)
    index[key] = {"folder": name, "sha256": file_digests(target),
                  "rebuild": "SELFDISTILL_CACHE=$(mktemp -d) python bench/ship_warm_start.py"}
    (root / SHIPPED_INDEX).write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    return target


def _shipped_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.name != MARKER


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _tail_mean(values: list[float], window: int = 20) -> float | None:
    tail = values[-window:]
    return round(sum(tail) / len(tail), 4) if tail else None


def read_warm_start_record(folder: Path) -> dict[str, Any]:
    """The `warm_start.json` written beside the weights."""
    return json.loads((Path(folder) / WARM_START_RECORD).read_text())
