"""The TRL route: every entry of `OBJECTIVES` inside TRL's `GRPOTrainer`, for users who outgrow one machine.

    from selfdistill.integrations.trl import SelfDistillConfig, SelfDistillTrainer, boxed_answer_reward

    args = SelfDistillConfig(output_dir="out", objective="dasd", objective_args={"teacher": "frozen"},
                             num_generations=8, max_completion_length=1024, use_vllm=True, vllm_mode="colocate")
    trainer = SelfDistillTrainer(model="Qwen/Qwen2.5-1.5B-Instruct", reward_funcs=[boxed_answer_reward()],
                                 args=args, train_dataset=dataset)
    trainer.train()

Why `GRPOTrainer` and not TRL's experimental `SDPOTrainer`: GRPO is TRL's stable on-policy trainer and already
runs vLLM (colocate and server), DeepSpeed ZeRO-2/3, FSDP, gradient accumulation, `num_iterations > 1` (it keeps
the behaviour log-probs), multi-process reward gathering and `report_to`. `SDPOTrainer` is a separate, experimental
re-implementation of that loop whose teacher prompt is a successful sibling rollout, cut to `max_reprompt_len`
tokens; we need a teacher prompt built from the dataset and never cut. So this route subclasses `GRPOTrainer` and
changes these things, nothing else:

1. `_generate_and_score_completions`: after TRL's own rollouts, rewards and group advantages, each row's teacher
   prompt `teacher_prompt(problem, privileged context)` is rendered by TRL's own `_tokenize_prompts` (the same chat
   template, tools and `chat_template_kwargs` as the student's prompt) and added to the batch. A teacher prompt over
   the limit is an error with the numbers; nothing is cut.
2. `_compute_loss`: the teacher's final hidden states over `teacher_prompt ⊕ completion` (no gradient), then the
   student's over `prompt ⊕ completion`, each through its own wrapper's forward (TRL's `_ForwardRedirection`, so
   DDP, DeepSpeed and FSDP see a forward pass), and `selfdistill.tokenstats.hidden_objective`, the fused output
   layer our own trainer uses: log-probs, entropies and, where the method has one, the full-vocabulary divergence,
   formed block by block from the hidden states and the two output weights, with `OBJECTIVES[name]` applied to
   each block through `objectives.BlockObjective`, as in our trainer. No `[B,T,V]` logits exist, for the student
   or the teacher. The output weight is gathered as TRL's
   own fused output layer gathers it (ZeRO-3: `GatheredParameters` for the duration; FSDP2: `full_tensor()`), and
   the gradient is taken inside the forward pass. A model whose head is not plain `h @ W.T` (a bias, a logit
   scale or soft-cap, a prompt-learning adapter, ...) takes the full-logits path (`token_stats` on the model's
   own logits) with a `FullLogitsWarning` that names the reason. No second copy of the math either way.
3. The teacher's weights (`objective_args["teacher"]`): `frozen` (the initial policy; under LoRA the adapter is
   disabled, no second copy), `live` (the current weights, no gradient) or `ema` (a copy moved toward the student
   after each optimizer step by `selfdistill.integrations.ema.ShardedEma`: a float32 average of this process's
   shard of each weight, saved with each checkpoint and restored on resume).
4. The step the objective sees (`BlockObjective.step`, e.g. REOPOLD's phase switch) is the number of rollout
   batches completed, as in our trainer: `global_step × gradient_accumulation_steps / (steps_per_generation ×
   num_iterations)` (`global_step // num_iterations` at TRL's defaults).

Datasets follow TRL's conventions: `prompt` (conversational or plain text; what the student sees), the privileged
context in `privileged_context` or `solution` (or the `answer` for the `answer_only` template), the gold answer in
`answer`, and optionally `problem` (the bare problem statement; without it the last user message of `prompt` is
used). A `teacher_prompt` column, when present, is taken as the teacher's prompt as it stands. `problems_to_dataset`
turns `selfdistill.data` problems into such rows.

Loss normalization and TRL's gradient accumulation: `GRPOTrainer` sums the loss of the micro-batches of an optimizer
step (it sets `loss_is_scaled_for_ga`, so neither transformers nor DeepSpeed divide by the accumulation steps) and
the data-parallel engine averages gradients over the processes. Each micro-batch's loss is therefore
`aggregate(ℓ, mask, global_tokens=N, global_sequences=S) × processes`, where N is the number of completion tokens
of the optimizer step's own micro-batches on every process (counted once per generation batch, when it is split
into micro-batches; `gradient_accumulation_steps` must divide `steps_per_generation`, so an optimizer step never
spans two generation batches) and S its number of completions. The sum over micro-batches and the average over
processes is then exactly `aggregate` of the whole step, as in our own trainer.

GRPO options this route cannot honour are refused when the config is made, each with the reason: GRPO's own loss
(`beta`, `loss_type`, `epsilon`, `epsilon_high`, entropy bonuses, off-policy masks, sequence-level sampling),
`cast_lm_head_to_fp32`, `sync_ref_model`; and by the trainer: `environment_factory` and multimodal inputs.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import warnings
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

try:
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.models.utils import _ForwardRedirection
    from trl.trainer.utils import maybe_gather_lm_head_ctx
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError("selfdistill.integrations.trl needs TRL: pip install 'selfdistill[trl]'") from error

from selfdistill.config import ConfigError, ObjectiveConfig, objective_from_dict
from selfdistill.data import Problem
from selfdistill.forward import PackedBatch, base_model, check_output_layer, output_weight, response_hidden_states
from selfdistill.grading import Grader
from selfdistill.integrations.ema import ShardedEma
from selfdistill.objectives import OBJECTIVES, BlockObjective, token_weights
from selfdistill.prompts import TEMPLATES, MissingContextError, PromptTooLongError, fill
from selfdistill.tokenstats import (
    DEFAULT_CHUNK_TOKENS,
    FusedBuffers,
    FusedResult,
    TokenStats,
    hidden_objective,
    token_stats,
)

SUPPORTED_TRL = ("1.16",)
"""TRL minor versions this route is tested with (the `trl` extra pins `trl>=1.16,<1.17`)."""

CONTEXT_COLUMNS = ("privileged_context", "solution")
"""Where a worked solution is looked up, in this order, when `context_column` is not set."""

_OBJECTIVE_LOSS = "the loss is the objective's (with its aggregation in objective_args.aggregation)"
_OBJECTIVE_CLIP = "the clip is the objective's: set objective_args eps_low / eps_high (methods with a ratio)"

# GRPOConfig options this route cannot honour: (the value that leaves them out, why).
_REFUSED_OPTIONS = {
    "beta": (0.0, "a KL to a reference model; the teacher is the objective's (objective_args.teacher)"),
    "loss_type": ("dapo", f"GRPO's own loss formulation; {_OBJECTIVE_LOSS}"),
    "epsilon": (0.2, f"GRPO's clip; {_OBJECTIVE_CLIP}"),
    "epsilon_high": (None, f"GRPO's upper clip; {_OBJECTIVE_CLIP}"),
    "top_entropy_quantile": (1.0, f"GRPO's high-entropy token mask; {_OBJECTIVE_LOSS}"),
    "entropy_coef": (0.0, f"GRPO's entropy bonus; {_OBJECTIVE_LOSS}"),
    "use_adaptive_entropy": (False, f"GRPO's adaptive entropy bonus; {_OBJECTIVE_LOSS}"),
    "off_policy_mask_threshold": (None, f"GRPO's off-policy sequence mask; {_OBJECTIVE_LOSS}"),
    "delta": (None, f"GRPO's two-sided clip; {_OBJECTIVE_CLIP}"),
    "importance_sampling_level": ("token", f"GRPO's sequence-level ratio; {_OBJECTIVE_LOSS}"),
    "cast_lm_head_to_fp32": (False, "TRL casts only the student's output layer (the teacher's stays in its own "
                             "dtype, which biases the teacher-student log-prob gap); this route forms both "
                             "models' logits itself, block by block, with float32 statistics"),
    "sync_ref_model": (False, "TRL's reference-model sync; the EMA teacher is objective_args teacher='ema' with "
                       "ema_decay (a float32 average kept by this route)"),
}

MULTIMODAL_COLUMNS = ("image", "images")
"""Dataset columns that make TRL run a multimodal model; refused (the response forward is text only)."""


class FullLogitsWarning(UserWarning):
    """The TRL route computes the token statistics from the model's full `[B,T,V]` logits, not from its hidden
    states; the message names why (a head that is not plain `h @ W.T`, a prompt-learning adapter, ...)."""


@dataclass
class SelfDistillConfig(GRPOConfig):
    """`GRPOConfig` plus the objective. Every GRPO option keeps its meaning (vLLM, DeepSpeed, FSDP, accumulation,
    `num_iterations`, `report_to`, ...), except GRPO's own loss options (`loss_type`, `epsilon`, `epsilon_high`,
    `beta`, entropy bonuses), which are refused with the reason: the loss is the objective's, with its clip in
    `objective_args` (`eps_low`, `eps_high`)."""

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
        default=DEFAULT_CHUNK_TOKENS,
        metadata={"help": "Positions per chunk of the token statistics on the full-logits path (models whose head "
                  "is not plain h @ W.T)."})
    fused_chunk_tokens: int | None = field(
        default=None,
        metadata={"help": "Positions whose student logits the fused output layer holds at once (None: as many as "
                  "fit in 32 MiB of float32 logits; longer rows are streamed a few positions at a time)."})

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
        for name, (neutral, why) in _REFUSED_OPTIONS.items():
            if getattr(self, name) != neutral:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not supported by the selfdistill TRL route: "
                                  f"{why}; leave it at {neutral!r}")
        accumulation, per_generation = self.gradient_accumulation_steps, self.steps_per_generation
        if per_generation % accumulation != 0:
            raise ConfigError(
                f"gradient_accumulation_steps={accumulation} does not divide steps_per_generation={per_generation}: "
                "an optimizer step would span two generation batches, and the loss's token count (the tokens of "
                "the step's own micro-batches) is not known when its first micro-batch is scored; make "
                "steps_per_generation a multiple of gradient_accumulation_steps (TRL's default makes them equal)")
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
        if self.fused_chunk_tokens is not None and self.fused_chunk_tokens < 1:
            raise ConfigError(f"fused_chunk_tokens must be >= 1 or None, got {self.fused_chunk_tokens}")
        if self.max_teacher_prompt_length is not None and self.max_teacher_prompt_length < 1:
            raise ConfigError(f"max_teacher_prompt_length must be >= 1 or None, got {self.max_teacher_prompt_length}")


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


EMA_TEACHER_FILE = "selfdistill_ema_teacher.pt"
"""The EMA teacher's float32 average in a checkpoint folder (one file per process when the weights are sharded:
`selfdistill_ema_teacher.rank{r}-of-{n}.pt`)."""


@dataclass
class ObjectiveTerms:
    """One micro-batch through the objective: the loss to backpropagate (normalized for the whole optimizer step,
    see the module's docstring), the statistics, the mask `[B,T]` and the diagnostics as sums over the
    micro-batch's tokens (`BlockObjective`)."""

    loss: Tensor
    stats: TokenStats
    mask: Tensor
    diagnostic_sums: dict[str, Tensor]


class _EmaTeacherCallback(TrainerCallback):
    """Moves the EMA teacher toward the student after each optimizer step."""

    def __init__(self, trainer: SelfDistillTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.ema_average().update()


class SelfDistillTrainer(GRPOTrainer):
    """`GRPOTrainer` whose loss is `OBJECTIVES[args.objective]` on `selfdistill.tokenstats` statistics; see the
    module's docstring for what changes and how the loss is normalized."""

    _tag_names = ["trl", "selfdistill"]
    _name = "SelfDistill"

    def __init__(self, model, reward_funcs, args: SelfDistillConfig, train_dataset=None, **kwargs: Any) -> None:
        if not isinstance(args, SelfDistillConfig):
            raise TypeError(f"args must be a SelfDistillConfig, got {type(args).__name__}")
        if kwargs.get("environment_factory") is not None:
            raise ConfigError("environment_factory is not supported by the selfdistill TRL route: an environment "
                              "belongs to one rollout, while the route renders one teacher prompt per dataset row "
                              "from its privileged context; the pairing of environments and teacher prompts would "
                              "be lost")
        columns = set(getattr(train_dataset, "column_names", None) or [])
        if columns & set(MULTIMODAL_COLUMNS):
            raise ConfigError(f"multimodal inputs are not supported by the selfdistill TRL route: the dataset has "
                              f"the column(s) {sorted(columns & set(MULTIMODAL_COLUMNS))}, and the teacher's and "
                              "student's response forward passes take text only (the images would be dropped)")
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset, **kwargs)
        if self._is_vlm:
            raise ConfigError("multimodal inputs are not supported by the selfdistill TRL route: processing_class "
                              f"is a processor ({type(self.processing_class).__name__}), and the teacher's and "
                              "student's response forward passes take text only; pass the tokenizer")
        self.objective_config: ObjectiveConfig = args.objective_config
        self.objective = OBJECTIVES[args.objective]
        self.objective_knobs = self.objective_config.knobs
        self.divergence = self.objective_config.divergence_spec()
        self.aggregation = self.objective_config.aggregation or self.objective.aggregation
        self.template = TEMPLATES[args.teacher_template]
        self.teacher_model = None
        self._teacher_is_base = False  # frozen teacher under LoRA: the student with its adapter disabled
        self._ema: ShardedEma | None = None  # built once the models are prepared (`ema_average`)
        self._counted_generation: list | None = None  # the generation batch whose step token counts are set
        self._forward_redirection = _ForwardRedirection()
        self._fused_buffers = FusedBuffers()
        unwrapped = self.accelerator.unwrap_model(self.model)
        self._keeps_logits = "logits_to_keep" in inspect.signature(type(base_model(unwrapped)).forward).parameters
        self.full_logits_reason = self._full_logits_reason()
        if self.full_logits_reason is not None:
            warnings.warn(f"the selfdistill TRL route computes the token statistics from the model's full [B,T,V] "
                          f"logits (memory grows with completion length x vocabulary), not from its hidden states: "
                          f"{self.full_logits_reason}", FullLogitsWarning, stacklevel=2)
        if self.objective.needs_teacher:
            self._setup_teacher()
            if train_dataset is not None and hasattr(train_dataset, "__len__"):
                self.check_teacher_prompts(train_dataset)

    def _full_logits_reason(self) -> str | None:
        """Why the statistics cannot come from the hidden states through `hidden_objective`, or None if they can."""
        from accelerate.utils import is_peft_model
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        unwrapped = self.accelerator.unwrap_model(self.model)
        model = base_model(unwrapped)
        if is_peft_model(unwrapped):
            from peft import PromptLearningConfig
            from peft.tuners.tuners_utils import BaseTunerLayer

            if any(isinstance(config, PromptLearningConfig) for config in unwrapped.peft_config.values()):
                return ("a prompt-learning adapter adds virtual tokens in PeftModel.forward, which a call of the "
                        "decoder alone would skip")
            tied = getattr(model.config.get_text_config(), "tie_word_embeddings", False)
            if tied and isinstance(model.get_input_embeddings(), BaseTunerLayer):
                return "an adapter on the input embedding, which is tied to the output layer"
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        if decoder is None or decoder is model:
            return f"{type(model).__name__} exposes no decoder apart from its output layer (get_decoder)"
        try:  # under ZeRO-3 the weights are partitioned already: the named checks only, no probe forward
            check_output_layer(model, probe=not is_deepspeed_zero3_enabled())
        except NotImplementedError as error:
            return str(error)
        return None

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
            raise ConfigError("objective_args.teacher='ema' under PEFT is not supported by this route (the average "
                              "would need a second copy of the adapted model); use 'frozen' (adapter disabled) or "
                              "'live'")
        fsdp_plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        if mode == "ema" and self.is_fsdp_enabled and getattr(fsdp_plugin, "fsdp_version", 1) != 2:
            raise ConfigError("objective_args.teacher='ema' under FSDP needs FSDP 2 (fsdp_version: 2, see "
                              "examples/trl/fsdp2.yaml): FSDP 1 flattens the weights into shards that do not "
                              "follow the parameters, and the EMA is kept parameter by parameter")
        self.teacher_model = self._initial_copy(unwrapped)
        if mode == "ema":
            self.add_callback(_EmaTeacherCallback(self))

    def ema_average(self) -> ShardedEma:
        """The EMA teacher's float32 average, built on first use from the prepared (possibly sharded) models."""
        if self._ema is None:
            student = self.accelerator.unwrap_model(self.model).named_parameters()
            teacher = self.accelerator.unwrap_model(self.teacher_model).named_parameters()
            self._ema = ShardedEma(student, teacher, decay=self.objective_config.ema_decay)
        return self._ema

    def _keeps_ema(self) -> bool:
        return self.objective.needs_teacher and self.objective_config.teacher == "ema"

    def _ema_file(self, folder: str) -> str:
        if self.ema_average().sharded:
            index, count = self.accelerator.process_index, self.accelerator.num_processes
            return os.path.join(folder, EMA_TEACHER_FILE.replace(".pt", f".rank{index}-of-{count}.pt"))
        return os.path.join(folder, EMA_TEACHER_FILE)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self._keeps_ema() and (self.ema_average().sharded or self.args.should_save):
            os.makedirs(output_dir, exist_ok=True)
            torch.save(self.ema_average().state_dict(), self._ema_file(output_dir))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or not self._keeps_ema():
            return
        path = self._ema_file(checkpoint)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"resuming a run with objective_args teacher='ema' needs the teacher's average "
                                    f"{os.path.basename(path)} in {checkpoint}; it is missing (a checkpoint written "
                                    "with save_only_model, by another process count, or by an older version)")
        self.ema_average().load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

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
                row = f"row {start + first[key]}"
                raise PromptTooLongError(
                    length=len(ids_of[key]), limit=int(limit), problem_id=row, role="teacher", where=row,
                    limit_source=f"max_teacher_prompt_length, or the model's context minus "
                                 f"max_completion_length={self.max_completion_length}",
                    remedy="raise the limit or drop the row")
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
        visual = sorted(key for key in output if key.startswith(("pixel_", "image_")))
        if visual:
            raise ConfigError(f"multimodal inputs are not supported by the selfdistill TRL route: the batch carries "
                              f"{visual}, and the response forward passes take text only")
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

    def _prepare_inputs(self, generation_batch: dict[str, Any]) -> dict[str, Any]:
        inputs = super()._prepare_inputs(generation_batch)
        if self.model.training and self._buffered_inputs is not self._counted_generation:
            self._count_step_tokens(self._buffered_inputs)
            self._counted_generation = self._buffered_inputs
        return inputs

    def _count_step_tokens(self, micro_batches: list[dict[str, Any]]) -> None:
        """Set `step_tokens` in each micro-batch of a new generation batch: the loss tokens of its optimizer step's
        `gradient_accumulation_steps` micro-batches on every process (one collective per generation batch)."""
        local = torch.stack([self._loss_mask(batch).sum() for batch in micro_batches]).float()  # [S]
        per_micro_batch = self.accelerator.reduce(local, reduction="sum")  # [S] summed over processes
        per_step = per_micro_batch.view(-1, self.args.gradient_accumulation_steps).sum(dim=1)  # [S/GA]
        for index, batch in enumerate(micro_batches):
            batch["step_tokens"] = per_step[index // self.args.gradient_accumulation_steps]

    @staticmethod
    def _loss_mask(inputs: dict[str, Any]) -> Tensor:
        mask = inputs["completion_mask"]  # [B,T]
        return (mask if "tool_mask" not in inputs else mask * inputs["tool_mask"]).float()  # [B,T]

    def rollout_step(self) -> int:
        """Rollout batches completed before the current optimizer step (`BlockObjective.step`, as our trainer counts
        it): `global_step // num_iterations` when each optimizer step takes one generation batch (TRL's default)."""
        args = self.args
        return self.state.global_step * args.gradient_accumulation_steps // (args.steps_per_generation
                                                                            * self.num_iterations)

    def _loss_weights(self, inputs: dict[str, Any], mask: Tensor) -> Tensor:
        """`[B,T]` weights whose sum against the per-token loss is this micro-batch's share of `aggregate` over the
        optimizer step, times the processes (the engine averages over them), times TRL's vLLM correction."""
        processes = self.accelerator.num_processes
        if self.model.training:
            # set by train() (shorter at an epoch's end); the configured count outside it
            accumulation = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
            if "step_tokens" in inputs:
                global_tokens = float(inputs["step_tokens"])
            elif accumulation == self.args.steps_per_generation:  # the step is the whole generation batch
                global_tokens = float(inputs["num_items_in_batch"])
            else:
                raise RuntimeError("a training micro-batch without step_tokens: it did not come from _prepare_inputs")
        else:
            accumulation, global_tokens = 1, float(inputs["num_items_in_batch"])
        weights = token_weights(mask, mode=self.aggregation, global_tokens=global_tokens,
                                global_sequences=mask.shape[0] * processes * accumulation,
                                norm_length=self.max_completion_length) * processes  # [B,T]
        if "importance_sampling_ratio" in inputs:  # TRL's correction for vLLM's sampling mismatch, [B,T] or [B,1]
            weights = weights * inputs["importance_sampling_ratio"]
        return weights  # [B,T]

    def _packed(self, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                completion_mask: Tensor) -> PackedBatch:
        """`prompt ⊕ completion` as `selfdistill.forward` lays it out. Positions count columns, as in TRL's own
        log-prob passes (it passes none), so the ratio to TRL's behaviour log-probs starts at exactly 1."""
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # [B,P+T]
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)  # [B,P+T]
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)  # [B,P+T]
        return PackedBatch(input_ids, attention_mask, positions, prompt_ids.shape[1], completion_mask.float())

    def _response_hidden(self, model, batch: PackedBatch) -> Tensor:
        """Final hidden states `[B,T,d]` at the positions that predict each completion token, through `model`'s
        wrapper (`_ForwardRedirection`), so that DDP, DeepSpeed and FSDP see a forward pass."""
        unwrapped = self.accelerator.unwrap_model(model)
        return self._forward_redirection(model, unwrapped, self._backbone, unwrapped, batch)

    def _backbone(self, unwrapped, batch: PackedBatch) -> Tensor:
        with self.accelerator.autocast():
            return response_hidden_states(base_model(unwrapped), batch)  # [B,T,d]

    def _compute_dtype(self, weight: Tensor) -> torch.dtype:
        """The output layer's dtype: the mixed-precision one (as autocast would run the head), else the weight's."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.accelerator.mixed_precision, weight.dtype)

    @staticmethod
    def _full_weight(weight: Tensor) -> Tensor:
        """The output weight as one tensor: an FSDP2 shard gathered (its gradient goes back to the shards)."""
        return weight.full_tensor() if hasattr(weight, "full_tensor") else weight

    def _fused_objective(self, unwrapped, batch: PackedBatch, teacher_hidden: Tensor | None, teacher,
                         objective: BlockObjective) -> FusedResult:
        """Inside the student's forward: its hidden states, then `hidden_objective` (the loss and its gradient,
        block by block, with the output weights gathered where they are sharded)."""
        hidden = self._backbone(unwrapped, batch)  # [B,T,d]
        weight = self._full_weight(output_weight(base_model(unwrapped)))  # [V,d]
        teacher_weight = None
        if teacher is not None:
            teacher_weight = self._full_weight(output_weight(base_model(self.accelerator.unwrap_model(teacher))))
        dtype = self._compute_dtype(weight)
        with maybe_gather_lm_head_ctx(weight, teacher_weight), torch.autocast(hidden.device.type, enabled=False):
            return hidden_objective(
                hidden.to(dtype), weight.to(dtype), batch.response_ids, objective, temperature=self.temperature,
                teacher_hidden=None if teacher_hidden is None else teacher_hidden.to(dtype),
                teacher_weight=None if teacher_weight is None else teacher_weight.to(dtype),
                divergence=self.divergence, chunk_tokens=self.args.fused_chunk_tokens, buffers=self._fused_buffers)

    def _response_logits(self, model, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                         completion_mask: Tensor) -> Tensor:
        """Logits `[B,T,V]` at the positions that predict each completion token (not yet divided by the
        temperature: `token_stats` does that). The full-logits path only."""
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

    def objective_terms(self, model, inputs: dict[str, Any], *, full_logits: bool | None = None) -> ObjectiveTerms:
        """The objective on one micro-batch. full_logits: take the full-logits path (None: only when the model's
        head needs it, `full_logits_reason`); both give the same numbers."""
        mask = self._loss_mask(inputs)  # [B,T]
        weights = self._loss_weights(inputs, mask)  # [B,T]
        objective = BlockObjective(self.objective, self.objective_knobs, mask=mask,
                                   group_adv=inputs["advantages"].float(), token_weights=weights,
                                   old_logp=inputs.get("old_per_token_logps"), step=self.rollout_step())
        if full_logits is None:
            full_logits = self.full_logits_reason is not None
        loss, stats, diagnostic_sums = (self._logits_terms if full_logits else self._hidden_terms)(
            model, inputs, objective)
        return ObjectiveTerms(loss, stats, mask, diagnostic_sums)

    def _hidden_terms(self, model, inputs: dict[str, Any], objective: BlockObjective) -> FusedResult:
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]  # [B,T] each
        teacher_hidden = separate_teacher = None
        if self.objective.needs_teacher:  # first, so its activations are gone before the student's forward
            teacher_batch = self._packed(inputs["teacher_prompt_ids"], inputs["teacher_prompt_mask"], completion_ids,
                                         completion_mask)
            with torch.no_grad(), self._teacher(model) as teacher:
                teacher_hidden = self._response_hidden(teacher, teacher_batch)  # [B,T,d]
            separate_teacher = self.teacher_model  # None: the student's own output layer (live, LoRA frozen)
        batch = self._packed(inputs["prompt_ids"], inputs["prompt_mask"], completion_ids, completion_mask)
        unwrapped = self.accelerator.unwrap_model(model)
        return FusedResult(*self._forward_redirection(model, unwrapped, self._fused_objective, unwrapped, batch,
                                                      teacher_hidden, separate_teacher, objective))

    def _logits_terms(self, model, inputs: dict[str, Any], objective: BlockObjective) -> FusedResult:
        completion_ids = inputs["completion_ids"]  # [B,T]
        completion_mask = inputs["completion_mask"]  # [B,T]
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
        loss, diagnostic_sums = objective(stats, slice(None))  # the whole micro-batch as one block
        return FusedResult(loss, stats.detach(), diagnostic_sums)

    def _compute_loss(self, model, inputs: dict[str, Any]) -> Tensor:
        mode = "train" if self.model.training else "eval"
        terms = self.objective_terms(model, inputs)
        self._log_statistics(mode, terms)
        return terms.loss

    def _log_statistics(self, mode: str, terms: ObjectiveTerms) -> None:
        """Token-weighted means over every process into TRL's metrics (averaged again at each `log`): the
        statistics' and the diagnostics' sums over the micro-batch's tokens, and the token count, summed over the
        processes in one reduction."""
        sums = {**terms.stats.masked_sums(terms.mask), **dict(sorted(terms.diagnostic_sums.items()))}
        tokens = terms.mask.sum()
        local = torch.stack([torch.stack([total.float(), tokens]) for total in sums.values()])  # [K,2]
        totals = self.accelerator.reduce(local, reduction="sum")  # [K,2]
        for name, (total, count) in zip(sums, totals.tolist(), strict=True):
            self._metrics[mode][name].append(total / max(count, 1.0))
