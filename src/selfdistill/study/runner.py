"""The method study: every method trained from the same warm start, several seeds, then evaluated.

    out/
      study.json                settings, the warm start's record, wall time
      problems/rl_train.jsonl   the problems every run trains on
      base/eval.json            the warm start itself: student and teacher prompts (the premise check)
      tuning/<method>-seed<k>/  the tuning runs (tuning seeds, evaluated on the validation slice)
      tuning.json               their validation Avg@k and the value chosen from them
      runs/<method>-seed<k>/    one trainer run folder each (config.json, metrics.jsonl, samples.jsonl,
                                checkpoint-<steps>/) plus eval.json: the claim runs
      report.md, *.png          written by `selfdistill.study.report`

Before any run, the warm start's premise is checked (`check_premise`): the teacher prompt of every
teacher view the methods use must beat the student prompt on the held-out problems by
`premise_margin` Avg@k; where the task has check verdicts, the student's checks must verify (a
verification gap of `verification_margin`) and the student must beat the task's chance baseline; or
the study stops and says why.

Then the tuning runs (`settings.tuning` on `preregistration.TUNING_SEEDS`, evaluated on the validation
slice only) choose DASD's knobs (`preregistration.TUNED_KNOBS`) by `preregistration.choose_tuned`, and the
claim runs (`settings.methods` on seeds 0 .. seeds-1, evaluated on the held-out and out-of-distribution sets)
use the chosen values for every DASD-family method.

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
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from selfdistill.atomic import write_json_atomic, write_text_atomic
from selfdistill.provenance import record_environment, summary_line
from selfdistill.study.settings import StudySettings, method_parts

EVAL_FILE = "eval.json"
STUDY_FILE = "study.json"
TUNING_FILE = "tuning.json"
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
    evaluation: str = "test"  # "test" (held-out and OOD sets) or "validation" (tuning runs)
    overrides: dict[str, Any] = field(default_factory=dict)  # objective knobs set by the tuning


def run_name(method: str, seed: int) -> str:
    return f"{method}-seed{seed}"


def run_config(job: RunJob) -> dict[str, Any]:
    """The trainer config (as nested dicts) of a training job."""
    from selfdistill.config import run_values

    settings = job.settings
    objective, optim, view = method_parts(job.method)
    objective = {**objective, **job.overrides}
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
    """(one line per premise check, "...: holds" or "...: FAILS", whether every check holds): each teacher view
    the methods use against the student prompt (Avg@n, `premise_margin`); where the task measures them, the
    student's verification gap (`verification_margin`) and the student against the chance baseline."""
    summary = base["student"]["summary"]
    student = float(summary["avg@n"])
    checks: list[tuple[str, bool]] = []
    for view in settings.views:
        teacher = float(base[f"teacher_{view}"]["summary"]["avg@n"])
        holds = teacher >= student + settings.premise_margin
        checks.append((f"{view} teacher Avg@{settings.eval_samples} {teacher:.3f} vs student {student:.3f} "
                       f"(needs a margin of {settings.premise_margin:g})", holds))
    if summary.get("verification_gap") is not None:
        gap = float(summary["verification_gap"])
        checks.append((f"student checks verify: P(yes | answer) {summary['yes_on_answer']:.3f} - P(yes | wrong) "
                       f"{summary['yes_on_wrong']:.3f} = {gap:.3f} (needs {settings.verification_margin:g})",
                       gap >= settings.verification_margin))
    elif "yes_on_answer" in summary:  # the task has verdicts but the student wrote none of one kind
        checks.append(("student checks verify: no check line on the answer or on a wrong candidate", False))
    if summary.get("chance_avg") is not None:
        chance = float(summary["chance_avg"])
        checks.append((f"student Avg@{settings.eval_samples} {student:.3f} vs a listed candidate at random "
                       f"{chance:.3f} (must beat it)", student > chance))
    return [f"{text}: {'holds' if holds else 'FAILS'}" for text, holds in checks], all(h for _, h in checks)


def check_premise(base: dict[str, Any], settings: StudySettings) -> list[str]:
    """`premise_lines`, raising StudyPremiseError (with those lines) when a check fails."""
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
             split: str | None = None, n: int | None = None) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """(the `summarize` macro row plus the task's per-line measurements (StepAcc, ...), the per-problem
    scores) of n samples per problem (default `eval_samples`) of the job's in-distribution set (split None)
    or out-of-distribution set `split`, from the student prompt (view None) or a teacher view's prompt."""
    from selfdistill.study.probes import sample_accuracy

    settings = job.settings
    in_distribution, ood = settings.evaluation_sets(job.evaluation)
    problems = in_distribution if split is None else ood[split]
    builder = _prompt_builder(tokenizer, settings, view)
    summary, records = sample_accuracy(
        model, tokenizer, problems, builder, n=n or settings.eval_samples,
        max_new_tokens=settings.max_new_tokens if split is None else settings.ood_max_new_tokens,
        temperature=settings.temperature, seed=EVAL_SEED, role="student" if view is None else "teacher",
        grader=grader)
    summary = {**summary, **settings.task.trace_metrics(problems, records)}
    if hasattr(settings.task, "chance_avg"):
        summary["chance_avg"] = settings.task.chance_avg(problems)
    per_problem = settings.task.per_problem(problems, records) if hasattr(settings.task, "per_problem") else {}
    return summary, per_problem


def _entropy(model: Any, tokenizer: Any, job: RunJob, view: str | None) -> dict[str, Any]:
    from selfdistill.study.probes import token_entropy

    settings = job.settings
    builder = _prompt_builder(tokenizer, settings, view)
    problems = settings.evaluation_sets(job.evaluation)[0]
    return asdict(token_entropy(model, tokenizer, settings.task, problems, builder,
                                role="student" if view is None else "teacher"))


def _measure(model: Any, tokenizer: Any, job: RunJob, grader: Any, *, teachers: bool) -> dict[str, Any]:
    """The student's samples and token entropy on the job's in-distribution set and (under "ood") each
    out-of-distribution set, with the per-problem scores the claims are judged on ("per_problem": the
    in-distribution ones by name, each out-of-distribution set's Avg@k as "ood_<set>"); with `teachers`,
    the same in distribution under every teacher view's prompt (keys "teacher_<view>")."""
    summary, per_problem = _sampled(model, tokenizer, job, grader)
    student: dict[str, Any] = {"summary": summary, "token_entropy": _entropy(model, tokenizer, job, None)}
    ood_sets = job.settings.evaluation_sets(job.evaluation)[1]
    if ood_sets:
        student["ood"] = {}
        for split in ood_sets:
            student["ood"][split], ood_scores = _sampled(model, tokenizer, job, grader, split=split)
            per_problem[f"ood_{split}"] = ood_scores["avg"]
    student["per_problem"] = per_problem
    result = {"evaluation": job.evaluation, "student": student}
    if teachers:
        for view in job.settings.task.teacher_views(job.settings.warm_start.template):
            result[f"teacher_{view}"] = {"summary": _sampled(model, tokenizer, job, grader, view=view)[0],
                                         "token_entropy": _entropy(model, tokenizer, job, view)}
    return result


CURVE_METRICS = ("avg@n", "marker_rate", "mean_length", "step_acc")


def _curve_point(model: Any, tokenizer: Any, job: RunJob, grader: Any, step: int) -> dict[str, Any]:
    """Numbers on the job's evaluation sets during training, from `curve_samples` samples per problem:
    Avg@n, pass@n, marker rate, length and StepAcc (where the task has them), in distribution and (prefixed
    "ood_<set>_") out of it."""
    n = job.settings.curve_samples
    summary, _ = _sampled(model, tokenizer, job, grader, n=n)
    point = {"step": step, "n": n, f"pass@{n}": summary[f"pass@{n}"],
             **{name: summary[name] for name in CURVE_METRICS if summary.get(name) is not None}}
    for split in job.settings.evaluation_sets(job.evaluation)[1]:
        ood, _ = _sampled(model, tokenizer, job, grader, split=split, n=n)
        point.update({f"ood_{split}_{name}": ood[name] for name in CURVE_METRICS if ood.get(name) is not None})
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


def _job(settings: StudySettings, folder: Path, method: str, seed: int, evaluation: str,
         overrides: dict[str, Any], common: dict[str, Any], base_id: str) -> RunJob:
    name = run_name(method, seed)
    return RunJob(name=name, method=method, seed=seed, folder=str(folder / name), evaluation=evaluation,
                  overrides=overrides, key=f"{settings.run_key(method, seed, overrides, evaluation)}-{base_id}",
                  **common)


def plan_jobs(settings: StudySettings, out: Path, warm_folder: Path, train_file: Path,
              tuned: dict[str, Any] | None = None, base_id: str | None = None) -> list[RunJob]:
    """The base job, then the claim runs, seed-major (seed 0 of every method first); `tuned` (the knobs chosen
    by the tuning runs) goes to every method `tuned_overrides` gives it to. `base_id` names the base's weights
    in every key (default: the warm start folder's name, which ends in its own hash: new weights never reuse
    old results)."""
    common = {"warm_start_dir": str(warm_folder), "train_file": str(train_file), "settings": settings}
    base_id = base_id or warm_folder.name
    jobs = [RunJob(name="base", method=None, seed=EVAL_SEED, folder=str(out / "base"),
                   key=f"{settings.base_key()}-{base_id}", **common)]
    for seed in range(settings.seeds):
        for method in settings.methods:
            jobs.append(_job(settings, out / "runs", method, seed, "test", tuned_overrides(method, tuned), common,
                             base_id))
    return jobs


def plan_tuning_jobs(settings: StudySettings, out: Path, warm_folder: Path, train_file: Path,
                     base_id: str | None = None) -> list[RunJob]:
    """The tuning runs: `settings.tuning` on every tuning seed, evaluated on the validation slice."""
    from selfdistill.study.preregistration import TUNING_SEEDS

    common = {"warm_start_dir": str(warm_folder), "train_file": str(train_file), "settings": settings}
    return [_job(settings, out / "tuning", method, seed, "validation", {}, common, base_id or warm_folder.name)
            for seed in TUNING_SEEDS for method in settings.tuning]


def tuned_overrides(method: str, tuned: dict[str, Any] | None) -> dict[str, Any]:
    """The tuned knobs a method takes: all of them for a DASD-family method (objective "dasd") that does not
    set one of them itself, none for any other."""
    objective = method_parts(method)[0]
    if not tuned or objective["name"] != "dasd" or any(knob in objective for knob in tuned):
        return {}
    return dict(tuned)


def choose_from_tuning(settings: StudySettings, jobs: list[RunJob]) -> dict[str, Any]:
    """The tuning record: each tuning method's validation Avg@n per seed, the method `choose_tuned` picks and
    the knobs it sets (empty without tuning runs: the library defaults stay)."""
    from selfdistill.objectives import OBJECTIVES
    from selfdistill.study.preregistration import TUNED_KNOBS, choose_tuned

    if not jobs:
        return {"methods": {}, "chosen": None, "tuned": {}}
    scores: dict[str, list[float]] = {}
    for job in jobs:
        result = read_finished(Path(job.folder), job.key)
        scores.setdefault(job.method, []).append(float(result["student"]["summary"]["avg@n"]))
    values = {}
    for method in scores:
        objective = method_parts(method)[0]
        defaults = OBJECTIVES[objective["name"]].knob_defaults()
        values[method] = {knob: objective.get(knob, defaults[knob]) for knob in TUNED_KNOBS}
    chosen = choose_tuned(scores, values)
    return {"methods": {m: {"validation_avg": v, **values[m]} for m, v in scores.items()},
            "chosen": chosen, "tuned": dict(values[chosen])}


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
    splits = settings.task.splits()  # once: on a benchmark it reads the data files
    if settings.model is not None:  # a given model is the base of every run: no warm start
        from selfdistill.study.model_base import prepare_model_base

        warm_folder, base_model, base_id = prepare_model_base(settings)
        _write_train_file(list(splits.validation), out / base_model["validation_file"])
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

    train_file = out / "problems" / "rl_train.jsonl"
    _write_train_file(splits.rl_train, train_file)
    base_job, *_ = plan_jobs(settings, out, warm_folder, train_file, base_id=base_id)
    tuning_jobs = plan_tuning_jobs(settings, out, warm_folder, train_file, base_id=base_id)
    todo_tuning = [job for job in tuning_jobs if read_finished(Path(job.folder), job.key) is None]
    console.print(f"study: base evaluation, {len(tuning_jobs)} tuning runs ({len(todo_tuning)} to do), then "
                  f"{len(settings.methods) * settings.seeds} claim runs, with {workers} worker process(es) -> {out}")

    study_record = {"settings": settings.to_json(), "warm_start": warm_record, "warm_start_dir": str(warm_folder),
                    "warm_start_source": warm_source, "warm_start_sha256": warm_digest, "workers": workers,
                    "preregistration": preregistration_record(),
                    **({"base_model": base_model} if base_model is not None else {})}
    threads = max(1, (os.cpu_count() or 1) // workers)
    with Progress(*columns, console=console, disable=not progress) as bar, ProcessPoolExecutor(
        max_workers=workers, mp_context=get_context("spawn"), initializer=_init_worker, initargs=(threads,)
    ) as pool:
        total = 1 + len(tuning_jobs) + len(settings.methods) * settings.seeds
        overall = bar.add_task("study", total=total, status="")
        base = read_finished(Path(base_job.folder), base_job.key)
        if base is None:  # the premise is checked on the base before any run starts
            _run_jobs(pool, [base_job], bar, overall)
            base = read_finished(Path(base_job.folder), base_job.key)
        else:
            bar.advance(overall)
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
        # written now and again at the end: an interrupted study can still be reported (`build_report`)
        write_json_atomic(out / STUDY_FILE, {**study_record, "wall_seconds": None})
        bar.advance(overall, len(tuning_jobs) - len(todo_tuning))
        _run_jobs(pool, todo_tuning, bar, overall)
        tuning = choose_from_tuning(settings, tuning_jobs)
        write_json_atomic(out / TUNING_FILE, tuning)
        if tuning["chosen"] is not None:
            console.print(f"tuning: {tuning['chosen']} has the best validation Avg@{settings.eval_samples}; "
                          f"the claim runs use {tuning['tuned']}")
        claim_jobs = plan_jobs(settings, out, warm_folder, train_file, tuning["tuned"], base_id)[1:]
        todo = [job for job in claim_jobs if read_finished(Path(job.folder), job.key) is None]
        bar.advance(overall, len(claim_jobs) - len(todo))
        _run_jobs(pool, todo, bar, overall)
    wall_seconds = time.perf_counter() - started
    write_json_atomic(out / STUDY_FILE, {**study_record, "wall_seconds": round(wall_seconds, 1)})
    report = build_report(out)
    with report.open("a", encoding="utf-8") as file:
        file.write(f"\nEnvironment: {environment}\n")
    console.print(f"report: {report}  (wall time {wall_seconds / 60:.1f} min)\nenvironment: {environment}")
    return report


def preregistration_record() -> dict[str, Any]:
    """Which pre-registration the runs are made under: the SHA-256 of `preregistration.py`, and, in a git
    checkout, the last commit that changed it and whether the file has uncommitted changes."""
    import hashlib
    import subprocess

    from selfdistill.study import preregistration

    path = Path(preregistration.__file__)
    record: dict[str, Any] = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "commit": None}
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", *args], cwd=path.parent, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()

        record["commit"] = git("log", "-1", "--format=%H", "--", path.name) or None
        record["modified"] = bool(git("status", "--porcelain", "--", path.name))
    except (OSError, subprocess.SubprocessError):
        pass
    return record


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

