"""Our training step against TRL's, side by side: seconds per optimizer step and peak memory.

    python bench/step_vs_trl.py                        # both sizes, all three pairs
    python bench/step_vs_trl.py --quick                # a smoke check in about a minute
    python bench/step_vs_trl.py --pairs opsd-full --sizes qwen-vocab --steps 8 --profile
    python bench/step_vs_trl.py --sizes tiny --rounds 3 --steps 10   # steadier figures on a noisy machine

Pairs (ours vs TRL), each with the frozen initial model as teacher (TRL: teacher_model_kind="base"):
  opsd-full   objective.method=opsd (full-vocabulary JSD, beta 0.5)  vs  SDFTTrainer distillation_mode=full_logits
  opsd-topk   opsd with objective.divergence_top_k=k                  vs  SDFTTrainer distillation_mode=topk_logits
  dasd-grpo   objective.method=dasd                                   vs  GRPOTrainer (the nearest TRL has), with
              beta=--grpo-beta so that, like our frozen teacher, a frozen reference model scores every rollout
  dasd-route  the TRL route (selfdistill.integrations.trl.SelfDistillTrainer, objective dasd, frozen teacher)
              vs  TRL's own GRPOTrainer at the same settings with beta=0: both are TRL's loop (generation,
              rewards, accumulation, optimizer), so the difference is the route's loss path and its one teacher
              forward pass (the issue's bound: at most 1.15x)
Sizes (Qwen2 architecture, random weights, built from a config and saved once so both sides load the same weights):
  tiny        hidden 128, 2 layers, vocabulary 833 (the package's tiny tokenizer)
  qwen-vocab  hidden 64, 2 layers, vocabulary 151,936 (Qwen2/Qwen2.5's output layer), same tiny tokenizer: like a
              real Qwen model the output layer is larger than the tokenizer, ids past the tokenizer decode to nothing

What is the same on both sides: the problems (`number_sums`, the reference solution as TRL's `privileged_context`
and as our problem's solution), the student and teacher prompts token for token (a prompt template registered here,
"<student prompt>\\n\\n<solution>", which is TRL's default `teacher_prompt_template`; checked in every run),
P prompts x G samples generated per optimizer step (TRL: generation_batch_size = per_device_train_batch_size x
gradient_accumulation_steps = P x G, steps_per_generation = gradient_accumulation_steps, num_iterations = 1, so
TRL generates once per optimizer step and computes no old log-probs), micro-batches of --micro-batch rollouts,
AdamW (TRL: optim="adamw_torch") with the same learning rate, no weight decay, gradient clipping at 1.0, float32,
no gradient checkpointing (TRL's default is on; switched off on both sides unless --gradient-checkpointing),
sampling at temperature 1 with no top-k / top-p, and a fixed completion length: min_new_tokens = max_new_tokens on
both sides (TRL through generation_kwargs, ours through the rollout backend's min_new_tokens), so every
completion has exactly --max-new-tokens tokens; the table shows the mean lengths seen, to confirm it.

Each (side, pair, size) runs in its own process, so its peak resident memory (ru_maxrss) is its own; "extra" is the
peak minus the resident memory once the trainer is built (model, teacher or reference copy, before the first step).
Seconds per step: the median over --steps optimizer steps after --warmup warm-up steps (TRL: timed from a
TrainerCallback's on_step_begin to on_step_end, which spans generation, all micro-batches and the optimizer step).
With --rounds R each side runs in R processes, ours and TRL's alternating, and the table shows the median of the
R medians (memory: the median of the R peaks) with each round's time ratio in the note column: on a shared machine
a slow spell then hits both sides instead of one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

# (our objective, TRL trainer, TRL mode); the TRL mode is SDFT's distillation_mode, or "" for GRPO
PAIRS: dict[str, tuple[str, str, str]] = {
    "opsd-full": ("opsd", "sdft", "full_logits"),
    "opsd-topk": ("opsd", "sdft", "topk_logits"),
    "dasd-grpo": ("dasd", "grpo", ""),
    "dasd-route": ("dasd", "grpo", "route"),  # "ours" is the TRL route; TRL's side runs GRPO with beta=0
}
SIDES = ("ours", "trl")
QWEN_VOCAB = 151_936  # the output layer of Qwen2 / Qwen2.5 models (their tokenizers hold 151,665 tokens)
BENCH_TEMPLATE = "bench_trl"
TRL_TEACHER_TEMPLATE = "{prompt}\n\n{privileged_context}"  # TRL's default; ours is built to render the same
RESULT_PREFIX = "RESULT "


@dataclass(frozen=True)
class ModelSize:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int | None  # None: the tokenizer's length


SIZES: dict[str, ModelSize] = {
    "tiny": ModelSize(hidden=128, layers=2, heads=4, intermediate=256, vocab=None),
    "qwen-vocab": ModelSize(hidden=64, layers=2, heads=4, intermediate=128, vocab=QWEN_VOCAB),
}


# ----------------------------------------------------------------------------------------------
# memory and timing helpers (used inside the worker processes)


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class MemoryTimeline:
    """Resident memory at each phase's entry and exit and the highest value in between, for the phases entered
    while `recording` is on (the last timed step); a background thread samples it every 2 ms."""

    def __init__(self) -> None:
        self.recording = False
        self.events: list[list] = []  # [name, MiB at entry, highest MiB, MiB at exit], in the order entered
        self._open: list[list] = []  # the events of the phases entered and not yet left
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            now = rss_mib()
            for event in list(self._open):
                event[2] = max(event[2], now)
            time.sleep(0.002)

    def enter(self, name: str) -> None:
        if self.recording:
            now = rss_mib()
            self._open.append([name, now, now, None])
            self.events.append(self._open[-1])

    def exit(self) -> None:
        if self._open:
            event = self._open.pop()
            event[3] = rss_mib()
            event[2] = max(event[2], event[3])


class PhaseTimer:
    """Exclusive wall time per named phase: time spent in a nested phase counts only for the inner one; with a
    MemoryTimeline, the memory of each phase too."""

    def __init__(self, memory: MemoryTimeline | None = None) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self._stack: list[list] = []  # [name, start, seconds spent in nested phases]
        self.memory = memory

    def enter(self, name: str) -> None:
        synchronize()
        self._stack.append([name, time.perf_counter(), 0.0])
        if self.memory is not None:
            self.memory.enter(name)

    def exit(self) -> None:
        synchronize()
        name, start, nested = self._stack.pop()
        elapsed = time.perf_counter() - start
        self.totals[name] += elapsed - nested
        if self._stack:
            self._stack[-1][2] += elapsed
        if self.memory is not None:
            self.memory.exit()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.enter(name)
        try:
            yield
        finally:
            self.exit()

    def wrap(self, owner: object, attribute: str, phase: str | Callable[[], str]) -> None:
        """Replace `owner.attribute` (a function or method) by one timed as `phase` (a name, or a function
        returning the name at call time)."""
        original = getattr(owner, attribute)

        def timed(*args, **kwargs):
            with self.phase(phase() if callable(phase) else phase):
                return original(*args, **kwargs)

        setattr(owner, attribute, timed)

    def snapshot(self) -> dict[str, float]:
        return dict(self.totals)


def per_step_phases(snapshots: list[dict[str, float]], step_seconds: list[float]) -> dict[str, float]:
    """Mean seconds per step of each phase over the timed steps, from cumulative snapshots taken at each
    timed step's start and end (pairs), plus "other" = step time - the phases."""
    sums: dict[str, float] = defaultdict(float)
    for begin, end in zip(snapshots[0::2], snapshots[1::2], strict=True):
        for name, total in end.items():
            sums[name] += total - begin.get(name, 0.0)
    n = len(step_seconds)
    phases = {name: value / n for name, value in sums.items() if value > 0}
    phases["other"] = max(0.0, statistics.fmean(step_seconds) - sum(phases.values()))
    return phases


def timed_backward(timer: PhaseTimer) -> None:
    """Time every `Tensor.backward` call as the "backward" phase (inside this worker process only)."""
    import torch

    original = torch.Tensor.backward

    def backward(self, *args, **kwargs):
        with timer.phase("backward"):
            return original(self, *args, **kwargs)

    torch.Tensor.backward = backward
    timer.wrap(torch.nn.utils, "clip_grad_norm_", "grad clip")


# ----------------------------------------------------------------------------------------------
# shared set-up: the model folders, the problems, the prompt template


def build_model_dirs(sizes: list[str], root: Path) -> dict[str, str]:
    """Build the tiny tokenizer and one random Qwen2 model per size, saved as Hugging Face folders."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config
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
            config = Qwen2Config(vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
                                 num_hidden_layers=size.layers, num_attention_heads=size.heads,
                                 num_key_value_heads=size.heads, max_position_embeddings=2048,
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
# our side


def run_ours(spec: dict, run_dir: str) -> dict:
    import torch

    import selfdistill.trainer as trainer_module
    from selfdistill.config import config_from_dict
    from selfdistill.trainer import Trainer

    register_bench_template()
    method, _, trl_mode = PAIRS[spec["pair"]]
    objective = {"method": method, "teacher": "frozen"}
    if trl_mode == "topk_logits":
        objective["divergence_top_k"] = spec["top_k"]
    config = config_from_dict({
        "model": {"path": spec["model_dir"], "gradient_checkpointing": spec["gradient_checkpointing"]},
        "data": {"template": BENCH_TEMPLATE, "max_prompt_tokens": spec["max_prompt_tokens"], "shuffle": False},
        "rollout": {"prompts_per_step": spec["prompts"], "group_size": spec["group_size"],
                    "max_new_tokens": spec["max_new_tokens"], "temperature": 1.0, "top_p": 1.0},
        "objective": objective,
        "optim": {"steps": spec["warmup"] + spec["steps"], "lr": spec["lr"], "micro_batch_size": spec["micro_batch"],
                  "max_grad_norm": 1.0, "seed": spec["seed"]},
        "logging": {"output_dir": run_dir, "sample_every": 0, "tensorboard": False, "progress": False},
    })
    trainer = Trainer(config, run_dir=run_dir, problems=bench_problems(spec))
    trainer.backend.min_new_tokens = spec["max_new_tokens"]  # EOS held back: every completion has that length
    rss_loaded = rss_mib()

    timer = PhaseTimer(MemoryTimeline() if spec["profile"] else None)
    if spec["profile"]:
        timer.wrap(trainer.backend, "generate", "generation")
        timer.wrap(trainer.grader, "grade_many", "grading")
        if trainer.teacher is not None:
            timer.wrap(trainer.teacher, "hidden_states", "teacher forward")
        timer.wrap(trainer_module, "pack", "packing prompts + responses")
        timer.wrap(trainer_module, "response_hidden_states", "student forward (decoder only)")
        timer.wrap(trainer_module, "hidden_objective", "output layer + token stats + objective (fused fwd/grad)")
        timer.wrap(trainer.optimizer, "step", "optimizer")
        timer.wrap(trainer, "_log", "logging")
        timed_backward(timer)

    seconds, lengths, snapshots = [], [], []
    for step in range(spec["warmup"] + spec["steps"]):
        timed = step >= spec["warmup"]
        if timed:
            snapshots.append(timer.snapshot())
        if timer.memory is not None and step == spec["warmup"] + spec["steps"] - 1:
            timer.memory.recording = True
            timer.memory.step_start = rss_mib()
        synchronize()
        start = time.perf_counter()
        metrics = trainer.train_step()
        synchronize()
        if timed:
            seconds.append(time.perf_counter() - start)
            snapshots.append(timer.snapshot())
        lengths.append(metrics["response_length"])
    trainer.grader.close()
    result = {"seconds": seconds, "rss_loaded_mib": rss_loaded, "completion_length": statistics.fmean(lengths),
              "threads": torch.get_num_threads(), "prompts_match": True}
    if spec["profile"]:
        result["phases"] = per_step_phases(snapshots, seconds)
        result["memory_timeline"] = {"step_start": timer.memory.step_start, "events": timer.memory.events}
    return result


# ----------------------------------------------------------------------------------------------
# TRL's side


def run_trl(spec: dict, run_dir: str, route: bool = False) -> dict:
    """TRL's trainer; with `route`, our TRL route (SelfDistillTrainer) on the same settings instead."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    from selfdistill.grading import Grader
    from selfdistill.prompts import PromptBuilder

    register_bench_template()
    _, trainer_kind, mode = PAIRS[spec["pair"]]
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"], local_files_only=True)
    prompts = PromptBuilder(tokenizer, template=BENCH_TEMPLATE, max_prompt_tokens=spec["max_prompt_tokens"])
    problems = bench_problems(spec)
    rows = [{"prompt": prompts.student_messages(p), "problem": p.problem, "privileged_context": p.solution,
             "answer": p.answer} for p in problems]
    dataset = Dataset.from_list(rows)

    timer = PhaseTimer(MemoryTimeline() if spec["profile"] else None)
    seconds, lengths, snapshots = [], [], []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step >= spec["warmup"]:
                snapshots.append(timer.snapshot())
            if timer.memory is not None and state.global_step == spec["warmup"] + spec["steps"] - 1:
                timer.memory.recording = True
                timer.memory.step_start = rss_mib()
            synchronize()
            self.start = time.perf_counter()

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if spec["profile"]:
                timer.enter("optimizer")

        def on_optimizer_step(self, args, state, control, **kwargs):
            if spec["profile"]:
                timer.exit()

        def on_step_end(self, args, state, control, **kwargs):
            synchronize()
            if state.global_step > spec["warmup"]:  # global_step already counts this step
                seconds.append(time.perf_counter() - self.start)
                snapshots.append(timer.snapshot())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    use_cpu = not torch.cuda.is_available()
    common = {
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
        "use_cpu": use_cpu, "bf16": False, "fp16": False,
        "gradient_checkpointing": spec["gradient_checkpointing"],
        "report_to": [], "logging_steps": 1, "save_strategy": "no", "disable_tqdm": True,
    }
    grader = None
    if trainer_kind == "sdft":
        from trl.experimental.sdft import SDFTConfig, SDFTTrainer

        args = SDFTConfig(**common, max_prompt_length=spec["max_prompt_tokens"], teacher_model_kind="base",
                          distillation_mode=mode, distillation_topk=spec["top_k"], distillation_alpha=0.5,
                          teacher_prompt_template=TRL_TEACHER_TEMPLATE)
        trainer = SDFTTrainer(model=spec["model_dir"], args=args, train_dataset=dataset, processing_class=tokenizer,
                              callbacks=[StepTimer()])
        # The prompts TRL will tokenize must be ours, token for token (student and teacher).
        builder = trainer.teacher_context_builder
        prompts_match = all(
            trainer._tokenize_prompts([row["prompt"]])[0] == prompts.student_ids(p)
            and trainer._tokenize_prompts([builder._compose_teacher_prompt(row["prompt"], p.solution)])[0]
            == prompts.teacher_ids(p)
            for row, p in zip(rows, problems, strict=True)
        )
    else:
        from trl import GRPOConfig, GRPOTrainer

        grader = Grader(workers=2)

        def boxed_answer_reward(prompts, completions, answer, **kwargs) -> list[float]:
            """1 when the last \\boxed{} answer equals the gold answer (selfdistill.grading, as our trainer)."""
            texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
            return grader.grade_many(texts, answer)

        if route:
            from selfdistill.integrations.trl import SelfDistillConfig, SelfDistillTrainer

            args = SelfDistillConfig(**common, objective=PAIRS[spec["pair"]][0], objective_args={"teacher": "frozen"},
                                     teacher_template=BENCH_TEMPLATE)
            trainer = SelfDistillTrainer(model=spec["model_dir"], reward_funcs=[boxed_answer_reward], args=args,
                                         train_dataset=dataset, processing_class=tokenizer, callbacks=[StepTimer()])
        else:
            args = GRPOConfig(**common, beta=0.0 if mode == "route" else spec["grpo_beta"])
            trainer = GRPOTrainer(model=spec["model_dir"], reward_funcs=[boxed_answer_reward], args=args,
                                  train_dataset=dataset, processing_class=tokenizer, callbacks=[StepTimer()])
        prompts_match = all(trainer._tokenize_prompts([row["prompt"]])[0][0] == prompts.student_ids(p)
                            for row, p in zip(rows, problems, strict=True))
        if route:
            prompts_match = prompts_match and all(trainer.teacher_prompt_ids([row])[0] == prompts.teacher_ids(p)
                                                  for row, p in zip(rows, problems, strict=True))
    rss_loaded = rss_mib()

    # Check that TRL generates once per optimizer step, P x G rows each time, as we do.
    generated_rows: list[int] = []
    generate = trainer._generate

    def counted_generate(prompts, *args, **kwargs):
        generated_rows.append(len(prompts))
        return generate(prompts, *args, **kwargs)

    trainer._generate = counted_generate
    if spec["profile"]:
        timer.wrap(trainer, "_generate", "generation")
        if trainer_kind == "sdft":
            timer.wrap(trainer, "_forward_logits",
                       lambda: "student forward (with logits)" if torch.is_grad_enabled() else "teacher forward")
            timer.wrap(trainer, "_compute_self_distillation_loss", "divergence loss")
        elif route:
            timer.wrap(trainer, "_calculate_rewards", "grading")
            timer.wrap(trainer, "teacher_prompt_ids", "teacher prompts")
            timer.wrap(trainer, "_response_logits",
                       lambda: "student forward (with logits)" if torch.is_grad_enabled() else "teacher forward")
            timer.wrap(trainer, "_compute_loss", "token stats + objective")
        else:
            timer.wrap(trainer, "_calculate_rewards", "grading")
            timer.wrap(trainer, "_get_per_token_logps_and_entropies",
                       lambda: "student forward (with logits)" if torch.is_grad_enabled() else "reference forward")
            timer.wrap(trainer, "_compute_loss", "policy loss")
        timed_backward(timer)

    trainer.train()
    if grader is not None:
        grader.close()
    result = {"seconds": seconds, "rss_loaded_mib": rss_loaded,
              "completion_length": statistics.fmean(lengths) if lengths else None,
              "threads": torch.get_num_threads(), "prompts_match": prompts_match,
              "generated_rows": generated_rows}
    if spec["profile"]:
        result["phases"] = per_step_phases(snapshots, seconds)
        result["memory_timeline"] = {"step_start": timer.memory.step_start, "events": timer.memory.events}
    return result


def run_worker(spec: dict) -> dict:
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    with tempfile.TemporaryDirectory(prefix=f"step-vs-trl-{spec['side']}-") as run_dir:
        if spec["side"] == "trl":
            result = run_trl(spec, run_dir)
        elif PAIRS[spec["pair"]][2] == "route":
            result = run_trl(spec, run_dir, route=True)
        else:
            result = run_ours(spec, run_dir)
    if len(result["seconds"]) != spec["steps"]:
        raise RuntimeError(f"timed {len(result['seconds'])} steps, expected {spec['steps']}")
    result["peak_rss_mib"] = peak_rss_mib()
    if torch.cuda.is_available():
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


# ----------------------------------------------------------------------------------------------
# the parent: one subprocess per (side, pair, size), then the tables


def run_case(spec: dict, timeout: float) -> dict:
    """Run one worker process; returns its result, or {"error": why it produced none}."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false", WANDB_DISABLED="true")
    if spec["threads"]:
        env.update(OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    command = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within --timeout {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    stderr = proc.stderr.strip().splitlines()
    if proc.returncode < 0:
        return {"error": f"killed by signal {-proc.returncode} (out of memory?)"}
    return {"error": stderr[-1] if stderr else f"exit status {proc.returncode} and no result"}


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def summarize(result: dict) -> dict:
    if "error" in result:
        return {"s": None, "peak": None, "extra": None, "len": None}
    return {"s": statistics.median(result["seconds"]), "peak": result["peak_rss_mib"],
            "extra": result["peak_rss_mib"] - result["rss_loaded_mib"], "len": result["completion_length"]}


def merge_rounds(rounds: list[dict]) -> dict:
    """One result from the worker results of several rounds: seconds per step is the median of the rounds'
    medians, memory the median of their peaks; the first round's other fields (profile included)."""
    failed = [r for r in rounds if "error" in r]
    if failed:
        return failed[0]
    merged = dict(rounds[0])
    merged["round_seconds"] = [statistics.median(r["seconds"]) for r in rounds]
    merged["seconds"] = [statistics.median(merged["round_seconds"])]
    for key in ("peak_rss_mib", "rss_loaded_mib"):
        merged[key] = statistics.median(r[key] for r in rounds)
    return merged


def trl_name(pair: str, grpo_beta: float) -> str:
    _, kind, mode = PAIRS[pair]
    if mode == "route":
        return "GRPO beta=0"
    return f"SDFT {mode}" if kind == "sdft" else f"GRPO beta={grpo_beta:g}"


def profiled_sides(results: dict, args: argparse.Namespace, key: str) -> Iterator[tuple[str, str, str, dict]]:
    """(pair, size, the side's name, its result) for every side whose result holds `key`."""
    for (pair, size), sides in results.items():
        for side in SIDES:
            if sides[side].get(key):
                yield pair, size, side if side == "ours" else trl_name(pair, args.grpo_beta), sides[side]


def print_tables(results: dict, args: argparse.Namespace) -> None:
    print("| pair | size | ours s/step | TRL s/step | ours/TRL | ours peak MiB | TRL peak MiB | ours/TRL "
          "| ours extra MiB | TRL extra MiB | completion len ours / TRL | note |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    notes = []
    for (pair, size), sides in results.items():
        ours, trl = summarize(sides["ours"]), summarize(sides["trl"])
        note = []
        for side in SIDES:
            if "error" in sides[side]:
                note.append(f"{side} failed: {sides[side]['error']}")
            elif not sides[side]["prompts_match"]:
                note.append("TRL's prompt tokens differ from ours")
        expected_rows = [args.prompts * args.group_size] * (args.warmup + args.steps)
        if sides["trl"].get("generated_rows", expected_rows) != expected_rows:
            note.append(f"TRL generated {sides['trl']['generated_rows']} rows, expected one generation of "
                        f"{expected_rows[0]} rows per step")
        if any(s["len"] is not None and abs(s["len"] - args.max_new_tokens) > 1e-6 for s in (ours, trl)):
            note.append("completion lengths are not fixed")
        if args.rounds > 1 and all("round_seconds" in sides[side] for side in SIDES):
            per_round = [a / b for a, b in zip(sides["ours"]["round_seconds"], sides["trl"]["round_seconds"],
                                               strict=True)]
            note.append("time ratio per round " + " / ".join(f"{r:.2f}" for r in per_round))
        short = "; ".join(n if len(n) <= 160 else n[:157] + "..." for n in note)
        notes.extend(f"{pair} / {size}: {n}" for n in note if len(n) > 160)
        print(f"| {pair} (vs {trl_name(pair, args.grpo_beta)}) | {size} | {fmt(ours['s'], 3)} | {fmt(trl['s'], 3)} "
              f"| {ratio(ours['s'], trl['s'])} | {fmt(ours['peak'], 0)} | {fmt(trl['peak'], 0)} "
              f"| {ratio(ours['peak'], trl['peak'])} | {fmt(ours['extra'], 0)} | {fmt(trl['extra'], 0)} "
              f"| {fmt(ours['len'], 1)} / {fmt(trl['len'], 1)} | {short} |")
    for note in notes:
        print(f"\n{note}")
    gpu = [(key, side, r["peak_gpu_mib"]) for key, sides in results.items() for side, r in sides.items()
           if "peak_gpu_mib" in r]
    if gpu:
        print("\nPeak GPU memory allocated (MiB): " + ", ".join(f"{p}/{s} {side} {v:.0f}" for (p, s), side, v in gpu))

    if args.profile:
        print("\nWhere a step's time goes (mean seconds per timed step; nested calls counted in the innermost phase; "
              "TRL's 'student forward' includes its output layer, ours is the decoder only):")
        for pair, size, name, result in profiled_sides(results, args, "phases"):
            phases = result["phases"]
            total = sum(phases.values())
            print(f"\n{pair} / {size} / {name}: {total:.3f} s/step")
            print("| phase | s/step | share |\n|---|---:|---:|")
            for phase, value in sorted(phases.items(), key=lambda item: -item[1]):
                print(f"| {phase} | {value:.3f} | {100 * value / total:.0f}% |")
        print("\nResident memory during the last timed step, phase by phase in the order entered (MiB; sampled "
              "every 2 ms; 'loaded' is the trainer built, before the first step):")
        for pair, size, name, result in profiled_sides(results, args, "memory_timeline"):
            timeline = result["memory_timeline"]
            print(f"\n{pair} / {size} / {name}: loaded {result['rss_loaded_mib']:.0f}, step start "
                  f"{timeline['step_start']:.0f}, process peak {result['peak_rss_mib']:.0f}")
            print("| phase | at entry | highest | at exit |\n|---|---:|---:|---:|")
            for phase, entry, highest, leaving in timeline["events"]:
                print(f"| {phase} | {entry:.0f} | {highest:.0f} | {fmt(leaving, 0)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    parser.add_argument("--sizes", default=None, help=f"comma-separated, from {','.join(SIZES)} (default: all)")
    parser.add_argument("--pairs", default=",".join(PAIRS), help=f"comma-separated, from {','.join(PAIRS)}")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per worker (default: inherited; --quick: 1)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per optimizer step (P)")
    parser.add_argument("--group-size", type=int, default=4, help="samples per prompt (G)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="completion length (fixed on both sides)")
    parser.add_argument("--micro-batch", type=int, default=8,
                        help="rollouts per forward/backward (TRL: per_device_train_batch_size); P*G must divide by it")
    parser.add_argument("--max-prompt-tokens", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--top-k", type=int, default=100, help="top-k of the opsd-topk pair (TRL: distillation_topk)")
    parser.add_argument("--grpo-beta", type=float, default=0.04,
                        help="GRPO KL coefficient; > 0 loads TRL's frozen reference model (our dasd has a frozen "
                             "teacher); 0 is TRL's default and skips that forward pass")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="on both sides")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per worker process")
    parser.add_argument("--rounds", type=int, default=1,
                        help="worker processes per (side, pair, size), the sides alternating; the table shows the "
                             "median of the rounds' medians (and the time ratio of each round)")
    parser.add_argument("--profile", action="store_true", help="also print where each step's time goes")
    parser.add_argument("--quick", action="store_true",
                        help="smoke check: tiny size, P=2, G=2, 8 tokens, micro-batch 2, 2 timed steps, 1 thread")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        spec = json.loads(args.worker)
        try:
            result = run_worker(spec)
        except Exception as error:  # report why, in one line, to the parent
            traceback.print_exc()
            result = {"error": f"{type(error).__name__}: {' '.join(str(error).split())}"}
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return

    if args.quick:
        args.sizes = args.sizes or "tiny"
        args.prompts, args.group_size, args.max_new_tokens, args.micro_batch = 2, 2, 8, 2
        args.steps, args.warmup = 2, 1
        args.threads = 1 if args.threads is None else args.threads
    sizes = (args.sizes or ",".join(SIZES)).split(",")
    pairs = args.pairs.split(",")
    for name, known, chosen in (("size", SIZES, sizes), ("pair", PAIRS, pairs)):
        unknown = [c for c in chosen if c not in known]
        if unknown:
            parser.error(f"unknown {name} {unknown}; choose from {list(known)}")
    rows = args.prompts * args.group_size
    if rows % args.micro_batch:
        parser.error(f"--prompts x --group-size = {rows} must be divisible by --micro-batch {args.micro_batch}")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.steps < 1 or args.warmup < 0 or args.group_size < 2:
        parser.error("need --steps >= 1, --warmup >= 0 and --group-size >= 2 (GRPO needs two samples per prompt)")

    import torch
    import transformers
    import trl

    started = time.perf_counter()
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="step-vs-trl-models-") as root:
        model_dirs = build_model_dirs(sizes, Path(root))
        for pair in pairs:
            for size in sizes:
                results[pair, size] = {}
                rounds: dict[str, list[dict]] = {side: [] for side in SIDES}
                for round_index in range(args.rounds):  # the sides alternate, so slow spells hit both
                    for side in SIDES:
                        spec = {"side": side, "pair": pair, "size": size, "model_dir": model_dirs[size],
                                **{k: v for k, v in vars(args).items()
                                   if k not in ("worker", "quick", "timeout", "rounds")}}
                        spec["profile"] = args.profile and round_index == 0
                        rounds[side].append(run_case(spec, args.timeout))
                        summary = summarize(rounds[side][-1])
                        status = rounds[side][-1].get("error") or f"{fmt(summary['s'], 3)} s/step"
                        print(f"  {pair} / {size} / {side} (round {round_index + 1}): {status}", file=sys.stderr,
                              flush=True)
                for side in SIDES:
                    results[pair, size][side] = merge_rounds(rounds[side])

    threads = {r["threads"] for sides in results.values() for r in sides.values() if "threads" in r}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    thread_counts = ",".join(map(str, sorted(threads))) or "?"
    print(f"\nSettings: {device}, torch threads {thread_counts}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, trl {trl.__version__}; P={args.prompts} prompts x "
          f"G={args.group_size} samples per step, {args.max_new_tokens} new tokens (fixed), micro-batch "
          f"{args.micro_batch} (gradient accumulation {rows // args.micro_batch}), lr {args.lr:g}, top-k {args.top_k}, "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, float32; median of "
          f"{args.steps} steps after {args.warmup} warm-up, {args.rounds} round(s); sizes: "
          + ", ".join(f"{s} = {SIZES[s]}" for s in sizes))
    print()
    print_tables(results, args)
    print(f"\n({time.perf_counter() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
