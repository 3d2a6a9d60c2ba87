"""The study's settings: which methods, the shared budget, the task and the warm start.

Plain dataclasses with no heavy imports, so the command line can be built without torch.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from selfdistill.study.benchmark_task import (
    BENCHMARK_METHODS,
    BENCHMARK_TASKS,
    BenchmarkStudyTask,
    benchmark_settings,
)
from selfdistill.study.search_task import SearchStudyTask
from selfdistill.study.task import StudyTask

TASKS: dict[str, type] = {"search": SearchStudyTask, "chains": StudyTask}
"""Study task name -> task class: "search" (search with verified checks, the default since issue #15)
and "chains" (operation chains, the first task)."""
STUDY_TASKS: dict[str, Any] = {**TASKS, **BENCHMARK_TASKS}
"""Every task `for_task` and the command line take: the warm-start tasks (`TASKS`) and the benchmarks with a train
split (gsm8k), run on a given model (`StudySettings.model`)."""

TUNING_GRID: dict[str, dict[str, Any]] = {
    f"dasd_beta{beta:g}_floor{floor:g}": {"name": "dasd", "beta": beta, "scale_floor": floor}
    for beta, floor in itertools.product((0.01, 0.03, 0.1), (0.0, 0.1))
}
"""The search task's tuning methods (the second registration, issue #23): DASD's beta x its floor on the delta
scale, every pair one method. Each sets both knobs, so no tuning run depends on the library's defaults."""

# Name in the study -> objective config (objective.name and its knobs), plus two reserved keys read
# by the runner: "teacher_view" (the teacher condition, default "rich") and "optim" (optimizer overrides).
METHODS: dict[str, dict[str, Any]] = {
    "grpo": {"name": "grpo"},
    "opsd": {"name": "opsd"},
    "opsd_weak": {"name": "opsd", "teacher_view": "weak"},  # OPSD with the answer-only teacher (search task)
    "opsd_clip": {"name": "opsd_clip"},
    "rlsd": {"name": "rlsd"},
    "egrsd": {"name": "egrsd"},
    "cl_egrsd": {"name": "cl_egrsd"},
    "dasd": {"name": "dasd"},
    "conform": {"name": "dasd", "direction": "conform"},  # DASD ablation: always pull (ω = +1)
    "novelty": {"name": "dasd", "direction": "novelty"},  # DASD ablation: always push (ω = −1)
    # Matched controls (issue #23): GRPO reduced as DASD is (token-mean; DASD at β = 0), and DASD with ω
    # permuted within each rollout (the routing isolated from the term's size).
    "grpo_token_mean": {"name": "grpo", "aggregation": "token-mean"},
    "dasd_shuffled": {"name": "dasd", "direction": "shuffled"},
    # DASD's bounded form: ω-weighted full-vocabulary JSD added to the GRPO loss (the push cannot diverge).
    "dasd_divergence": {"name": "dasd_divergence"},
    # The other reading of DASD's threshold: τ = the ρ-quantile, so only the calmest ρ of tokens are pulled.
    "dasd_bottom": {"name": "dasd", "quantile": "bottom"},
    # DASD's open choices (issue #15): the push as the raw log-ratio (AntiSD's bounded JSD-ascent signal is
    # the default since the sweep); the former floor on δ's scale (0.1; no floor is the default since the third
    # study's tuning, β = 0.01 too: `dasd` itself).
    "dasd_raw_push": {"name": "dasd", "push_signal": "log_ratio"},
    "dasd_floor0.1": {"name": "dasd", "scale_floor": 0.1},
    "dasd_beta0.1": {"name": "dasd", "beta": 0.1},
    "dasd_beta0.3": {"name": "dasd", "beta": 0.3},
    "dasd_beta1": {"name": "dasd", "beta": 1.0},
    **TUNING_GRID,
    # Several clipped updates on the same rollouts (PPO epochs): the clip acts on the sampled-token push.
    "dasd_ppo2": {"name": "dasd", "optim": {"ppo_epochs": 2}},
    "dasd_ppo4": {"name": "dasd", "optim": {"ppo_epochs": 4}},
    # The self-distillation family (docs/objectives.md); available, not in the default set.
    "rlrt": {"name": "rlrt"},
    "vopd": {"name": "vopd"},
    "vopd_topk": {"name": "vopd_topk"},
    "antisd": {"name": "antisd"},
    "eopd": {"name": "eopd"},
    "reopold": {"name": "reopold"},
    "pw_opsd": {"name": "pw_opsd"},
}
RESERVED_KEYS = ("teacher_view", "optim")
DEFAULT_METHODS = {
    # The methods of the registered claims (study/preregistration.py), each with its matched control.
    "search": ("grpo", "grpo_token_mean", "opsd", "opsd_weak", "dasd", "dasd_shuffled", "conform", "novelty"),
    "chains": ("grpo", "opsd", "opsd_clip", "rlsd", "egrsd", "cl_egrsd", "dasd", "conform", "novelty",
               "dasd_divergence"),
    **{name: BENCHMARK_METHODS for name in BENCHMARK_TASKS},
}
QUICK_METHODS = ("grpo", "opsd", "dasd")
TUNING_METHODS = {"search": tuple(TUNING_GRID), "chains": ()}
"""The tuning runs of each task (on the tuning seeds and the validation slice). The knobs of the method
`preregistration.choose_tuned` picks are given to every DASD-family method of the claim runs."""
EVALUATIONS = ("test", "validation")
"""What a run is evaluated on: "test" (the held-out and out-of-distribution sets: claim runs) or "validation"
(the validation slice cut from the RL pool: tuning runs)."""


def method_parts(name: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(objective config, optimizer overrides, teacher view) of a study method."""
    entry = dict(METHODS[name])
    optim = entry.pop("optim", {})
    view = entry.pop("teacher_view", "rich")
    return entry, optim, view


@dataclass(frozen=True)
class WarmStartSettings:
    """The tiny model's size and the two supervised stages that teach it the task partially.

    Stage 1 fine-tunes on worked solutions of whole problems, some with the solution in the prompt:
    the model learns the format, to read the instructions, and to copy from a reference solution,
    but not the modular arithmetic (its results stay at chance). Stage 2 keeps that fine-tuning going
    and adds an arithmetic drill, the stand-in for the pretraining a real LLM brings: single operations
    in the solutions' own line format ("7*3=1"), loss on the results. The order matters: drilling
    first, then fine-tuning, gave a model that computes correctly but never learned to read the
    instructions or copy from the prompt (student and teacher both at chance).
    """

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    steps: int = 800
    """Stage 1 optimizer steps (warm-up, then cosine decay from `lr` to zero)."""
    batch_size: int = 32
    """Problems per step, in both stages."""
    lr: float = 3e-3
    """Stage 1 peak AdamW learning rate."""
    teacher_fraction: float = 0.5
    """Share of problems whose prompt is the teacher prompt (worked solution in context)."""
    drill_steps: int = 600
    """Stage 2 optimizer steps, at the constant rate `drill_lr` after a warm-up."""
    drill_facts: int = 256
    """Drill operations per stage 2 step, spread over sequences of 1..drill_max_lines lines."""
    drill_max_lines: int = 8
    """Longest drill sequence; varied lengths make the skill work at any position."""
    drill_lr: float = 1e-3
    """Stage 2 AdamW learning rate (the drill does not learn the table at 3e-3)."""
    drill_target: float | None = None
    """Drill to convergence: after `drill_steps`, stage 2 goes on until the held-out drill accuracy (greedy, on
    `drill_check_facts` operations of their own stream, checked every `drill_check_every` steps) reaches this,
    at most `drill_max_steps` stage 2 steps in all; None: exactly `drill_steps`. Converged arithmetic ends every
    machine's build at the same skill, where a fixed step count caught a curve that rises late and abruptly."""
    drill_check_every: int = 100
    drill_check_facts: int = 512
    drill_max_steps: int = 4000
    warmup_steps: int = 20
    """Linear warm-up at the start of each stage."""
    template: str = "opsd_mild"
    """Prompt template, the same one the study's runs use."""
    seed: int = 0
    """Seed of the initialization, the drill, the example order and the prompt choice."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.teacher_fraction <= 1.0:
            raise ValueError(f"teacher_fraction must lie in [0, 1], got {self.teacher_fraction}")
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.drill_lr <= 0:
            raise ValueError("steps and batch_size must be >= 1 and the learning rates positive")
        if self.drill_steps < 0 or self.drill_facts < 1 or self.drill_max_lines < 1:
            raise ValueError("drill_steps must be >= 0, drill_facts and drill_max_lines >= 1")
        if self.drill_target is not None and not (0.0 < self.drill_target <= 1.0
                                                  and self.drill_check_every >= 1 and self.drill_check_facts >= 1
                                                  and self.drill_max_steps >= self.drill_steps):
            raise ValueError("drill_target must lie in (0, 1], drill_check_every and drill_check_facts be >= 1 and "
                             f"drill_max_steps >= drill_steps; got {self.drill_target}, {self.drill_check_every}, "
                             f"{self.drill_check_facts}, {self.drill_max_steps} (drill_steps {self.drill_steps})")

    @property
    def total_steps(self) -> int:
        """The most steps the warm start can take (with `drill_target`, it may stop earlier)."""
        return self.steps + (self.drill_max_steps if self.drill_target is not None else self.drill_steps)


WARM_STARTS: dict[str, WarmStartSettings] = {
    "search": WarmStartSettings(drill_target=0.98),
    "chains": WarmStartSettings(),
}
"""Each task's default warm start. The search task's drill runs to convergence (its checks must verify); the
chains task keeps the settings its shipped warm start was built with."""


@functools.lru_cache(maxsize=4)
def _evaluation_sets(task: StudyTask | SearchStudyTask, evaluation: str,
                     limit: int | None) -> tuple[list[Any], dict[str, list[Any]]]:
    """A task's evaluation sets (see `StudySettings.evaluation_sets`), generated once per process (a run
    reads them about ten times; generating the search task's splits takes 0.3 s). Callers do not modify them."""
    splits = task.splits()
    if evaluation == "validation":
        return list(splits.validation[:limit]), {}
    return splits.held_out[:limit], {name: problems[:limit] for name, problems in splits.ood.items()}


@dataclass(frozen=True)
class StudySettings:
    """Everything that decides the study's numbers (workers and the output folder do not)."""

    methods: tuple[str, ...] | None = None
    """Methods of the claim runs (None: the task's `DEFAULT_METHODS`)."""
    seeds: int = 5
    """Claim runs per method, with optim.seed = 0 .. seeds-1 (`preregistration.CLAIM_SEEDS` at the default)."""
    tuning: tuple[str, ...] | None = None
    """Methods of the tuning runs, on `preregistration.TUNING_SEEDS` and the validation slice (None: the task's
    `TUNING_METHODS`; empty: no tuning, the library defaults are used)."""
    steps: int = 30
    """Optimizer steps per run."""
    prompts_per_step: int = 4
    group_size: int = 8
    lr: float = 1e-4
    """Constant AdamW learning rate of every run (full fine-tuning of the tiny model). At 1e-3 every method,
    GRPO included, lost held-out accuracy within 30 steps on operation chains; at 3e-4 GRPO did and DASD
    collapsed."""
    max_new_tokens: int | None = None
    """Rollout and in-distribution evaluation length limit (None: the task's)."""
    ood_max_new_tokens: int | None = None
    """Out-of-distribution evaluation length limit (None: the task's; unused by a task without that split)."""
    temperature: float = 1.0
    """Rollout and evaluation sampling temperature."""
    eval_samples: int = 8
    """Samples per held-out problem (pass@k and Avg@k for k = 1 .. eval_samples). 8, not 16, so that the default
    search study fits its 60-minute budget on a 2-core CPU (the final evaluation is half a claim run's time);
    the claims are judged over seeds x problems, where more problems would help more than more samples."""
    eval_limit: int = 0
    """Evaluate only the first this many problems of each held-out set (0: all). Unlike the task's sizes it
    leaves the problems, and so the warm start, unchanged (`--quick` uses it)."""
    eval_every: int = 0
    """Also measure the student's held-out Avg@k every this many steps during training (0: only at the end, the
    default: curves cost a third of a claim run; `--curves N` turns them on)."""
    curve_samples: int = 4
    """Samples per problem of those measurements during training (Avg@k has the same expectation for every k,
    so the curve and the final Avg@`eval_samples` share an axis; fewer samples keep the curve cheap)."""
    premise_margin: float = 0.1
    """The teacher prompt must beat the student prompt on the held-out problems by at least this much Avg@k
    on the warm start (for every teacher view the methods use), or the study stops: self-distillation from a
    teacher no better than the student would be moot."""
    verification_margin: float = 0.3
    """Where the task has check verdicts: on the warm start, P("yes" | the answer tried) − P("yes" | a wrong
    listed candidate tried) over the student's held-out check lines must reach this, or the study stops (a
    search whose checks do not verify cannot reward exploring). The student must also beat the task's chance
    baseline (a listed candidate boxed at random)."""
    task: StudyTask | SearchStudyTask | BenchmarkStudyTask = field(default_factory=SearchStudyTask)
    warm_start: WarmStartSettings | None = None
    """The warm start's settings (None: the task's `WARM_STARTS` entry)."""
    model: str | None = None
    """The base of every run on a benchmark task, instead of a warm start: a local Hugging Face folder, a training
    run folder, or "smollm2" / "tiny", as `models.load_model` accepts (never fetched from the hub). Required by a
    benchmark task, refused by the others (they train their own warm start). Only `warm_start.template` is read
    then."""
    premise_stops: bool = True
    """Stop the study when the premise fails. False measures and reports it but runs the methods anyway: only for a
    smoke test whose base scores about 0 under every prompt (`--quick` on a benchmark)."""

    def __post_init__(self) -> None:
        if self.warm_start is None:
            object.__setattr__(self, "warm_start", WARM_STARTS.get(self.task.name, WarmStartSettings()))
        if self.methods is None:
            object.__setattr__(self, "methods", DEFAULT_METHODS[self.task.name])
        object.__setattr__(self, "methods", tuple(self.methods))
        if self.tuning is None:
            object.__setattr__(self, "tuning", TUNING_METHODS.get(self.task.name, ()))
        object.__setattr__(self, "tuning", tuple(self.tuning))
        if self.max_new_tokens is None:
            object.__setattr__(self, "max_new_tokens", self.task.max_new_tokens)
        if self.ood_max_new_tokens is None:
            object.__setattr__(self, "ood_max_new_tokens", getattr(self.task, "ood_max_new_tokens", 0))
        unknown = [m for m in (*self.methods, *self.tuning) if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown study methods {unknown}; choose from {', '.join(METHODS)}")
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods must be a non-empty list without repeats, got {self.methods}")
        if len(set(self.tuning)) != len(self.tuning):
            raise ValueError(f"tuning must be a list without repeats, got {self.tuning}")
        if self.tuning and not getattr(self.task, "n_validation", 0):
            raise ValueError(f"tuning runs need a validation slice; the {self.task.name} task has none (tuning=())")
        views = self.task.teacher_views(self.warm_start.template)
        bad_views = [m for m in self.methods if method_parts(m)[2] not in views]
        if bad_views:
            raise ValueError(f"methods {bad_views} need a teacher view the {self.task.name} task does not have "
                             f"(it has {sorted(views)})")
        if not 0.0 <= self.verification_margin <= 1.0:
            raise ValueError(f"verification_margin must lie in [0, 1], got {self.verification_margin}")
        if self.seeds < 1 or self.steps < 1 or self.eval_samples < 1 or self.curve_samples < 1:
            raise ValueError("seeds, steps, eval_samples and curve_samples must be >= 1")
        if self.eval_every < 0 or self.eval_limit < 0:
            raise ValueError(f"eval_every and eval_limit must be >= 0, got {self.eval_every}, {self.eval_limit}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        self._check_model()

    def _check_model(self) -> None:
        """A benchmark task needs a model to train, the warm-start tasks take none; the model must resolve locally."""
        on_benchmark = isinstance(self.task, BenchmarkStudyTask)
        if on_benchmark and self.model is None:
            raise ValueError(f"the {self.task.name} task trains a given model: set model (--model PATH, a local "
                             "Hugging Face folder; --quick uses SmolLM2)")
        if not on_benchmark and self.model is not None:
            raise ValueError(f"model (--model) replaces the warm start on a benchmark task "
                             f"({', '.join(BENCHMARK_TASKS)}); the {self.task.name} task trains its own warm start")
        if self.model is not None:
            from selfdistill.models import resolve_model  # torch: only when a model is named

            resolve_model(self.model)  # FileNotFoundError naming the path; builds nothing

    @classmethod
    def for_task(cls, name: str, *, quick: bool = False, task_options: dict[str, Any] | None = None,
                 **overrides: Any) -> StudySettings:
        """The settings of the study on task `name` ("search", "chains" or a benchmark such as "gsm8k", whose
        task is built with `task_options`); `quick` is the end-to-end check: 3 methods, 1 seed, 6 steps, 16
        problems of each held-out set, the same (shipped) warm start (on a benchmark: `BENCHMARK_QUICK`)."""
        if name not in STUDY_TASKS:
            raise ValueError(f"unknown study task {name!r}; choose from {', '.join(STUDY_TASKS)}")
        values: dict[str, Any] = {"task": STUDY_TASKS[name](**(task_options or {}))}
        if quick:
            values.update(methods=QUICK_METHODS, tuning=(), seeds=1, steps=6, eval_every=3, eval_limit=16)
        if isinstance(values["task"], BenchmarkStudyTask):
            values.update(benchmark_settings(values["task"], quick=quick))
        return cls(**{**values, **overrides})

    @property
    def views(self) -> dict[str, str]:
        """Teacher view -> prompt template, of the views the methods use."""
        views = self.task.teacher_views(self.warm_start.template)
        used = {method_parts(m)[2] for m in self.methods}
        return {view: template for view, template in views.items() if view in used}

    @property
    def prompt_options(self) -> dict[str, Any]:
        """`PromptBuilder` options of every prompt (student and teacher, evaluation and training): the benchmark
        task's, else a 512-token prompt limit."""
        return self.task.prompt_options() if isinstance(self.task, BenchmarkStudyTask) else {"max_prompt_tokens": 512}

    def evaluation_sets(self, evaluation: str = "test") -> tuple[list[Any], dict[str, list[Any]]]:
        """(the in-distribution problems, the out-of-distribution sets by name) a run is evaluated on, each cut
        to `eval_limit`: "test", the held-out and out-of-distribution sets; "validation", the validation slice
        and none."""
        if evaluation not in EVALUATIONS:
            raise ValueError(f"evaluation must be one of {EVALUATIONS}, got {evaluation!r}")
        return _evaluation_sets(self.task, evaluation, self.eval_limit or None)

    def to_json(self) -> dict[str, Any]:
        values = asdict(self)
        values["methods"] = list(self.methods)
        values["task"] = self.task.to_json()
        return values

    def run_key(self, method: str, seed: int, overrides: dict[str, Any] | None = None,
                evaluation: str = "test") -> str:
        """Hash of what decides one run's result: reused only when it matches. It covers the objective's
        knob defaults too (read from its loss signature), so a changed library default is not reused."""
        from selfdistill.objectives import OBJECTIVES  # torch: only where runs are planned

        values = self.to_json()
        for name in ("methods", "seeds", "tuning", "premise_margin", "verification_margin", "premise_stops"):
            del values[name]
        del values["model"]  # the key's suffix names the base (the model's identity), as it names the warm start
        objective = METHODS[method]
        defaults = {k: repr(v) for k, v in OBJECTIVES[objective["name"]].knob_defaults().items()}
        payload = {"settings": values, "method": method, "objective": objective, "knob_defaults": defaults,
                   "seed": seed, "overrides": overrides or {}, "evaluation": evaluation}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def base_key(self) -> str:
        values = self.to_json()
        payload = {k: values[k] for k in ("task", "warm_start", "max_new_tokens", "ood_max_new_tokens",
                                          "temperature", "eval_samples", "eval_limit")}
        payload["views"] = sorted(self.task.teacher_views(self.warm_start.template))
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
