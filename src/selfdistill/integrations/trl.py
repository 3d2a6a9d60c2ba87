"""The TRL route: every entry of `OBJECTIVES` inside TRL's `GRPOTrainer`, for users who outgrow one machine.

    from selfdistill.integrations.trl import SelfDistillConfig, SelfDistillTrainer, boxed_answer_reward

    args = SelfDistillConfig(output_dir="out", objective="dasd", objective_args={"teacher": "frozen", "beta": 1.0},
                             num_generations=8, max_completion_length=1024, use_vllm=True, vllm_mode="colocate")
    trainer = SelfDistillTrainer(model="Qwen/Qwen2.5-1.5B-Instruct", reward_funcs=[boxed_answer_reward()],
                                 args=args, train_dataset=dataset)
    trainer.train()

Why `GRPOTrainer` and not TRL's experimental `SDPOTrainer`: GRPO is TRL's stable on-policy trainer and already
runs vLLM (colocate and server), DeepSpeed ZeRO-2/3, FSDP, gradient accumulation, `num_iterations > 1` (it keeps
the behaviour log-probs), multi-process reward gathering and `report_to`. `SDPOTrainer` is a separate, experimental
re-implementation of that loop whose teacher prompt is a successful sibling rollout, cut to `max_reprompt_len`
tokens; we need a teacher prompt built from the dataset and never cut. So this route subclasses `GRPOTrainer` and
changes three things, nothing else:

1. `_generate_and_score_completions`: after TRL's own rollouts, rewards and group advantages, each row's teacher
   prompt `teacher_prompt(problem, privileged context)` is rendered by TRL's own `_tokenize_prompts` (the same chat
   template, tools and `chat_template_kwargs` as the student's prompt) and added to the batch. A teacher prompt over
   the limit is an error with the numbers; nothing is cut.
2. `_compute_loss`: the teacher's logits over `teacher_prompt ⊕ completion` (no gradient), the student's over
   `prompt ⊕ completion`, `selfdistill.tokenstats.token_stats` (log-probs, entropies and, where the method has
   one, the full-vocabulary divergence, in chunks of tokens), `OBJECTIVES[name]` on them and
   `selfdistill.objectives.aggregate`. No second copy of the math. Without a divergence the teacher's logits are
   reduced to its per-token log-probs and entropies before the student's forward pass.
3. The teacher's weights (`objective_args["teacher"]`): `frozen` (the initial policy; under LoRA the adapter is
   disabled, no second copy), `live` (the current weights, no gradient) or `ema` (a copy moved toward the student
   after each optimizer step by TRL's `SyncRefModelCallback`, `ref_model_mixup_alpha = 1 − ema_decay`).

Datasets follow TRL's conventions: `prompt` (conversational or plain text; what the student sees), the privileged
context in `privileged_context` or `solution` (or the `answer` for the `answer_only` template), the gold answer in
`answer`, and optionally `problem` (the bare problem statement; without it the last user message of `prompt` is
used). A `teacher_prompt` column, when present, is taken as the teacher's prompt as it stands. `problems_to_dataset`
turns `selfdistill.data` problems into such rows.

Loss normalization and TRL's gradient accumulation: `GRPOTrainer` sums the loss of the micro-batches of an optimizer
step (it sets `loss_is_scaled_for_ga`, so neither transformers nor DeepSpeed divide by the accumulation steps) and
the data-parallel engine averages gradients over the processes. Each micro-batch's loss is therefore
`aggregate(ℓ, mask, global_tokens=N, global_sequences=S) × processes`, where N is the number of completion tokens
of the whole optimizer step on every process (TRL's `num_items_in_batch`, which spans the generation batch, times
`gradient_accumulation_steps / steps_per_generation`) and S its number of completions. The sum over micro-batches
and the average over processes is then exactly `aggregate` of the whole step, as in our own trainer.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

try:
    from trl import GRPOConfig, GRPOTrainer
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError("selfdistill.integrations.trl needs TRL: pip install 'selfdistill[trl]'") from error

from selfdistill.config import ConfigError, ObjectiveConfig, objective_from_dict
from selfdistill.data import Problem
from selfdistill.grading import Grader
from selfdistill.objectives import OBJECTIVES, ObjectiveBatch, aggregate
from selfdistill.prompts import TEMPLATES, MissingContextError, PromptTooLongError, fill
from selfdistill.tokenstats import DEFAULT_CHUNK_TOKENS, TokenStats, token_stats

SUPPORTED_TRL = ("1.16",)
"""TRL minor versions this route is tested with (the `trl` extra pins `trl>=1.16,<1.17`)."""

CONTEXT_COLUMNS = ("privileged_context", "solution")
"""Where a worked solution is looked up, in this order, when `context_column` is not set."""

# GRPOTrainer options that change GRPO's own surrogate, which this route replaces by the objective's loss.
_GRPO_LOSS_OPTIONS = {
    "beta": 0.0,  # a KL to a reference model; the teacher is ours
    "top_entropy_quantile": 1.0,
    "entropy_coef": 0.0,
    "use_adaptive_entropy": False,
    "off_policy_mask_threshold": None,
    "delta": None,
    "importance_sampling_level": "token",
}


@dataclass
class SelfDistillConfig(GRPOConfig):
    """`GRPOConfig` plus the objective. Every GRPO option keeps its meaning (vLLM, DeepSpeed, FSDP, accumulation,
    `num_iterations`, `report_to`, ...), except GRPO's own loss options (`loss_type`, `epsilon`, `beta`, entropy
    bonuses): the loss is the objective's, with its clip in `objective_args` (`eps_low`, `eps_high`)."""

    objective: str = field(default="dasd", metadata={"help": "A name in selfdistill.objectives.OBJECTIVES."})
    objective_args: dict | str | None = field(
        default=None,
        metadata={"help": "Fields of selfdistill.config.ObjectiveConfig other than `method` (a dict or its JSON): "
                  "teacher (frozen | live | ema), ema_decay, aggregation, the method's knobs (beta, rho, lam, "
                  "g_min, eps_low, eps_high, ...) and divergence_beta / divergence_clip / divergence_top_k."},
    )
    teacher_template: str = field(
        default="opsd_mild",
        metadata={"help": "The teacher prompt's template, from selfdistill.prompts.TEMPLATES (its teacher message)."},
    )
    problem_column: str = field(default="problem", metadata={"help": "The bare problem statement, if present."})
    context_column: str | None = field(
        default=None, metadata={"help": "The privileged context; None: privileged_context, else solution."})
    answer_column: str = field(default="answer", metadata={"help": "The gold answer."})
    max_teacher_prompt_length: int | None = field(
        default=None,
        metadata={"help": "A longer teacher prompt is an error (never cut). None: the model's context length "
                  "minus max_completion_length."},
    )
    stats_chunk_tokens: int = field(
        default=DEFAULT_CHUNK_TOKENS, metadata={"help": "Positions per chunk of the token statistics."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.objective_args, str):
            self.objective_args = json.loads(self.objective_args)
        args = dict(self.objective_args or {})
        for key in ("name", "method"):
            if key in args:
                raise ConfigError(f"objective_args.{key}: name the method in `objective`, not in objective_args")
        self.objective_config = objective_from_dict({"name": self.objective, **args}, prefix="objective_args.")
        objective = OBJECTIVES[self.objective]
        if self.teacher_template not in TEMPLATES:
            raise ConfigError(f"teacher_template: unknown template {self.teacher_template!r}; "
                              f"choose one of {sorted(TEMPLATES)}")
        if TEMPLATES[self.teacher_template].context == "sibling":
            raise ConfigError("teacher_template: the sibling-rollout teacher is TRL's SDPOTrainer; this route "
                              "takes the privileged context from the dataset")
        for name, neutral in _GRPO_LOSS_OPTIONS.items():
            if getattr(self, name) != neutral:
                raise ConfigError(f"{name}={getattr(self, name)!r} changes GRPO's own loss, which this trainer "
                                  f"replaces by the {self.objective!r} objective; leave it at {neutral!r}")
        if not objective.std_normalize and self.scale_rewards != "none":
            raise ConfigError(f"objective {self.objective!r} centres rewards without dividing by their std: "
                              f"set scale_rewards='none' (got {self.scale_rewards!r})")
        teacher = self.objective_config.teacher
        if objective.needs_teacher and teacher != "frozen" and self.num_iterations > 1:
            raise ConfigError(f"objective_args.teacher={teacher!r} with num_iterations={self.num_iterations}: the "
                              "teacher would score later iterations with updated weights; the teacher statistics "
                              "must come from the weights that sampled the rollouts (use teacher='frozen')")
        if self.stats_chunk_tokens < 1:
            raise ConfigError(f"stats_chunk_tokens must be >= 1, got {self.stats_chunk_tokens}")
        if self.max_teacher_prompt_length is not None and self.max_teacher_prompt_length < 1:
            raise ConfigError(f"max_teacher_prompt_length must be >= 1 or None, got {self.max_teacher_prompt_length}")
        if objective.needs_teacher and teacher == "ema":
            # TRL's SyncRefModelCallback: teacher ← (1 − α)·teacher + α·student every `ref_model_sync_steps` steps
            self.ref_model_mixup_alpha = 1.0 - self.objective_config.ema_decay
            self.ref_model_sync_steps = 1


# ----------------------------------------------------------------------------------------------
# datasets and rewards


def problems_to_dataset(problems: Sequence[Problem], *, template: str = "opsd_mild",
                        system_prompt: str | None = None) -> list[dict[str, Any]]:
    """Rows in TRL's conventions from `selfdistill.data` problems: `prompt` (the student's chat messages under
    `template`), `problem`, `privileged_context` (the worked solution, "" when there is none), `answer`.

    Pass the list to `datasets.Dataset.from_list`."""
    student = TEMPLATES[template].student
    system = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    return [{"prompt": [*system, {"role": "user", "content": fill(student, {"problem": p.problem})}],
             "problem": p.problem, "privileged_context": p.solution or "", "answer": p.answer} for p in problems]


class BoxedAnswerReward:
    """A TRL reward function: 1.0 when a completion's final answer (the last `\\boxed{}`, see
    `selfdistill.grading.extract_answer`) is math-verify-equivalent to the row's answer, else 0.0.

    Grading runs in `selfdistill.grading.Grader` worker processes with a time bound per completion; each
    training process makes its own pool on first use.
    """

    def __init__(self, answer_column: str = "answer", *, workers: int | None = 2, timeout: float = 5.0) -> None:
        self.answer_column = answer_column
        self.workers = workers
        self.timeout = timeout
        self.__name__ = "boxed_answer"  # TRL names the reward's metrics after it
        self._grader: Grader | None = None

    def __call__(self, prompts: list, completions: list, **columns: Any) -> list[float]:
        if self.answer_column not in columns:
            raise KeyError(f"the reward needs the dataset column {self.answer_column!r}; got {sorted(columns)}")
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        if self._grader is None:
            self._grader = Grader(workers=self.workers, timeout=self.timeout)
        return self._grader.grade_many(texts, [str(a) for a in columns[self.answer_column]])

    def close(self) -> None:
        if self._grader is not None:
            self._grader.close()
            self._grader = None


def boxed_answer_reward(answer_column: str = "answer", **grader_options: Any) -> BoxedAnswerReward:
    """`BoxedAnswerReward(answer_column, ...)`: pass it in `reward_funcs`."""
    return BoxedAnswerReward(answer_column, **grader_options)


# ----------------------------------------------------------------------------------------------
# the trainer


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    last = messages[-1]
    if last.get("role") != "user":
        raise ValueError(f"the prompt must end with a user message to build the teacher prompt; it ends with "
                         f"role {last.get('role')!r} (give a `problem` or `teacher_prompt` column instead)")
    content = last["content"]
    return content if isinstance(content, str) else " ".join(p.get("text", "") for p in content if p["type"] == "text")


class SelfDistillTrainer(GRPOTrainer):
    """`GRPOTrainer` whose loss is `OBJECTIVES[args.objective]` on `selfdistill.tokenstats` statistics; see the
    module's docstring for what changes and how the loss is normalized."""

    _tag_names = ["trl", "selfdistill"]
    _name = "SelfDistill"

    def __init__(self, model, reward_funcs, args: SelfDistillConfig, train_dataset=None, **kwargs: Any) -> None:
        if not isinstance(args, SelfDistillConfig):
            raise TypeError(f"args must be a SelfDistillConfig, got {type(args).__name__}")
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset, **kwargs)
        self.objective_config: ObjectiveConfig = args.objective_config
        self.objective = OBJECTIVES[args.objective]
        self.objective_knobs = self.objective_config.knobs
        self.divergence = self.objective_config.divergence_spec()
        self.aggregation = self.objective_config.aggregation or self.objective.aggregation
        self.template = TEMPLATES[args.teacher_template]
        self.teacher_model = None
        self._teacher_is_base = False  # frozen teacher under LoRA: the student with its adapter disabled
        unwrapped = self.accelerator.unwrap_model(self.model)
        base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
        self._keeps_logits = "logits_to_keep" in inspect.signature(type(base).forward).parameters
        if self.objective.needs_teacher:
            self._setup_teacher()
            if train_dataset is not None and hasattr(train_dataset, "__len__"):
                self.check_teacher_prompts(train_dataset)

    # -- set-up

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        args = self.args
        ours = ["teacher_prompt", args.problem_column, args.answer_column, *CONTEXT_COLUMNS]
        if args.context_column is not None:
            ours.append(args.context_column)
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *ours]))

    def _setup_teacher(self) -> None:
        from accelerate.utils import is_peft_model

        mode = self.objective_config.teacher
        unwrapped = self.accelerator.unwrap_model(self.model)
        if mode == "live":
            return
        if mode == "frozen" and is_peft_model(unwrapped):
            self._teacher_is_base = True  # the adapter disabled: no second copy of the weights
            return
        if is_peft_model(unwrapped):  # ema under LoRA
            raise ConfigError("objective_args.teacher='ema' under PEFT is not supported by this route (TRL syncs a "
                              "separate reference model only without PEFT); use 'frozen' (adapter disabled) or 'live'")
        self.teacher_model = self._initial_copy(unwrapped)
        if mode == "ema":
            from trl.trainer.callbacks import SyncRefModelCallback

            self.add_callback(SyncRefModelCallback(ref_model=self.teacher_model, accelerator=self.accelerator))

    def _initial_copy(self, unwrapped: torch.nn.Module) -> torch.nn.Module:
        """A frozen copy of the initial weights, loaded and sharded as TRL loads its reference model."""
        from trl.models import prepare_deepspeed, prepare_fsdp
        from trl.trainer.utils import create_model_from_path, disable_dropout_in_model

        name = unwrapped.config._name_or_path
        if name:
            init = dict(self.args.model_init_kwargs or {})
            if self.args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
                init["device_map"] = None
            init.setdefault("trust_remote_code", self.args.trust_remote_code)
            init.setdefault("dtype", unwrapped.dtype)
            init.setdefault("attn_implementation", unwrapped.config._attn_implementation)
            teacher = create_model_from_path(name, **init)
        elif self.is_deepspeed_enabled:
            raise ConfigError("a frozen or EMA teacher under DeepSpeed needs a model loaded from a path or hub id "
                              "(its weights are sharded here and cannot be copied)")
        else:  # a model built in memory: the same class and config, the initial weights copied
            teacher = type(unwrapped)(unwrapped.config).to(unwrapped.dtype)
            teacher.load_state_dict(unwrapped.state_dict())
        teacher.requires_grad_(False)
        teacher.eval()
        if self.args.disable_dropout:
            disable_dropout_in_model(teacher)
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(teacher, self.accelerator)
        if self.is_fsdp_enabled:
            return prepare_fsdp(teacher, self.accelerator)
        return self.accelerator.prepare_model(teacher, evaluation_mode=True)

    # -- teacher prompts

    def teacher_prompt(self, row: dict[str, Any], index: int | str = "?") -> str | list[dict[str, Any]]:
        """The teacher's prompt for a dataset row, in the row's format (chat messages or text)."""
        if row.get("teacher_prompt") is not None:
            return row["teacher_prompt"]
        args, prompt = self.args, row["prompt"]
        conversational = isinstance(prompt, list)
        problem = row.get(args.problem_column)
        if problem is None:
            problem = _last_user_text(prompt) if conversational else prompt
        context_kind = self.template.context
        if context_kind == "answer":
            column = args.answer_column
        elif args.context_column is not None:
            column = args.context_column
        else:
            column = next((c for c in CONTEXT_COLUMNS if row.get(c) is not None), CONTEXT_COLUMNS[0])
        value = row.get(column)
        if value is None or not str(value).strip():
            raise MissingContextError(f"teacher_template {self.template.name!r} needs a {context_kind} for the "
                                      f"teacher, but column {column!r} of row {index} is empty or missing")
        message = fill(self.template.teacher, {"problem": problem, context_kind: str(value)})
        if not conversational:
            return message
        return [*prompt[:-1], {"role": "user", "content": message}]

    def _teacher_prompt_limit(self) -> int:
        if self.args.max_teacher_prompt_length is not None:
            return self.args.max_teacher_prompt_length
        config = self.accelerator.unwrap_model(self.model).config.get_text_config()
        positions = getattr(config, "max_position_embeddings", None)
        return math.inf if positions is None else positions - self.max_completion_length

    def teacher_prompt_ids(self, rows: Sequence[dict[str, Any]], start: int = 0) -> list[list[int]]:
        """Token ids of the rows' teacher prompts, rendered as TRL renders the student's; raises
        `PromptTooLongError` for one over the limit (never cut)."""
        prompts = [self.teacher_prompt(row, start + i) for i, row in enumerate(rows)]
        keys = [json.dumps(p, sort_keys=True, default=str) for p in prompts]
        distinct = list(dict.fromkeys(keys))  # each prompt's G rows share one rendering
        first = {key: keys.index(key) for key in distinct}
        rendered, _, _ = self._tokenize_prompts([prompts[first[key]] for key in distinct])
        ids_of = {key: list(ids) for key, ids in zip(distinct, rendered, strict=True)}
        limit = self._teacher_prompt_limit()
        for key in distinct:
            if len(ids_of[key]) > limit:
                error = PromptTooLongError(length=len(ids_of[key]), limit=int(limit),
                                           problem_id=f"row {start + first[key]}", role="teacher")
                error.args = (f"the teacher prompt of row {start + first[key]} is {len(ids_of[key])} tokens, over "
                              f"the limit of {int(limit)} (max_teacher_prompt_length, or the model's context minus "
                              f"max_completion_length={self.max_completion_length}); teacher prompts are never "
                              "cut: raise the limit or drop the row",)
                raise error
        return [ids_of[key] for key in keys]

    def check_teacher_prompts(self, dataset, batch_rows: int = 256) -> None:
        """Render every teacher prompt of a dataset once, so that a missing context or an over-long prompt fails
        before the first rollout."""
        for start in range(0, len(dataset), batch_rows):
            rows = [dataset[i] for i in range(start, min(start + batch_rows, len(dataset)))]
            self.teacher_prompt_ids(rows, start)

    # -- the batch

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        output = super()._generate_and_score_completions(inputs)
        if self.objective.needs_teacher:
            device = output["prompt_ids"].device
            ids = [torch.tensor(row) for row in self.teacher_prompt_ids(inputs)]
            width = max(len(row) for row in ids)
            pad_id = self._tokenizer.pad_token_id
            teacher_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)  # [B,Pt] left-padded
            teacher_mask = torch.zeros((len(ids), width), dtype=torch.long)  # [B,Pt]
            for row, row_ids in enumerate(ids):
                teacher_ids[row, width - len(row_ids):] = row_ids
                teacher_mask[row, width - len(row_ids):] = 1
            output["teacher_prompt_ids"] = teacher_ids.to(device)
            output["teacher_prompt_mask"] = teacher_mask.to(device)
        return output

    # -- the loss

    def _response_logits(self, model, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                         completion_mask: Tensor) -> Tensor:
        """Logits `[B,T,V]` at the positions that predict each completion token (not yet divided by the
        temperature: `token_stats` does that)."""
        T = completion_ids.size(1)
        inputs = {"input_ids": torch.cat([prompt_ids, completion_ids], dim=1),  # [B,P+T]
                  "attention_mask": torch.cat([prompt_mask, completion_mask], dim=1),  # [B,P+T]
                  "use_cache": False}
        if self._keeps_logits:
            inputs["logits_to_keep"] = T + 1
        with self.accelerator.autocast():
            logits = model(**inputs).logits  # [B,T+1,V] (or [B,P+T,V])
        return logits[:, -T - 1 : -1]  # [B,T,V]

    @contextmanager
    def _teacher(self, model):
        """The module that runs the teacher's forward pass, in eval mode, without gradient."""
        if self.teacher_model is not None:
            yield self.teacher_model
            return
        if self._teacher_is_base:
            from trl.trainer.utils import use_adapter

            switch = use_adapter(self.accelerator.unwrap_model(model), adapter_name=None)
        else:  # live
            switch = nullcontext()
        was_training = model.training
        model.eval()
        try:
            with switch:
                yield model
        finally:
            model.train(was_training)

    def objective_terms(self, model, inputs: dict[str, Any]) -> tuple[Tensor, TokenStats, Tensor, dict[str, Tensor]]:
        """(per-token loss `[B,T]`, statistics, mask `[B,T]`, diagnostics) of the objective on one micro-batch."""
        completion_ids = inputs["completion_ids"]  # [B,T]
        completion_mask = inputs["completion_mask"]  # [B,T]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        mask = mask.float()  # [B,T]
        teacher_logits = teacher_own = None
        if self.objective.needs_teacher:  # first, so its activations are gone before the student's forward
            with torch.no_grad(), self._teacher(model) as teacher:
                teacher_logits = self._response_logits(teacher, inputs["teacher_prompt_ids"],
                                                       inputs["teacher_prompt_mask"], completion_ids,
                                                       completion_mask)  # [B,T,V]
                if self.divergence is None:  # only the teacher's own log-probs and entropies are needed: keep those
                    teacher_own = token_stats(teacher_logits, completion_ids, temperature=self.temperature,
                                              chunk_tokens=self.args.stats_chunk_tokens)  # [B,T] fields
                    teacher_logits = None
        student_logits = self._response_logits(model, inputs["prompt_ids"], inputs["prompt_mask"], completion_ids,
                                                completion_mask)  # [B,T,V]
        stats = token_stats(student_logits, completion_ids, temperature=self.temperature,
                            teacher_logits=teacher_logits, divergence=self.divergence,
                            chunk_tokens=self.args.stats_chunk_tokens)  # every field [B,T]
        if teacher_own is not None:  # the formulas token_stats applies to teacher logits given beside the student's
            stats = replace(stats, teacher_logp=teacher_own.logp, teacher_entropy=teacher_own.entropy)
        batch = ObjectiveBatch(stats=stats, mask=mask, group_adv=inputs["advantages"].float(),
                               old_logp=inputs.get("old_per_token_logps"))
        per_token, diagnostics = self.objective(batch, **self.objective_knobs)  # [B,T]
        return per_token, stats, mask, diagnostics

    def _compute_loss(self, model, inputs: dict[str, Any]) -> Tensor:
        mode = "train" if self.model.training else "eval"
        per_token, stats, mask, diagnostics = self.objective_terms(model, inputs)
        if "importance_sampling_ratio" in inputs:  # TRL's correction for vLLM's sampling mismatch, [B,T] or [B,1]
            per_token = per_token * inputs["importance_sampling_ratio"]
        processes = self.accelerator.num_processes
        if mode == "train":
            steps_per_window = self.current_gradient_accumulation_steps / self.args.steps_per_generation
        else:
            steps_per_window = 1.0
        global_tokens = float(inputs["num_items_in_batch"]) * steps_per_window
        global_sequences = mask.shape[0] * processes * (self.current_gradient_accumulation_steps
                                                        if mode == "train" else 1)
        loss = aggregate(per_token, mask, mode=self.aggregation, global_tokens=global_tokens,
                         global_sequences=global_sequences, norm_length=self.max_completion_length) * processes
        self._log_statistics(mode, stats, mask, diagnostics)
        return loss

    def _log_statistics(self, mode: str, stats: TokenStats, mask: Tensor, diagnostics: dict[str, Tensor]) -> None:
        """Token-weighted means over every process into TRL's metrics (averaged again at each `log`)."""
        named = {"entropy": stats.entropy, "teacher_entropy": stats.teacher_entropy,
                 "teacher_logp_gap": None if stats.teacher_logp is None else stats.teacher_logp - stats.logp,
                 "divergence": stats.divergence}
        rows = [(name, (value.detach() * mask).sum(), mask.sum()) for name, value in named.items() if value is not None]
        n = mask.sum()
        rows += [(name, value.detach().float() * n, n) for name, value in sorted(diagnostics.items())]
        local = torch.stack([torch.stack([total, count]) for _, total, count in rows])  # [K,2]
        totals = self.accelerator.reduce(local, reduction="sum")  # [K,2]
        for (name, _, _), (total, count) in zip(rows, totals.tolist(), strict=True):
            self._metrics[mode][name].append(total / max(count, 1.0))
