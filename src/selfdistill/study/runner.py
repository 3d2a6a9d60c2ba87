"""The method study: every method trained from the same warm start, several seeds, then evaluated.

    out/
      study.json                settings, the warm start's record, wall time
      problems/rl_train.jsonl   the problems every run trains on
      base/eval.json            the warm start itself: student and teacher prompts (the premise check)
      runs/<method>-seed<k>/    one trainer run folder each (config.json, metrics.jsonl, samples.jsonl,
                                checkpoint-<steps>/) plus eval.json
      report.md, *.png          written by `selfdistill.study.report`

Before any run, the warm start's premise is checked (`check_premise`): the teacher prompt of every
teacher view the methods use must beat the student prompt on the held-out problems by
`premise_margin` Avg@k, or the study stops and says so.

Every run gets the same rollout budget (steps x prompts x group size), the same optimizer settings
and the same frozen teacher (the warm start); a seed changes the data order and the rollout samples,
and run k of every method uses seed k, so methods can be compared seed by seed. Held-out evaluation
draws n samples per problem with a fixed seed for every model (common random numbers).

Runs go to a pool of worker processes; the main process shows progress by reading each run's
metrics.jsonl. A run whose eval.json matches the current settings is reused, so an interrupted study
continues where it stopped.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from selfdistill.atomic import write_json_atomic, write_text_atomic
from selfdistill.provenance import record_environment, summary_line
from selfdistill.study.settings import StudySettings, method_parts

EVAL_FILE = "eval.json"
STUDY_FILE = "study.json"
EVAL_SEED = 0


@dataclass(frozen=True)
class RunJob:
    """One unit of work for a worker process: a training run and its evaluation, or the base evaluation."""

    name: str  # "<method>-seed<k>" or "base"
    method: str | None  # None for the base evaluation
    seed: int
    folder: str
    key: str
    warm_start_dir: str
    train_file: str
    settings: StudySettings


def run_name(method: str, seed: int) -> str:
    return f"{method}-seed{seed}"


def run_config(job: RunJob) -> dict[str, Any]:
    """The trainer config (as nested dicts) of a training job."""
    from selfdistill.config import run_values

    settings = job.settings
    objective, optim, view = method_parts(job.method)
    template = settings.task.teacher_views(settings.warm_start.template)[view]
    return run_values(
        settings,
        model={"path": job.warm_start_dir},
        data={"dataset": job.train_file, "num_problems": 0, "template": template, **settings.prompt_options},
        objective=objective,
        optim={"min_lr_ratio": 1.0, "seed": job.seed,
               "micro_batch_size": settings.prompts_per_step * settings.group_size, **optim},
        logging={"progress": False, "tensorboard": False, "sample_every": 5, "samples_per_step": 4},
    )


class StudyPremiseError(RuntimeError):
    """The warm start's teacher prompt does not beat its student prompt by the stated margin."""


def premise_lines(base: dict[str, Any], settings: StudySettings) -> tuple[list[str], bool]:
    """(one line per teacher view the methods use: "<view> teacher Avg@n A vs student B (needs a margin
    of M): holds / FAILS", whether every view holds)."""
    student = float(base["student"]["summary"]["avg@n"])
    lines, holds_all = [], True
    for view in settings.views:
        teacher = float(base[f"teacher_{view}"]["summary"]["avg@n"])
        holds = teacher >= student + settings.premise_margin
        holds_all &= holds
        lines.append(f"{view} teacher Avg@{settings.eval_samples} {teacher:.3f} vs student {student:.3f} "
                     f"(needs a margin of {settings.premise_margin:g}): {'holds' if holds else 'FAILS'}")
    return lines, holds_all


def check_premise(base: dict[str, Any], settings: StudySettings) -> list[str]:
    """`premise_lines`, raising StudyPremiseError (with those lines) when a view fails."""
    lines, holds = premise_lines(base, settings)
    if not holds:
        raise StudyPremiseError(
            f"the {'warm start' if settings.model is None else 'base model'}'s premise fails: " + "; ".join(lines)
            + ". Every self-distillation result from this base would be moot, so the study stops. "
            + ("Rebuild the warm start (--rebuild-warm-start) or change its settings." if settings.model is None
               else f"Its base is the given model {settings.model!r}: choose another (--model) or other prompts."))
    return lines


def read_finished(folder: Path, key: str) -> dict[str, Any] | None:
    """The eval.json of a finished job with this key, or None."""
    try:
        result = json.loads((folder / EVAL_FILE).read_text())
    except (OSError, ValueError):
        return None
    return result if result.get("key") == key else None


# ----------------------------------------------------------------------------------------------
# inside a worker process


def _init_worker(threads: int) -> None:
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    torch.set_num_threads(threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _prompt_builder(tokenizer: Any, settings: StudySettings, view: str | None) -> Any:
    """The prompts of the student (view None) or of a teacher view, in that view's template."""
    from selfdistill.prompts import PromptBuilder

    template = settings.warm_start.template
    if view is not None:
        template = settings.task.teacher_views(template)[view]
    return PromptBuilder(tokenizer, template=template, **settings.prompt_options)


def _sampled(model: Any, tokenizer: Any, job: RunJob, grader: Any, *, view: str | None = None,
             split: str = "held_out", n: int | None = None,
             per_problem: dict[str, list[float]] | None = None) -> dict[str, Any]:
    """The `summarize` macro row of n samples per problem of a held-out split, from the student prompt
    (view None) or a teacher view's prompt, plus the task's per-line measurements (StepAcc, ...);
    n samples per problem (default `eval_samples`). Fills `per_problem`, when given, with the per-problem
    scores (`per_problem.per_problem_scores`)."""
    from selfdistill.study.probes import sample_accuracy

    settings = job.settings
    held_out, ood = settings.held_out()
    problems = held_out if split == "held_out" else ood
    builder = _prompt_builder(tokenizer, settings, view)
    prompted = problems if view is None else [settings.task.teacher_problem(p) for p in problems]
    summary, records = sample_accuracy(
        model, tokenizer, prompted, builder, n=n or settings.eval_samples,
        max_new_tokens=settings.max_new_tokens if split == "held_out" else settings.ood_max_new_tokens,
        temperature=settings.temperature, seed=EVAL_SEED, role="student" if view is None else "teacher",
        grader=grader)
    if per_problem is not None:
        from selfdistill.study.per_problem import per_problem_scores

        per_problem.update(per_problem_scores(problems, records))
    return {**summary, **settings.task.trace_metrics(problems, records)}


def _entropy(model: Any, tokenizer: Any, job: RunJob, view: str | None) -> dict[str, Any]:
    from selfdistill.study.probes import token_entropy

    settings = job.settings
    builder = _prompt_builder(tokenizer, settings, view)
    return asdict(token_entropy(model, tokenizer, settings.task, settings.held_out()[0], builder,
                                role="student" if view is None else "teacher"))


def _measure(model: Any, tokenizer: Any, job: RunJob, grader: Any, *, teachers: bool) -> dict[str, Any]:
    """The student's held-out (and out-of-distribution) samples and token entropy; with `teachers`, the
    same in distribution under every teacher view's prompt (keys "teacher_<view>")."""
    has_ood = bool(job.settings.held_out()[1])
    per_problem: dict[str, list[float]] = {}  # metric -> one score per held-out problem (the claims' unit)
    result = {"student": {"summary": _sampled(model, tokenizer, job, grader, per_problem=per_problem),
                          "token_entropy": _entropy(model, tokenizer, job, None), "per_problem": per_problem}}
    if has_ood:
        result["student"]["ood"] = _sampled(model, tokenizer, job, grader, split="ood")
    if teachers:
        for view in job.settings.task.teacher_views(job.settings.warm_start.template):
            result[f"teacher_{view}"] = {"summary": _sampled(model, tokenizer, job, grader, view=view),
                                         "token_entropy": _entropy(model, tokenizer, job, view)}
    return result


CURVE_METRICS = ("avg@n", "epistemic_per_response", "mean_length", "step_acc")


def _curve_point(model: Any, tokenizer: Any, job: RunJob, grader: Any, step: int) -> dict[str, Any]:
    """Held-out numbers during training, from `curve_samples` samples per problem: Avg@n, pass@n, E(y) per
    response, length and StepAcc (where the task has it), in distribution and (prefixed "ood_") out of it."""
    n = job.settings.curve_samples
    summary = _sampled(model, tokenizer, job, grader, n=n)
    point = {"step": step, "n": n, f"pass@{n}": summary[f"pass@{n}"],
             **{name: summary[name] for name in CURVE_METRICS if name in summary}}
    if job.settings.held_out()[1]:
        ood = _sampled(model, tokenizer, job, grader, split="ood", n=n)
        point.update({f"ood_{name}": ood[name] for name in CURVE_METRICS if name in ood})
    return point


def execute_job(job: RunJob) -> dict[str, Any]:
    """Train (unless this is the base job) and evaluate; writes and returns the job's eval.json."""
    from selfdistill.grading import Grader

    folder = Path(job.folder)
    folder.mkdir(parents=True, exist_ok=True)
    with Grader(workers=1) as grader:  # one grading process for every evaluation of the job
        result = _train_and_measure(job, folder, grader)
    write_json_atomic(folder / EVAL_FILE, result)
    return result


def _train_and_measure(job: RunJob, folder: Path, grader: Any) -> dict[str, Any]:
    from selfdistill.models import load_model

    result: dict[str, Any] = {"key": job.key, "name": job.name, "method": job.method, "seed": job.seed}
    started = time.perf_counter()
    if job.method is None:
        import torch

        model, tokenizer = load_model(job.warm_start_dir)
        model = model.to("cuda" if torch.cuda.is_available() else "cpu")  # where the trainer puts the runs' models
        result["train_seconds"] = 0.0
    else:
        from selfdistill.config import config_from_dict
        from selfdistill.trainer import Trainer

        trainer = Trainer(config_from_dict(run_config(job)), run_dir=folder)
        curve: list[dict[str, Any]] = []  # held-out numbers during training
        every, eval_seconds = job.settings.eval_every, 0.0

        def measure_during_training(metrics: dict[str, Any]) -> None:
            nonlocal eval_seconds
            if every and metrics["step"] % every == 0 and metrics["step"] < job.settings.steps:
                t0 = time.perf_counter()
                curve.append(_curve_point(trainer.model, trainer.tokenizer, job, grader, metrics["step"]))
                eval_seconds += time.perf_counter() - t0

        trainer.run(callback=measure_during_training)
        model, tokenizer = trainer.model, trainer.tokenizer
        result["held_out_curve"] = curve
        result["steps"] = trainer.step
        result["train_seconds"] = round(time.perf_counter() - started - eval_seconds, 1)
        result["curve_eval_seconds"] = round(eval_seconds, 1)
    eval_started = time.perf_counter()
    result.update(_measure(model, tokenizer, job, grader, teachers=job.method is None))
    result["eval_seconds"] = round(time.perf_counter() - eval_started, 1)
    return result


# ----------------------------------------------------------------------------------------------
# the main process


def _count_lines(path: Path) -> tuple[int, dict[str, Any] | None]:
    """(number of complete lines, the last one parsed) of a JSONL file that may be growing."""
    try:
        text = path.read_text()
    except OSError:
        return 0, None
    lines = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]
    return len(lines), (json.loads(lines[-1]) if lines else None)


def _write_train_file(problems: list[Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"id": p.id, "problem": p.problem, "answer": p.answer, "solution": p.solution, "source": p.source}
            for p in problems]
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def plan_jobs(settings: StudySettings, out: Path, warm_folder: Path, train_file: Path,
              base_id: str | None = None) -> list[RunJob]:
    """The base job, then seed-major training jobs (seed 0 of every method first). `base_id` names the base's
    weights in every key (default: the warm start folder's name)."""
    common = {"warm_start_dir": str(warm_folder), "train_file": str(train_file), "settings": settings}
    warm_id = base_id or warm_folder.name  # ends in the warm start's own hash: new weights never reuse old results
    jobs = [RunJob(name="base", method=None, seed=EVAL_SEED, folder=str(out / "base"),
                   key=f"{settings.base_key()}-{warm_id}", **common)]
    for seed in range(settings.seeds):
        for method in settings.methods:
            name = run_name(method, seed)
            jobs.append(RunJob(name=name, method=method, seed=seed, folder=str(out / "runs" / name),
                               key=f"{settings.run_key(method, seed)}-{warm_id}", **common))
    return jobs


def run_study(settings: StudySettings, out: str | Path, *, workers: int = 2, progress: bool = True,
              rebuild_warm_start: bool = False) -> Path:
    """Run (or continue) the study into `out` and write its report; returns the report path.

    The warm start is the one shipped with the package when there is one for these settings; with
    `rebuild_warm_start` (or without a shipped one) it is trained into the cache first.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from selfdistill.progress import Progress  # plain lines every ~30 s when the output is a log
    from selfdistill.study.report import build_report
    from selfdistill.study.warmstart import SHIPPED_DIR, file_digests, read_warm_start_record, warm_start_dir

    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    environment = summary_line(record_environment(out))  # environment.json: versions, commit, hardware
    console = Console(quiet=not progress)
    started = time.perf_counter()
    columns = (TextColumn("[bold]{task.description:<18}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[status]}"), TimeElapsedColumn())

    base_model, base_id = None, None
    if settings.model is not None:  # a given model is the base of every run: no warm start
        from selfdistill.study.model_base import prepare_model_base

        warm_folder, base_model, base_id = prepare_model_base(settings)
        _write_train_file(settings.task.validation(), out / base_model["validation_file"])
        warm_record, warm_source, warm_digest = None, "model", None
        console.print(f"base model: {warm_folder} ({base_id}); validation slice: {base_model['validation_problems']} "
                      f"train problems kept out of the RL pool -> {out / base_model['validation_file']}")
    else:
        with Progress(*columns, console=console, disable=not progress) as bar:
            warm_task = bar.add_task("warm start", total=settings.warm_start.total_steps, status="cached?")
            warm_folder = warm_start_dir(
                settings.task, settings.warm_start, rebuild=rebuild_warm_start,
                on_step=lambda step, loss: bar.update(warm_task, completed=step, status=f"loss {loss:.3f}"))
            bar.update(warm_task, completed=settings.warm_start.total_steps, status=str(warm_folder.name))
        warm_record = read_warm_start_record(warm_folder)
        warm_source = "shipped" if warm_folder.parent == SHIPPED_DIR else "trained"
        warm_digest = file_digests(warm_folder).get("model.safetensors")
        console.print(f"warm start ({warm_source}): {warm_folder}  model.safetensors sha256 {warm_digest}")

    # The RL problems as the teacher sees them (on the search task: the search-free worked solution).
    rl_problems = [settings.task.teacher_problem(p) for p in settings.task.splits().rl_train]
    train_file = out / "problems" / "rl_train.jsonl"
    _write_train_file(rl_problems, train_file)
    jobs = plan_jobs(settings, out, warm_folder, train_file, base_id)
    todo = [job for job in jobs if read_finished(Path(job.folder), job.key) is None]
    console.print(f"study: {len(jobs) - 1} runs + base evaluation; {len(jobs) - len(todo)} already done, "
                  f"{len(todo)} to do with {workers} worker process(es) -> {out}")

    study_record = {"settings": settings.to_json(), "warm_start": warm_record, "warm_start_dir": str(warm_folder),
                    "warm_start_source": warm_source, "warm_start_sha256": warm_digest, "workers": workers,
                    **({"base_model": base_model} if base_model is not None else {})}
    threads = max(1, (os.cpu_count() or 1) // workers)
    with Progress(*columns, console=console, disable=not progress) as bar, ProcessPoolExecutor(
        max_workers=workers, mp_context=get_context("spawn"), initializer=_init_worker, initargs=(threads,)
    ) as pool:
        overall = bar.add_task("study", total=len(jobs), completed=len(jobs) - len(todo), status="")
        base_job, run_jobs = jobs[0], [job for job in todo if job.method is not None]
        base = read_finished(Path(base_job.folder), base_job.key)
        if base is None:  # the premise is checked on the base before any run starts
            _run_jobs(pool, [base_job], bar, overall)
            base = read_finished(Path(base_job.folder), base_job.key)
        study_record["premise"], study_record["premise_holds"] = premise_lines(base, settings)
        try:
            if settings.premise_stops:  # off only for a smoke test (--quick on a benchmark): reported, not enforced
                check_premise(base, settings)
        except StudyPremiseError as error:
            wall = round(time.perf_counter() - started, 1)
            write_json_atomic(out / STUDY_FILE, {**study_record, "wall_seconds": wall})
            (out / "report.md").write_text(f"# Method study ({settings.task.name} task): stopped\n\n{error}\n")
            raise
        for line in study_record["premise"]:
            console.print(f"premise: {line}")
        _run_jobs(pool, run_jobs, bar, overall)
    wall_seconds = time.perf_counter() - started
    write_json_atomic(out / STUDY_FILE, {**study_record, "wall_seconds": round(wall_seconds, 1)})
    report = build_report(out)
    with report.open("a", encoding="utf-8") as file:
        file.write(f"\nEnvironment: {environment}\n")
    console.print(f"report: {report}  (wall time {wall_seconds / 60:.1f} min)\nenvironment: {environment}")
    return report


def _run_jobs(pool: ProcessPoolExecutor, jobs: list[RunJob], bar: Any, overall: Any) -> None:
    """Run `jobs` in the pool, showing a progress row per started job; a failed job raises its error."""
    pending: dict[Future, RunJob] = {pool.submit(execute_job, job): job for job in jobs}
    rows: dict[str, Any] = {}
    while pending:
        done, _ = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
        for future in done:
            job = pending.pop(future)
            future.result()  # a failed run stops the study with its error
            bar.advance(overall)
            if job.name in rows:
                bar.remove_task(rows.pop(job.name))
        for job in pending.values():
            _show_job(bar, rows, job)


def _show_job(bar: Any, rows: dict[str, Any], job: RunJob) -> None:
    """Add or refresh the progress row of a job that has started (its folder shows activity)."""
    folder = Path(job.folder)
    if job.method is None:
        if not folder.exists():
            return
        total, completed, status = 1, 0, "evaluating"
    else:
        steps_done, last = _count_lines(folder / "metrics.jsonl")
        if last is None:
            if not (folder / "config.json").exists():
                return
            status = "starting"
        elif steps_done >= job.settings.steps:
            status = "evaluating"
        else:
            status = f"reward {last['reward']:.2f} | H {last['entropy']:.3f} | {last['seconds']:.1f}s/step"
        total, completed = job.settings.steps, steps_done
    if job.name not in rows:
        rows[job.name] = bar.add_task(job.name, total=total, completed=completed, status=status)
    else:
        bar.update(rows[job.name], completed=completed, status=status)

