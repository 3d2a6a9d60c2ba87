"""The two sides of bench/step_vs_trl.py, each run in its own worker process: our trainer, and TRL's (or our TRL
route). Both load the same model folder, train on the same problems and prompts, and record each optimizer step the
same way (StepLog); see bench/step_vs_trl.py for what is compared and how.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from _harness import MemoryTimeline, PhaseTimer, peak_rss_mib, per_step_phases, rss_mib, synchronize


@dataclass(frozen=True)
class Pair:
    """What one pair compares: our `objective` (on our trainer, or with `route` on our TRL route) against TRL's
    `trl` trainer ("sdft" or "grpo") in `mode` (SDFT's distillation_mode; "" for GRPO)."""

    objective: str
    trl: str
    mode: str
    route: bool = False


PAIRS: dict[str, Pair] = {
    "opsd-full": Pair("opsd", "sdft", "full_logits"),
    "opsd-topk": Pair("opsd", "sdft", "topk_logits"),
    "dasd-grpo": Pair("dasd", "grpo", ""),
    "dasd-route": Pair("dasd", "grpo", "", route=True),  # TRL's side runs GRPO with beta=0
    "opsd-route": Pair("opsd", "sdft", "full_logits", route=True),
}
QWEN_VOCAB = 151_936  # the output layer of Qwen2 / Qwen2.5 models (their tokenizers hold 151,665 tokens)
BENCH_TEMPLATE = "bench_trl"
TRL_TEACHER_TEMPLATE = "{prompt}\n\n{privileged_context}"  # TRL's default; ours is built to render the same


@dataclass(frozen=True)
class ModelSize:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int | None  # None: the tokenizer's length
    workload: tuple[tuple[str, int], ...] = ()  # settings this size fixes whatever the command line says
    kv_heads: int | None = None  # None: as many as the heads
    architecture: str = "qwen2"  # "qwen2" or "llama" (SmolLM2's)

    def __str__(self) -> str:
        fixed = "".join(f", {name.replace('_', ' ')} {value}" for name, value in self.workload)
        return (f"{self.architecture}, hidden {self.hidden}, {self.layers} layers, "
                f"vocabulary {self.vocab or 'of the tokenizer'}{fixed}")


SIZES: dict[str, ModelSize] = {
    "tiny": ModelSize(hidden=128, layers=2, heads=4, intermediate=256, vocab=None),
    "qwen-vocab": ModelSize(hidden=64, layers=2, heads=4, intermediate=128, vocab=QWEN_VOCAB),
    # reasoning lengths: 1,024 new tokens per completion, 4 completions per step, one per micro-batch (one
    # completion's float32 logits are 594 MiB here; SDFT's full_logits holds several copies of them)
    "long": ModelSize(hidden=64, layers=2, heads=4, intermediate=128, vocab=QWEN_VOCAB,
                      workload=(("max_new_tokens", 1024), ("prompts", 2), ("group_size", 2), ("micro_batch", 1))),
    # SmolLM2-135M-Instruct's architecture (Llama: 576 wide, 30 layers, 9 heads of which 3 key/value, MLP 1,536,
    # tied 49,152-token output layer) with random weights; the demo's model size. 4 prompts x 4 samples, 64 tokens.
    "smollm2": ModelSize(hidden=576, layers=30, heads=9, intermediate=1536, vocab=49_152, kv_heads=3,
                         architecture="llama",
                         workload=(("max_new_tokens", 64), ("prompts", 4), ("group_size", 4), ("micro_batch", 8))),
}


# ----------------------------------------------------------------------------------------------
# shared set-up: the model folders, the problems, the prompt template


def build_model_dirs(sizes: list[str], root: Path) -> dict[str, str]:
    """Build the tiny tokenizer and one random Qwen2 model per size, saved as Hugging Face folders."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, Qwen2Config
    from transformers.utils import logging as transformers_logging

    from selfdistill.models import build_tiny_model, build_tiny_tokenizer

    transformers_logging.disable_progress_bar()
    tokenizer = build_tiny_tokenizer()
    folders = {}
    for name in sizes:
        size = SIZES[name]
        if size.vocab is None:
            model = build_tiny_model(tokenizer, hidden_size=size.hidden, num_layers=size.layers,
                                     num_heads=size.heads, intermediate_size=size.intermediate)
        else:
            # The output layer is larger than the tokenizer, as in real Qwen models; every id the tokenizer makes
            # is below its length (833), and sampled ids past it decode to the empty string on both sides.
            special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                       "pad_token_id": tokenizer.pad_token_id}
            config_class = {"qwen2": Qwen2Config, "llama": LlamaConfig}[size.architecture]
            config = config_class(vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
                                  num_hidden_layers=size.layers, num_attention_heads=size.heads,
                                  num_key_value_heads=size.kv_heads or size.heads, max_position_embeddings=2048,
                                  tie_word_embeddings=True, **special)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            model.generation_config = GenerationConfig(**special)
        folder = root / f"model-{name}"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[name] = str(folder)
    return folders


def register_bench_template() -> None:
    """Our prompt template whose teacher prompt is TRL's default: `<student message>\\n\\n<solution>`."""
    from selfdistill.prompts import DEFAULT_TEMPLATE, TEMPLATES, PromptTemplate

    student = TEMPLATES[DEFAULT_TEMPLATE].student
    TEMPLATES[BENCH_TEMPLATE] = PromptTemplate(BENCH_TEMPLATE, student, student + "\n\n{solution}", "solution")


def bench_problems(spec: dict):
    from selfdistill.data.synthetic import number_sums

    return number_sums(spec["prompts"] * (spec["warmup"] + spec["steps"]), seed=spec["seed"])


# ----------------------------------------------------------------------------------------------
# what a worker records step by step, the same on both sides


@dataclass
class StepLog:
    """The timed steps' seconds, the completion lengths seen, and the phase timer's snapshots at each timed step's
    start and end; with --profile, resident memory phase by phase during the last timed step."""

    spec: dict
    timer: PhaseTimer
    seconds: list[float] = field(default_factory=list)
    lengths: list[float] = field(default_factory=list)
    snapshots: list[dict[str, float]] = field(default_factory=list)
    start: float = 0.0

    def begin(self, step: int) -> None:
        """Before step `step` (0-based, warm-up steps included)."""
        if step >= self.spec["warmup"]:
            self.snapshots.append(self.timer.snapshot())
        if self.timer.memory is not None and step == self.spec["warmup"] + self.spec["steps"] - 1:
            self.timer.memory.start_recording()
        synchronize()
        self.start = time.perf_counter()

    def end(self, step: int) -> None:
        synchronize()
        if step >= self.spec["warmup"]:
            self.seconds.append(time.perf_counter() - self.start)
            self.snapshots.append(self.timer.snapshot())

    def result(self, rss_loaded: float, **fields) -> dict:
        import torch

        result = {"seconds": self.seconds, "rss_loaded_mib": rss_loaded,
                  "completion_length": statistics.fmean(self.lengths) if self.lengths else None,
                  "threads": torch.get_num_threads(), **fields}
        if self.spec["profile"]:
            memory = self.timer.memory
            result["phases"] = per_step_phases(self.snapshots, self.seconds)
            result["memory_timeline"] = {"step_start": memory.step_start, "events": memory.events}
        return result


def new_step_log(spec: dict) -> StepLog:
    return StepLog(spec, PhaseTimer(MemoryTimeline() if spec["profile"] else None))


# ----------------------------------------------------------------------------------------------
# our side


def ours_config(spec: dict, run_dir: str):
    from selfdistill.config import config_from_dict

    pair = PAIRS[spec["pair"]]
    objective = {"name": pair.objective, "teacher": "frozen"}
    if pair.mode == "topk_logits":
        objective["divergence_top_k"] = spec["top_k"]
    return config_from_dict({
        "model": {"path": spec["model_dir"], "gradient_checkpointing": spec["gradient_checkpointing"]},
        "data": {"template": BENCH_TEMPLATE, "max_prompt_tokens": spec["max_prompt_tokens"], "shuffle": False},
        "rollout": {"prompts_per_step": spec["prompts"], "group_size": spec["group_size"],
                    "max_new_tokens": spec["max_new_tokens"], "temperature": 1.0, "top_p": 1.0},
        "objective": objective,
        "optim": {"steps": spec["warmup"] + spec["steps"], "lr": spec["lr"], "micro_batch_size": spec["micro_batch"],
                  "max_grad_norm": 1.0, "seed": spec["seed"]},
        "logging": {"output_dir": run_dir, "sample_every": 0, "tensorboard": False, "progress": False},
    })


def profile_ours(trainer, timer: PhaseTimer) -> None:
    import selfdistill.scoring as scoring_module
    import selfdistill.trainer as trainer_module

    timer.wrap(trainer.backend, "generate", "generation")
    timer.wrap(trainer.grader, "grade_many", "grading")
    if trainer.teacher is not None:
        timer.wrap(trainer.teacher, "hidden_states", "teacher forward")
    # The trainer picks its packing (`pack` or `pack_shared`) when it is built and calls it through these two
    # attributes: wrap them, not the module's `pack`, which the trainer no longer looks up after set-up.
    timer.wrap(trainer, "pack_student", "packing prompts + responses")
    timer.wrap(trainer, "pack_teacher", "packing prompts + responses")
    timer.wrap(trainer_module, "response_hidden_states", "student forward (decoder only)")
    # the updates' fused pass (trainer) and, with ppo_epochs x mini_batches > 1, the scoring pass's (scoring)
    for module in (trainer_module, scoring_module):
        timer.wrap(module, "hidden_objective", "output layer + token stats + objective (fused fwd/grad)")
    timer.wrap(trainer.optimizer, "step", "optimizer")
    timer.wrap(trainer, "_log", "logging")
    timer.wrap_backward()


def run_ours(spec: dict, run_dir: str) -> dict:
    from selfdistill.trainer import Trainer

    register_bench_template()
    trainer = Trainer(ours_config(spec, run_dir), run_dir=run_dir, problems=bench_problems(spec))
    trainer.backend.min_new_tokens = spec["max_new_tokens"]  # EOS held back: every completion has that length
    rss_loaded = rss_mib()

    log = new_step_log(spec)
    if spec["profile"]:
        profile_ours(trainer, log.timer)
    for step in range(spec["warmup"] + spec["steps"]):
        log.begin(step)
        metrics = trainer.train_step()
        log.end(step)
        log.lengths.append(metrics["response_length"])
    trainer.grader.close()
    return log.result(rss_loaded, prompts_match=True)


# ----------------------------------------------------------------------------------------------
# TRL's side


def trl_rows(spec: dict, tokenizer):
    """(our PromptBuilder, the problems, TRL's dataset rows): the same problems and prompts as ours."""
    from selfdistill.prompts import PromptBuilder

    prompts = PromptBuilder(tokenizer, template=BENCH_TEMPLATE, max_prompt_tokens=spec["max_prompt_tokens"])
    problems = bench_problems(spec)
    rows = [{"prompt": prompts.student_messages(p), "problem": p.problem, "privileged_context": p.solution,
             "answer": p.answer} for p in problems]
    return prompts, problems, rows


def trl_step_callback(log: StepLog):
    """A TrainerCallback timing each optimizer step (and, with --profile, the optimizer) into `log`."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            log.begin(state.global_step)

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if log.spec["profile"]:
                log.timer.enter("optimizer")

        def on_optimizer_step(self, args, state, control, **kwargs):
            if log.spec["profile"]:
                log.timer.exit()

        def on_step_end(self, args, state, control, **kwargs):
            log.end(state.global_step - 1)  # global_step already counts this step

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                log.lengths.append(logs["completions/mean_length"])

    return StepTimer()


def trl_common_args(spec: dict, run_dir: str) -> dict:
    """The training arguments TRL's trainers share, set to match ours (see the module docstring)."""
    import torch

    return {
        "output_dir": run_dir,
        "per_device_train_batch_size": spec["micro_batch"],
        "gradient_accumulation_steps": spec["prompts"] * spec["group_size"] // spec["micro_batch"],
        "num_generations": spec["group_size"],
        "max_completion_length": spec["max_new_tokens"],
        "generation_kwargs": {"min_new_tokens": spec["max_new_tokens"]},
        "temperature": 1.0, "top_p": 1.0, "top_k": 0,
        "learning_rate": spec["lr"], "lr_scheduler_type": "cosine", "weight_decay": 0.0, "max_grad_norm": 1.0,
        "optim": "adamw_torch",
        "max_steps": spec["warmup"] + spec["steps"],
        "num_iterations": 1,
        "shuffle_dataset": False,
        "seed": spec["seed"],
        "use_cpu": not torch.cuda.is_available(), "bf16": False, "fp16": False,
        "gradient_checkpointing": spec["gradient_checkpointing"],
        "report_to": [], "logging_steps": 1, "save_strategy": "no", "disable_tqdm": True,
    }


def build_sdft(spec: dict, common: dict, dataset, tokenizer, callback):
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    args = SDFTConfig(**common, max_prompt_length=spec["max_prompt_tokens"], teacher_model_kind="base",
                      distillation_mode=PAIRS[spec["pair"]].mode, distillation_topk=spec["top_k"],
                      distillation_alpha=0.5, teacher_prompt_template=TRL_TEACHER_TEMPLATE)
    return SDFTTrainer(model=spec["model_dir"], args=args, train_dataset=dataset, processing_class=tokenizer,
                       callbacks=[callback])


def build_grpo(spec: dict, common: dict, dataset, tokenizer, callback, grader, route: bool):
    """TRL's GRPOTrainer, or with `route` our SelfDistillTrainer, rewarded by `grader` as our trainer is."""

    def boxed_answer_reward(prompts, completions, answer, **kwargs) -> list[float]:
        """1 when the last \\boxed{} answer equals the gold answer (selfdistill.grading, as our trainer)."""
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return grader.grade_many(texts, answer)

    from selfdistill.objectives import OBJECTIVES

    kwargs = {"model": spec["model_dir"], "reward_funcs": [boxed_answer_reward], "train_dataset": dataset,
              "processing_class": tokenizer, "callbacks": [callback]}
    if route:
        from selfdistill.integrations.trl import SelfDistillConfig, SelfDistillTrainer

        objective = PAIRS[spec["pair"]].objective
        extra = {} if OBJECTIVES[objective].std_normalize else {"scale_rewards": "none"}
        args = SelfDistillConfig(**common, **extra, objective=objective, objective_args={"teacher": "frozen"},
                                 teacher_template=BENCH_TEMPLATE)
        return SelfDistillTrainer(args=args, **kwargs)
    from trl import GRPOConfig, GRPOTrainer

    beta = 0.0 if PAIRS[spec["pair"]].route else spec["grpo_beta"]
    return GRPOTrainer(args=GRPOConfig(**common, beta=beta), **kwargs)


def trl_prompts_match(trainer, kind: str, route: bool, rows: list[dict], problems, prompts) -> bool:
    """Whether the prompts TRL tokenizes are ours, token for token (student, and teacher where TRL builds one)."""
    pairs = list(zip(rows, problems, strict=True))
    if kind == "sdft":
        builder = trainer.teacher_context_builder
        return all(trainer._tokenize_prompts([row["prompt"]])[0] == prompts.student_ids(p)
                   and trainer._tokenize_prompts([builder._compose_teacher_prompt(row["prompt"], p.solution)])[0]
                   == prompts.teacher_ids(p) for row, p in pairs)
    match = all(trainer._tokenize_prompts([row["prompt"]])[0][0] == prompts.student_ids(p) for row, p in pairs)
    if route:
        match = match and all(trainer.teacher_prompt_ids([row])[0] == prompts.teacher_ids(p) for row, p in pairs)
    return match


def count_generated_rows(trainer) -> list[int]:
    """The rows of each of TRL's generation calls, filled in as it trains (to check: once per step, P x G rows)."""
    generated_rows: list[int] = []
    generate = trainer._generate

    def counted_generate(prompts, *args, **kwargs):
        generated_rows.append(len(prompts))
        return generate(prompts, *args, **kwargs)

    trainer._generate = counted_generate
    return generated_rows


def profile_trl(trainer, timer: PhaseTimer, kind: str, route: bool) -> None:
    import torch

    def forward(other: str):
        return lambda: "student forward (with logits)" if torch.is_grad_enabled() else other

    timer.wrap(trainer, "_generate", "generation")
    if kind == "sdft":
        timer.wrap(trainer, "_forward_logits", forward("teacher forward"))
        timer.wrap(trainer, "_compute_self_distillation_loss", "divergence loss")
    elif route:
        import selfdistill.integrations.trl as route_module

        timer.wrap(trainer, "_calculate_rewards", "grading")
        timer.wrap(trainer, "teacher_prompt_ids", "teacher prompts")
        timer.wrap(trainer, "_backbone", lambda: "student forward (decoder only)" if torch.is_grad_enabled()
                   else "teacher forward (decoder only)")
        timer.wrap(route_module, "hidden_objective", "output layer + token stats + objective (fused fwd/grad)")
        timer.wrap(trainer, "_compute_loss", "loss bookkeeping")
    else:
        timer.wrap(trainer, "_calculate_rewards", "grading")
        timer.wrap(trainer, "_get_per_token_logps_and_entropies", forward("reference forward"))
        timer.wrap(trainer, "_compute_loss", "policy loss")
    timer.wrap_backward()


def run_trl(spec: dict, run_dir: str, route: bool = False) -> dict:
    """TRL's trainer; with `route`, our TRL route (SelfDistillTrainer) on the same settings instead."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    from selfdistill.grading import Grader

    register_bench_template()
    kind = "grpo" if route else PAIRS[spec["pair"]].trl  # the route is a GRPOTrainer, whatever TRL's side is
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"], local_files_only=True)
    prompts, problems, rows = trl_rows(spec, tokenizer)
    log = new_step_log(spec)
    common, dataset, callback = trl_common_args(spec, run_dir), Dataset.from_list(rows), trl_step_callback(log)
    grader = None
    if kind == "sdft":
        trainer = build_sdft(spec, common, dataset, tokenizer, callback)
    else:
        grader = Grader(workers=2)
        trainer = build_grpo(spec, common, dataset, tokenizer, callback, grader, route)
    prompts_match = trl_prompts_match(trainer, kind, route, rows, problems, prompts)
    rss_loaded = rss_mib()

    generated_rows = count_generated_rows(trainer)
    if spec["profile"]:
        profile_trl(trainer, log.timer, kind, route)
    trainer.train()
    if grader is not None:
        grader.close()
    return log.result(rss_loaded, prompts_match=prompts_match, generated_rows=generated_rows)


def measure_case(spec: dict) -> dict:
    """The worker: one (side, pair, size) in this process; its times, lengths and peak memory."""
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    with tempfile.TemporaryDirectory(prefix=f"step-vs-trl-{spec['side']}-") as run_dir:
        if spec["side"] == "trl":
            result = run_trl(spec, run_dir)
        elif PAIRS[spec["pair"]].route:
            result = run_trl(spec, run_dir, route=True)
        else:
            result = run_ours(spec, run_dir)
    if len(result["seconds"]) != spec["steps"]:
        raise RuntimeError(f"timed {len(result['seconds'])} steps, expected {spec['steps']}")
    result["peak_rss_mib"] = peak_rss_mib()
    if torch.cuda.is_available():
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result
