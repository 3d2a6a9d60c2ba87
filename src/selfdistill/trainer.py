"""The on-policy loop: data → prompts → rollouts → rewards → teacher scoring → token statistics →
objective → update, with checkpoints and several processes through accelerate.

One optimizer step:
  1. take P prompts (each process its share), sample G responses per prompt from the student;
  2. grade them → rewards → group advantages;
  3. in micro-batches: the teacher's hidden states over `teacher_prompt ⊕ response` (no gradient),
     the student's over `student_prompt ⊕ response`, then the fused output layer + statistics +
     objective (`tokenstats.hidden_objective`), normalized with the *global* token count. With
     `optim.shared_prefix` each distinct prompt of a micro-batch runs once and its rows' responses run
     on its KV cache (`forward.pack_shared`); the same hidden states as packing every row in full;
  4. gradients summed over micro-batches and processes (in buckets, `Collectives`); a non-finite loss or
     gradient skips the step;
  5. AdamW with warm-up + cosine, gradient clipping; the EMA teacher follows.

Devices and dtypes. Every sum across processes goes through `Collectives`, which moves the tensor to the
accelerator's device first (NCCL reduces only CUDA tensors). `model.dtype: bfloat16` means bfloat16 compute
(autocast over rollouts, teacher and student forward passes, and the output layer) with float32 trained
parameters, gradients and AdamW state: AdamW stepping bfloat16 weights directly rounds most small updates away.

By default every update is exactly on-policy (one update per rollout batch), so the surrogate's ratio is 1
and no separate pass for old log-probs is needed. With `optim.ppo_epochs × optim.mini_batches > 1` (TRL's
`num_iterations`, verl's `ppo_epochs` / `ppo_mini_batch_size`) the rollouts are scored once
(`scoring.score_rollouts`: behaviour log-probs and the teacher's hidden states, before the first update), then
steps 3-4 and the optimizer step run once per mini-batch per epoch (`scoring.minibatches`, `_optimizer_update`),
each normalized by its own mini-batch's global counts; the LR schedule and the EMA teacher advance once per
rollout step.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from selfdistill.checkpoint import (
    TrainingState,
    find_checkpoint,
    load_checkpoint,
    load_sharded_checkpoint,
    read_state,
    save_checkpoint,
    save_sharded_checkpoint,
)
from selfdistill.collectives import Collectives
from selfdistill.config import ConfigError, TrainConfig, config_from_dict
from selfdistill.data import Problem
from selfdistill.forward import (
    PackedBatch,
    base_model,
    check_output_layer,
    output_weight,
    response_hidden_states,
)
from selfdistill.grading import Grader
from selfdistill.models import load_model
from selfdistill.objectives import OBJECTIVES, BlockObjective, group_advantages, token_weights
from selfdistill.parallel import make_parallel
from selfdistill.precision import compute_dtype
from selfdistill.prompts import PromptBuilder
from selfdistill.provenance import record_environment
from selfdistill.rollout import make_backend
from selfdistill.schedule import epoch_order, load_training_problems, make_optimizer, seed_for
from selfdistill.scoring import (
    RolloutGroup,
    ScoredRollouts,
    micro_batches,
    minibatches,
    score_rollouts,
)
from selfdistill.teacher import Teacher
from selfdistill.tokenstats import FusedBuffers, FusedResult, hidden_objective
from selfdistill.training_setup import (
    check_process_split,
    check_prompts,
    choose_packing,
    prepare_model,
    refuse_sharding,
)

RewardFn = Callable[[list[str], list[Problem]], list[float]]


@dataclass
class StepLog:
    """A step's logged statistics as sums over tokens and the token counts they are over, by name: the logged
    value is `sums[name] / tokens[name]` (summed over the processes first, `Collectives.weighted_means`)."""

    sums: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, float] = field(default_factory=dict)

    def add(self, sums: dict[str, float], tokens: float) -> None:
        """One micro-batch's sums over its `tokens` tokens."""
        for name, total in sums.items():
            self.sums[name] = self.sums.get(name, 0.0) + total
            self.tokens[name] = self.tokens.get(name, 0.0) + tokens

    def means(self) -> dict[str, float]:
        """This process's means."""
        return {name: total / self.tokens[name] if self.tokens[name] else 0.0 for name, total in self.sums.items()}


@dataclass(frozen=True)
class Update:
    """One optimizer update's share of a rollout step: its rows and where their inputs come from."""

    group: RolloutGroup  # the step's rollouts (this process's)
    rows: list[int]  # the rows this update trains on
    advantages: Tensor  # [B] the group advantages of the whole step
    scored: ScoredRollouts | None  # the scoring pass (behaviour log-probs, teacher states); None: exactly on-policy


@dataclass
class MicroBatch:
    """One forward/backward pass: some rows of an update, with everything the fused pass needs for them."""

    student: PackedBatch  # student_prompt ⊕ response, on the device
    objective: BlockObjective  # the objective of these rows: mask, advantages, token weights, behaviour log-probs
    teacher_hidden: Tensor | None = None  # [b,T,d] the teacher's, in the compute dtype; None: no teacher
    teacher_weight: Tensor | None = None  # [V,d]


class Trainer:
    """Holds the model, optimizer, teacher and data cursor of one run; `run()` trains it."""

    def __init__(
        self,
        config: TrainConfig,
        *,
        run_dir: str | Path | None = None,
        resume: str | Path | None = None,
        reward_fn: RewardFn | None = None,
        problems: list[Problem] | None = None,
    ):
        """`reward_fn(completions, problems) -> rewards` replaces math grading against `problem.answer`;
        `problems` replaces the ones `data.dataset` names (e.g. a split made by the caller)."""
        from accelerate import Accelerator

        self.config = config
        self.reward_fn = reward_fn
        self.objective = OBJECTIVES[config.objective.name]
        self.divergence = config.objective.divergence_spec()  # the statistics' divergence, None when not needed
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.device = self.accelerator.device
        refuse_sharding(self.accelerator.distributed_type)
        self.collectives = Collectives(self.device, self.world, bucket_bytes=int(config.optim.grad_bucket_mb * 2**20))
        check_process_split(config, self.world)
        torch.manual_seed(config.optim.seed)
        random.seed(config.optim.seed)

        self.problems = load_training_problems(config) if problems is None else list(problems)
        if not self.problems:
            raise ConfigError(f"data.dataset: {config.data.dataset!r} gave no problems")
        # bfloat16 compute, float32 master weights: the weights that train are held in float32 (and the AdamW
        # state with them); only frozen ones (the base model under LoRA) are held in bfloat16.
        self.compute_dtype = compute_dtype(config.model.dtype, self.device)
        if config.model.dtype == "auto" and self.accelerator.is_main_process:
            print(f"model.dtype auto: {str(self.compute_dtype).removeprefix('torch.')} compute on {self.device.type}",
                  flush=True)
        held = self.compute_dtype if config.model.lora_rank > 0 else torch.float32
        self.model, self.tokenizer = load_model(config.model.path, dtype=held)
        self.prompts = PromptBuilder(
            self.tokenizer, template=config.data.template, max_prompt_tokens=config.data.max_prompt_tokens,
            enable_thinking=config.data.enable_thinking, system_prompt=config.data.system_prompt,
        )
        check_prompts(self.prompts, self.problems, needs_teacher=self.objective.needs_teacher)
        self.parallel = make_parallel(config.distributed.strategy, device=self.device, world=self.world,
                                      compute_dtype=self.compute_dtype)
        self.model = prepare_model(self.model, config.model)
        if not self.parallel.sharded:  # fsdp2: `wrap` copies each process's shards to the device, nothing else
            self.model = self.model.to(self.device)
        # fsdp2: the teacher's copy is made on the meta device and filled from the student's shards once sharded
        self.teacher = Teacher(config.objective.teacher, self.model, ema_decay=config.objective.ema_decay,
                               copy_model=self.parallel.copy_model) if self.objective.needs_teacher else None
        # ddp: nothing changes; fsdp2: the student (and the teacher's copy, if any) sharded in place
        self.model = self.parallel.wrap(self.model)
        if self.teacher is not None and self.teacher.copy is not None:
            self.teacher.copy = self.parallel.wrap(self.teacher.copy, like=self.model)
        # after sharding (fsdp2: the loaded model is read only in each process's slices; the probe forward gathers
        # one layer at a time and reads the output weight gathered whole)
        with self._compute(), self.parallel.whole_output_layers(self.model):
            check_output_layer(base_model(self.model))
        self.pack_student, self.pack_teacher = choose_packing(self.model, shared_prefix=config.optim.shared_prefix,
                                                              has_teacher=self.teacher is not None,
                                                              sharded=self.parallel.sharded)
        self.backend = make_backend(config.rollout.backend, self.model, self.tokenizer,
                                    batch_size=config.rollout.generation_batch_size or None,
                                    decode=config.rollout.decode)
        self.pad_id = self.backend.pad_id
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        wrong = sorted({str(p.dtype) for p in self.params} - {"torch.float32"})
        if wrong:  # the master weights AdamW steps must be float32 (bfloat16 rounds small updates away)
            raise ConfigError(f"model.dtype: trained parameters must be float32, found {wrong}")
        self.optimizer, self.scheduler = make_optimizer(self.params, config.optim)
        self.grader = Grader(workers=2)
        self.fused_buffers = FusedBuffers()  # the output layer's logits buffers, reused every micro-batch
        self.step = 0
        self.cursor = 0
        self._open_run(run_dir, resume)

    # -- set-up

    def _open_run(self, run_dir: str | Path | None, resume: str | Path | None) -> None:
        """The checkpoint `resume` names, loaded (weights, optimizer, schedule, teacher, step and cursor); the run
        folder (`run_dir`, else `logging.output_dir`, else the resumed checkpoint's run, else a new one) with
        config.json, environment.json and the logs cut back to the resumed step; the TensorBoard writer."""
        config = self.config
        self.run_dir = Path(run_dir or config.logging.output_dir or f"runs/train-{time.strftime('%Y%m%d-%H%M%S')}")
        if resume is not None:
            checkpoint = find_checkpoint(resume)
            if self.parallel.sharded:
                state = load_sharded_checkpoint(checkpoint, model=self.model, optimizer=self.optimizer,
                                                scheduler=self.scheduler, teacher_model=self._ema_copy())
            else:
                state, teacher_state = load_checkpoint(checkpoint, model=self.model, optimizer=self.optimizer,
                                                       scheduler=self.scheduler)
                if self.teacher is not None:
                    self.teacher.load_state_dict(teacher_state)
            self.step, self.cursor = state.step, state.cursor
            if run_dir is None and config.logging.output_dir is None:
                self.run_dir = checkpoint.parent
        self.is_main = self.accelerator.is_main_process
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
            record_environment(self.run_dir)  # environment.json: versions, commit, hardware
            self._truncate_log(self.run_dir / "metrics.jsonl")
            self._truncate_log(self.run_dir / "samples.jsonl")
        self.writer = None
        if self.is_main and config.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))

    def _compute(self) -> contextlib.AbstractContextManager:
        """The compute dtype of forward passes: bfloat16 autocast when `model.dtype` resolves to bfloat16."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.compute_dtype == torch.bfloat16)

    def _truncate_log(self, path: Path) -> None:
        """On resume, drop log lines of steps after the checkpoint (they will be redone)."""
        if not path.exists():
            return
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= self.step]
        path.write_text("".join(line + "\n" for line in kept))

    # -- one step

    def _step_problems(self) -> list[tuple[int, Problem]]:
        """This process's (global prompt index, problem) pairs for the current step."""
        total = self.config.rollout.prompts_per_step
        picked = []
        for k in range(self.cursor, self.cursor + total):
            epoch, offset = divmod(k, len(self.problems))
            order = epoch_order(len(self.problems), epoch, self.config.optim.seed, self.config.data.shuffle)
            picked.append((k, self.problems[order[offset]]))
        return picked[self.rank :: self.world]

    def _rollouts(self, picked: list[tuple[int, Problem]]) -> RolloutGroup:
        cfg = self.config.rollout
        # One call for all prompts, each seeded by its global index: the same samples whichever process
        # draws the prompt and whichever prompts share the call.
        with self._compute(), self.parallel.generation(self.model):
            out = self.backend.generate([self.prompts.student_ids(problem) for _, problem in picked],
                                        num_samples=cfg.group_size, temperature=cfg.temperature, top_p=cfg.top_p,
                                        max_new_tokens=cfg.max_new_tokens,
                                        seed=[seed_for(self.config.optim.seed, k) for k, _ in picked])
        responses = [out.response_ids[row, : out.lengths[row]].tolist() for row in range(len(out))]
        texts, truncated = list(out.texts), [bool(t) for t in out.truncated]
        prompt_of_row = out.prompt_index.tolist()
        row_problems = [picked[p][1] for p in prompt_of_row]
        if self.reward_fn is None:
            scores = self.grader.grade_many(texts, [p.answer for p in row_problems])
        else:
            scores = self.reward_fn(texts, row_problems)
        rewards = torch.tensor(scores, dtype=torch.float32)
        return RolloutGroup([p for _, p in picked], prompt_of_row, responses, texts, truncated, rewards)

    def _teacher_prompt(self, group: RolloutGroup, row: int) -> list[int]:
        problem = group.problems[group.prompt_of_row[row]]
        if self.prompts.template.context != "sibling":
            return self.prompts.teacher_ids(problem)
        siblings = [r for r in range(len(group.texts)) if group.prompt_of_row[r] == group.prompt_of_row[row]
                    and r != row and group.rewards[r] > 0]
        if not siblings:  # no successful sibling: the teacher sees what the student sees (δ = 0)
            return self.prompts.student_ids(problem)
        return self.prompts.teacher_ids(problem, sibling=group.texts[siblings[0]])

    def _pack_student_rows(self, group: RolloutGroup, rows: list[int]) -> PackedBatch:
        """`student_prompt ⊕ response` of `rows`, packed (`pack_student`) on the device."""
        return self.pack_student([self.prompts.student_ids(group.problems[group.prompt_of_row[r]]) for r in rows],
                                 [group.responses[r] for r in rows], pad_id=self.pad_id).to(self.device)

    def _student_hidden(self, student: PackedBatch) -> Tensor:
        """The student's response hidden states `[b,T,d]` in the compute dtype."""
        with self._compute():
            hidden = response_hidden_states(self.model, student)  # [b,T,d]
        return hidden.to(self.compute_dtype)  # [b,T,d]

    def _teacher_states(self, group: RolloutGroup, rows: list[int]) -> tuple[Tensor, Tensor]:
        """The teacher's hidden states over `teacher_prompt ⊕ response` for `rows` and its output weight,
        `[b,T,d]` and `[V,d]` in the compute dtype (no gradient)."""
        teacher = self.pack_teacher([self._teacher_prompt(group, r) for r in rows],
                                    [group.responses[r] for r in rows], pad_id=self.pad_id).to(self.device)
        with self._compute():
            hidden, weight = self.teacher.hidden_states(teacher)  # [b,T,d], [V,d]
        return hidden.to(self.compute_dtype), weight.to(self.compute_dtype)

    def train_step(self) -> dict[str, Any]:
        """One rollout step: `optim.ppo_epochs × optim.mini_batches` optimizer updates (one by default); returns
        the step's metrics. `loss` and `grad_norm` are means over the updates, `skipped` counts skipped updates,
        and the diagnostics (entropy, clip_fraction, ...) are token-weighted means over every update."""
        t0 = time.perf_counter()
        group = self._rollouts(self._step_problems())
        t_rollout = time.perf_counter() - t0
        optim = self.config.optim
        if optim.ppo_epochs * optim.mini_batches == 1:  # exactly on-policy: ratio 1, no scoring pass
            updates = [self._on_policy(group)]
        else:
            scored, advantages = self._score_rollouts(group), self._advantages(group)
            updates = [Update(group, rows, advantages, scored)
                       for epoch in range(optim.ppo_epochs) for rows in self._update_batches(group, epoch)]
        t_scoring = time.perf_counter() - t0 - t_rollout
        step_log = StepLog()
        lr = self.scheduler.get_last_lr()[0]
        results = [self._optimizer_update(update, step_log) for update in updates]
        losses, grad_norms, skips = zip(*results, strict=True)
        skipped = sum(skips)
        if skipped < len(results):  # once per rollout step, as verl; TRL's schedule counts optimizer steps
            self.scheduler.step()
            if self.teacher is not None:
                self.teacher.update()
        self.step += 1
        self.cursor += self.config.rollout.prompts_per_step
        metrics = {
            "step": self.step,
            "loss": sum(losses) / len(losses),
            **self._rollout_metrics(group),
            "grad_norm": sum(grad_norms) / len(grad_norms),
            "lr": lr,
            "skipped": int(skipped),
            "updates": len(results),
            "processes": self.world,
            **self.collectives.weighted_means(step_log.sums, step_log.tokens),  # over every process's tokens
            "seconds_rollout": t_rollout,
            "seconds_scoring": t_scoring,
            "seconds": time.perf_counter() - t0,
        }
        if self.is_main:
            self._log(metrics, group)
        return metrics

    def _advantages(self, group: RolloutGroup) -> Tensor:
        """The group advantages `[B]` of the step's rows (over each prompt's G rows)."""
        return group_advantages(group.rewards, self.config.rollout.group_size,
                                std_normalize=self.objective.std_normalize)  # [B]

    def _on_policy(self, group: RolloutGroup) -> Update:
        """The step's one exactly on-policy update: every row, no scoring pass."""
        return Update(group, list(range(len(group.responses))), self._advantages(group), scored=None)

    def _rollout_metrics(self, group: RolloutGroup) -> dict[str, float]:
        """The mean reward, response length and truncation rate over every process's rollouts."""
        lengths = torch.tensor([len(r) for r in group.responses], dtype=torch.float32)
        local = torch.tensor([group.rewards.sum(), len(group.rewards), lengths.sum(), sum(group.truncated)],
                             dtype=torch.float64)
        reward_sum, rows, length_sum, truncated = self.collectives.sum(local).tolist()
        return {"reward": reward_sum / rows, "response_length": length_sum / rows,
                "truncation_rate": truncated / rows}

    # -- several updates per rollout step (optim.ppo_epochs × optim.mini_batches)

    def _update_batches(self, group: RolloutGroup, epoch: int) -> list[list[int]]:
        """This process's rows in `optim.mini_batches` parts for `epoch`, one optimizer update each (`minibatches`),
        shuffled per epoch unless `optim.shuffle_minibatches` is off (seeded by the run's seed, the step and the
        epoch: the same parts on every process and after a resume)."""
        optim = self.config.optim
        seed = seed_for(optim.seed, self.step, epoch) if optim.shuffle_minibatches else None
        return minibatches(len(group.responses), self.config.rollout.group_size, optim.mini_batches, seed=seed)

    @torch.no_grad()
    def _score_rollouts(self, group: RolloutGroup) -> ScoredRollouts:
        """`score_rollouts` with this run's student, teacher and packing, over the same micro-batches as the first
        epoch's updates (so the first update's ratio is exactly 1)."""
        cfg = self.config

        def student(rows: list[int]) -> tuple[Tensor, Tensor]:
            packed = self._pack_student_rows(group, rows)
            return self._student_hidden(packed), packed.response_ids  # [b,T,d], [b,T]

        batches = [micro for part in self._update_batches(group, epoch=0)
                   for micro in micro_batches(part, cfg.optim.micro_batch_size)]
        with self.parallel.whole_output_layers(self.model, None if self.teacher is None else self.teacher.copy):
            return score_rollouts(
                group, batches,
                student=student if self.objective.uses_old_logp else None,
                weight=output_weight(self.model).detach().to(self.compute_dtype),  # [V,d]
                teacher=None if self.teacher is None else lambda rows: self._teacher_states(group, rows),
                # kept for the updates: a live teacher's trained output layer changes in place, and a sharded
                # teacher's is whole only inside this block
                copy_teacher_weight=self.teacher is not None and (
                    self.parallel.sharded or (self.teacher.mode == "live" and output_weight(self.model).requires_grad)),
                temperature=cfg.rollout.temperature, chunk_tokens=cfg.optim.chunk_tokens or None,
                buffers=self.fused_buffers,
            )

    # -- one optimizer update: micro-batches → fused pass → backward → reduce, clip, step

    def _optimizer_update(self, update: Update, step_log: StepLog) -> tuple[float, float, bool]:
        """One optimizer step on `update.rows`: the gradients (`_update`), summed over processes and clipped; a
        non-finite loss or gradient skips it, weights and optimizer state untouched. Returns (loss, gradient norm
        before clipping, skipped). The LR schedule and the EMA teacher are advanced by `train_step`, once per
        rollout step. The gradients are cleared after the update, so the next one starts from none."""
        loss = self._update(update, step_log)
        self.parallel.reduce_gradients(self.params, self.collectives)  # ddp: summed here; fsdp2: in backward
        max_norm = self.config.optim.max_grad_norm or float("inf")
        grad_norm = self.parallel.clip_gradients(self.params, max_norm)
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm, skipped

    def _update(self, update: Update, step_log: StepLog) -> float:
        """Accumulate into `.grad` the gradient of the loss over `update.rows`, normalized by those rows' token and
        sequence counts summed over processes, one micro-batch at a time; returns the loss (summed over
        processes)."""
        lengths = torch.tensor([len(update.group.responses[r]) for r in update.rows], dtype=torch.float32)  # [b]
        counts = self.collectives.sum(torch.stack([lengths.sum(), torch.tensor(float(len(lengths)))]))  # [2]
        global_tokens, global_sequences = counts.tolist()
        total_loss = torch.zeros((), device=self.device)
        # fsdp2: the student's output layer gathered whole for each micro-batch, the backward pass reduce-scatters
        # its gradient; a teacher copy's (when the teacher runs here) only until the fused pass is done, which
        # forms every gradient of the output layer in its forward pass. ddp: no-ops.
        teacher_copy = self.teacher.copy if self.teacher is not None and update.scored is None else None
        for rows in micro_batches(update.rows, self.config.optim.micro_batch_size):
            with self.parallel.whole_output_layers(self.model):
                with self.parallel.whole_output_layers(teacher_copy):
                    micro = self._micro_batch(update, rows, global_tokens, global_sequences)
                    result = self._fused_pass(micro)
                result.loss.backward()
            total_loss += result.loss.detach().float()
            step_log.add(*self._micro_batch_metrics(micro, result))
        return float(self.collectives.sum(total_loss))

    def _micro_batch(self, update: Update, rows: list[int], global_tokens: float,
                     global_sequences: float) -> MicroBatch:
        """Rows `rows` of `update` packed, with their objective (mask, advantages, token weights from the update's
        global counts, behaviour log-probs) and their teacher's hidden states: from the scoring pass when there
        was one, else run now."""
        cfg = self.config
        student = self._pack_student_rows(update.group, rows)
        mask = student.response_mask  # [b,T]
        width = mask.shape[1]
        weights = token_weights(mask, mode=cfg.objective.aggregation or self.objective.aggregation,
                                global_tokens=global_tokens, global_sequences=global_sequences,
                                norm_length=cfg.rollout.max_new_tokens)  # [b,T]
        scored = update.scored
        objective = BlockObjective(self.objective, cfg.objective.knobs, mask=mask,
                                   group_adv=update.advantages[rows].to(self.device), token_weights=weights,
                                   old_logp=None if scored is None else scored.behaviour_logp(rows, width),
                                   step=self.step)
        if self.teacher is None:
            return MicroBatch(student, objective)
        if scored is not None:
            return MicroBatch(student, objective, scored.teacher_states(rows, width), scored.teacher_weight)
        return MicroBatch(student, objective, *self._teacher_states(update.group, rows))

    def _fused_pass(self, micro: MicroBatch) -> FusedResult:
        """The student's hidden states, then the output layer, the statistics and the objective fused
        (`hidden_objective`); the loss is not yet backpropagated. The output weight's gradient is added into its
        `.grad` during this call (`weight_grad_out`)."""
        weight = output_weight(self.model)
        # The two [V,d] matrices get their gradients into .grad in place, without a second [V,d] tensor per
        # micro-batch: the output layer's from the fused path (weight_grad_out), the embedding's as a sparse
        # gradient of the rows looked up (see `prepare_model`), added into the dense .grad made here.
        for matrix in {id(w): w for w in (weight, self.model.get_input_embeddings().weight)}.values():
            if matrix.requires_grad and matrix.grad is None:
                matrix.grad = torch.zeros_like(matrix)
        # bfloat16 compute of the output layer too: a bfloat16 copy of the (float32) weight for the fused path
        # (in float32 `.to` returns the weight itself); its gradient still goes, in float32, into weight.grad.
        compute_weight = weight.to(self.compute_dtype)  # [V,d]
        cfg = self.config
        return hidden_objective(self._student_hidden(micro.student), compute_weight, micro.student.response_ids,
                                micro.objective, temperature=cfg.rollout.temperature,
                                teacher_hidden=micro.teacher_hidden, teacher_weight=micro.teacher_weight,
                                divergence=self.divergence, chunk_tokens=cfg.optim.chunk_tokens or None,
                                buffers=self.fused_buffers,
                                weight_grad_out=weight.grad if weight.requires_grad else None)

    @staticmethod
    def _micro_batch_metrics(micro: MicroBatch, result: FusedResult) -> tuple[dict[str, float], float]:
        """What a micro-batch logs, as sums over its tokens (read from the device once), and its token count:
        the student's entropy, the teacher's entropy and log-prob gap, the divergence, the k3 estimate of
        KL(behaviour ‖ current) on the sampled tokens when the update is off-policy (as TRL and verl log it),
        and the objective's diagnostics (already token sums, `BlockObjective`)."""
        stats, mask, old_logp = result.stats, micro.objective.mask, micro.objective.old_logp  # [b,T] each
        sums = stats.masked_sums(mask)
        if old_logp is not None:
            log_ratio = (stats.logp - old_logp) * mask  # [b,T]
            sums["approx_kl"] = ((log_ratio.exp() - 1.0 - log_ratio) * mask).sum()
        sums.update(result.diagnostics)
        values = torch.stack([value.float().reshape(()) for value in sums.values()]).tolist()
        return dict(zip(sums, values, strict=True)), float(mask.sum())

    # -- logging and checkpoints

    def _log(self, metrics: dict[str, Any], group: RolloutGroup) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.writer is not None:
            for name, value in metrics.items():
                if name != "step":
                    self.writer.add_scalar(name, value, self.step)
            self.writer.flush()
        cfg = self.config.logging
        if cfg.sample_every and self.step % cfg.sample_every == 0:
            with open(self.run_dir / "samples.jsonl", "a") as f:
                for row in range(min(cfg.samples_per_step, len(group.texts))):
                    problem = group.problems[group.prompt_of_row[row]]
                    f.write(json.dumps({"step": self.step, "problem_id": problem.id, "problem": problem.problem,
                                        "gold": problem.answer, "completion": group.texts[row],
                                        "reward": float(group.rewards[row]),
                                        "truncated": group.truncated[row]}) + "\n")

    def _ema_copy(self) -> torch.nn.Module | None:
        """The EMA teacher's weights, the only teacher state a checkpoint holds (a frozen copy is rebuilt)."""
        return self.teacher.copy if self.teacher is not None and self.teacher.mode == "ema" else None

    def save(self) -> Path | None:
        """Write a checkpoint; returns its folder on the main process (None on the others). With fsdp2 every
        process writes its shards (a collective)."""
        state = TrainingState(step=self.step, cursor=self.cursor, config=self.config.to_dict())
        if self.parallel.sharded:
            full_state = self.parallel.full_state_dict(self.model)  # on the main process only
            return save_sharded_checkpoint(self.run_dir, state, model=self.model, optimizer=self.optimizer,
                                           scheduler=self.scheduler, teacher_model=self._ema_copy(),
                                           full_state=full_state, keep=self.config.logging.keep_checkpoints,
                                           tokenizer=self.tokenizer)
        if not self.is_main:
            return None
        return save_checkpoint(self.run_dir, state, model=self.model, optimizer=self.optimizer,
                               scheduler=self.scheduler,
                               teacher_state=None if self.teacher is None else self.teacher.state_dict(),
                               keep=self.config.logging.keep_checkpoints, tokenizer=self.tokenizer)

    def run(self, *, until: int | None = None, callback: Callable[[dict], None] | None = None) -> Path:
        """Train until `optim.steps` (or stop early after step `until`), checkpoint, return the run folder."""
        from selfdistill.progress import StepProgress

        total = self.config.optim.steps if until is None else min(until, self.config.optim.steps)
        every = self.config.logging.checkpoint_every
        with StepProgress(total, start=self.step, enabled=self.is_main and self.config.logging.progress) as bar:
            while self.step < total:
                metrics = self.train_step()
                bar.update(metrics)
                if callback is not None:
                    callback(metrics)
                if every and self.step % every == 0 and self.step < total:
                    self.save()
        self.fused_buffers.release()
        self.save()
        if self.writer is not None:
            self.writer.close()
        self.grader.close()
        return self.run_dir


def train(config: TrainConfig, *, run_dir: str | Path | None = None) -> Path:
    """Train with `config`; returns the run folder (metrics.jsonl, samples.jsonl, checkpoints)."""
    return Trainer(config, run_dir=run_dir).run()


def resume(path: str | Path, overrides: dict[str, Any] | None = None) -> Path:
    """Continue a run from its latest complete checkpoint (or the checkpoint folder given)."""
    checkpoint = find_checkpoint(path)
    values = read_state(checkpoint).config
    for section, entries in (overrides or {}).items():
        values.setdefault(section, {}).update(entries)
    return Trainer(config_from_dict(values), resume=checkpoint).run()
