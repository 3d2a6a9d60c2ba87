"""Sample, grade and summarize: the evaluation loop behind ``selfdistill eval``.

`evaluate_problems` draws ``n`` completions per problem from the student prompt, grades each against
the gold answer and returns one `SampleRecord` per completion. Every problem is sampled with its own
seed, derived from ``(seed, source, problem id)``, so a problem's samples do not depend on which other
problems are evaluated, in which order, or whether the run was interrupted and resumed. `summarize`
turns records into the per-benchmark and macro table (Avg@n, pass@k, maj@n and reasoning health).
`run_eval` drives a whole run into a folder whose files (settings, samples, summary, resuming)
`selfdistill.evaluation.store` reads and writes.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections.abc import Callable, Container, Sequence
from pathlib import Path
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from selfdistill.data import Problem, load_benchmark
from selfdistill.evaluation.metrics import (
    avg_at_k,
    epistemic_density,
    epistemic_markers,
    macro_average,
    maj_at_k,
    pass_at_k_table,
    response_length,
    truncation_rate,
)
from selfdistill.evaluation.store import (
    SAMPLES_FILE,
    EvalSettings,
    SampleRecord,
    append_records,
    done_records,
    merge_records,
    prepare_run_folder,
    write_summary,
)
from selfdistill.grading import Grader, extract_answer, normalize_answer
from selfdistill.progress import Progress
from selfdistill.prompts import PromptBuilder
from selfdistill.provenance import record_environment, summary_line
from selfdistill.rollout import RolloutBackend, Rollouts, make_backend

log = logging.getLogger(__name__)

# Rows per generate call when batch_size is None: transformers on a CPU or one GPU, and vLLM (which
# schedules its own batches).
DEFAULT_HF_ROWS = 32
DEFAULT_MULTI_PROMPT_ROWS = 512


def problem_seed(seed: int, source: str, problem_id: str) -> int:
    """The sampling seed of one problem: a stable hash of (seed, source, problem id), in [0, 2**31)."""
    digest = hashlib.sha256(f"{seed}\x00{source}\x00{problem_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


class _RateColumn(ProgressColumn):
    """Samples per second, averaged by rich over the recent updates."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-- samples/s" if speed is None else f"{speed:.2f} samples/s", style="cyan")


def _make_progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]eval"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )


def _rows_per_call(backend: str | RolloutBackend, batch_size: int | None) -> int:
    return batch_size or (DEFAULT_HF_ROWS if backend == "hf" else DEFAULT_MULTI_PROMPT_ROWS)


def _resolve_backend(backend: str | RolloutBackend, model: Any, tokenizer: Any, rows_per_call: int):
    if not isinstance(backend, str):
        return backend
    if backend == "hf":
        return make_backend("hf", model, tokenizer, batch_size=rows_per_call, return_entropy=True)
    return make_backend(backend, model, tokenizer)


def _mean_entropy(rollouts: Rollouts, row: int) -> float | None:
    if rollouts.token_entropy is None:
        return None
    length = int(rollouts.lengths[row])
    if length == 0:
        return None
    return float(rollouts.token_entropy[row, :length].sum()) / length


def evaluate_problems(
    model: Any,
    tokenizer: Any,
    problems: Sequence[Problem],
    *,
    n: int,
    temperature: float,
    max_new_tokens: int,
    top_p: float = 1.0,
    seed: int = 0,
    prompt_builder: PromptBuilder | None = None,
    backend: str | RolloutBackend = "hf",
    batch_size: int | None = None,
    grader: Grader | None = None,
    progress: bool = True,
    on_records: Callable[[list[SampleRecord]], None] | None = None,
    skip: Container[tuple[str, str, int]] = (),
) -> list[SampleRecord]:
    """Sample ``n`` completions per problem, grade them, and return the new records.

    Args:
        model, tokenizer: the policy; for ``backend="vllm"``, ``model`` is a model folder (or a
            ``vllm.LLM``) instead of a transformers model.
        problems: what to evaluate; (source, id) pairs must be unique.
        n, temperature, top_p, max_new_tokens: sampling (top-k is off; temperature 0 is greedy).
        seed: the run's seed; each problem samples with ``problem_seed(seed, source, id)``.
        prompt_builder: renders the student prompt (default: ``PromptBuilder(tokenizer)`` with the
            "opsd_mild" template; only the student side is used).
        backend: "hf", "vllm", or a backend object with the `RolloutBackend` ``generate``. A backend
            with ``per_prompt_seeds = True`` ("hf" and "vllm") gets many problems per call, each with
            its own seed; any other gets one problem per call.
        batch_size: the most rows (problems x n) per ``generate`` call; None: 32 for "hf", 512 for
            "vllm". The samples do not depend on it.
        grader: the grading pool (None: one is created and closed here).
        progress: show a rich progress bar with samples/s.
        on_records: called with the records of each finished generation call, in order, so a caller
            can append them to disk as they come.
        skip: (source, problem_id, sample_index) triples already done; they are not returned again.
            A problem with some samples done is generated again in full (same seed, same samples) and
            only its missing samples are kept.

    Returns the records of this call (not the skipped ones), problem by problem in the given order,
    samples by index.
    """
    if n < 1 or max_new_tokens < 1:
        raise ValueError(f"need n >= 1 and max_new_tokens >= 1, got n={n}, max_new_tokens={max_new_tokens}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
    seen: set[tuple[str, str]] = set()
    for problem in problems:
        if (problem.source, problem.id) in seen:
            raise ValueError(f"problem {problem.id!r} of {problem.source!r} appears twice")
        seen.add((problem.source, problem.id))

    todo: list[tuple[Problem, list[int]]] = []
    for problem in problems:
        missing = [j for j in range(n) if (problem.source, problem.id, j) not in skip]
        if missing:
            todo.append((problem, missing))
    if not todo:
        return []

    builder = prompt_builder if prompt_builder is not None else PromptBuilder(tokenizer, template="opsd_mild")
    rows_per_call = _rows_per_call(backend, batch_size)
    generator = _resolve_backend(backend, model, tokenizer, rows_per_call)
    # A backend that seeds each prompt itself gets many problems per call, any other one per call.
    problems_per_call = max(1, rows_per_call // n) if getattr(generator, "per_prompt_seeds", False) else 1
    own_grader = grader is None
    grader = Grader() if grader is None else grader

    records: list[SampleRecord] = []
    total = sum(len(missing) for _, missing in todo)
    try:
        with _make_progress(progress) as bar:
            task = bar.add_task("eval", total=total)
            for start in range(0, len(todo), problems_per_call):
                chunk = todo[start : start + problems_per_call]
                new = _sample_and_grade(
                    generator, builder, grader, chunk, n=n, temperature=temperature, top_p=top_p,
                    max_new_tokens=max_new_tokens, seed=seed,
                )
                records.extend(new)
                if on_records is not None:
                    on_records(new)
                bar.update(task, advance=len(new))
    finally:
        if own_grader:
            grader.close()
    return records


def _sample_and_grade(
    generator: Any,
    builder: PromptBuilder,
    grader: Grader,
    chunk: list[tuple[Problem, list[int]]],
    *,
    n: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int,
) -> list[SampleRecord]:
    """Generate all n samples of each problem in `chunk` in one backend call, grade the missing ones."""
    prompt_ids = [builder.student_ids(problem) for problem, _ in chunk]
    seeds = [problem_seed(seed, problem.source, problem.id) for problem, _ in chunk]
    rollouts = generator.generate(
        prompt_ids,
        num_samples=n,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        seed=seeds if len(seeds) > 1 else seeds[0],
    )
    wanted: list[tuple[Problem, int, int]] = []  # (problem, sample index, row of rollouts)
    for position, (problem, missing) in enumerate(chunk):
        wanted.extend((problem, j, position * n + j) for j in missing)  # rows are prompt-major
    verdicts = grader.grade_detailed([rollouts.texts[row] for _, _, row in wanted],
                                     [problem.answer for problem, _, _ in wanted])
    return [
        SampleRecord(
            source=problem.source,
            problem_id=problem.id,
            sample_index=j,
            completion=rollouts.texts[row],
            extracted=extract_answer(rollouts.texts[row]),
            correct=float(verdict.score),
            num_tokens=int(rollouts.lengths[row]),
            truncated=bool(rollouts.truncated[row]),
            mean_entropy=_mean_entropy(rollouts, row),
        )
        for (problem, j, row), verdict in zip(wanted, verdicts, strict=True)
    ]


# --------------------------------------------------------------------------------------------------
# The summary table


def default_ks(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself when it is not a power of two."""
    ks = [1 << i for i in range(n.bit_length()) if (1 << i) <= n]
    return ks if ks[-1] == n else [*ks, n]


def _summarize_source(records: Sequence[SampleRecord], ks: Sequence[int] | None) -> dict[str, Any]:
    by_problem: dict[str, list[SampleRecord]] = {}
    for record in records:
        by_problem.setdefault(record.problem_id, []).append(record)
    samples = [sorted(group, key=lambda r: r.sample_index) for group in by_problem.values()]
    for group in samples:
        indices = [r.sample_index for r in group]
        if len(set(indices)) != len(indices):
            raise ValueError(f"problem {group[0].problem_id!r} of {group[0].source!r} has duplicate samples")
    sizes = {len(group) for group in samples}
    if len(sizes) != 1:
        raise ValueError(
            f"{records[0].source!r}: problems have different numbers of samples {sorted(sizes)}; "
            "finish the run (or resume it) before summarizing"
        )
    n = sizes.pop()
    chosen = default_ks(n) if ks is None else sorted({int(k) for k in ks if 1 <= int(k) <= n})
    correct = [[r.correct for r in group] for group in samples]
    answers = [[r.extracted for r in group] for group in samples]
    flat = [r for group in samples for r in group]
    entropies = [r.mean_entropy for r in flat if r.mean_entropy is not None]
    pass_table = pass_at_k_table([round(sum(c)) for c in correct], n, chosen)
    row: dict[str, Any] = {"problems": len(samples), "n": n, "avg@n": avg_at_k(correct)}
    row.update({f"pass@{k}": value for k, value in pass_table.items()})
    row["maj@n"] = maj_at_k(answers, correct, key=normalize_answer)
    row["mean_length"] = response_length([r.num_tokens for r in flat])["mean"]
    row["truncation_rate"] = truncation_rate([r.truncated for r in flat])
    row["epistemic_per_1k"] = sum(epistemic_density(r.completion, r.num_tokens) for r in flat) / len(flat)
    row["epistemic_per_response"] = sum(epistemic_markers(r.completion) for r in flat) / len(flat)
    row["mean_entropy"] = sum(entropies) / len(entropies) if len(entropies) == len(flat) else None
    return row


def summarize(records: Sequence[SampleRecord], *, ks: Sequence[int] | None = None) -> dict[str, Any]:
    """The evaluation table from graded records.

    Returns ``{"benchmarks": {source: row}, "macro": row}``, sources in order of first appearance.
    A row holds: ``problems``, ``n`` (samples per problem; every problem of a source must have the
    same number), ``avg@n``, ``pass@k`` for each k (default 1, 2, 4, ..., n; unbiased estimator),
    ``maj@n`` (vote on `normalize_answer` forms), ``mean_length`` (tokens, EOS included),
    ``truncation_rate``, ``epistemic_per_1k`` (mean over responses of E(y) markers per 1,000 tokens),
    ``epistemic_per_response`` and ``mean_entropy`` (mean over responses of their mean token
    entropy; None unless every response has one). The macro row is the unweighted mean over
    benchmarks of each metric that every benchmark has (pass@k for the k's they share); its
    ``problems`` is the total and its ``n`` the smallest n.
    """
    if not records:
        raise ValueError("summarize needs at least one record")
    by_source: dict[str, list[SampleRecord]] = {}
    for record in records:
        by_source.setdefault(record.source, []).append(record)
    rows = {source: _summarize_source(group, ks) for source, group in by_source.items()}
    macro: dict[str, Any] = {
        "problems": sum(row["problems"] for row in rows.values()),
        "n": min(row["n"] for row in rows.values()),
    }
    metric_names = [name for name in next(iter(rows.values())) if name not in ("problems", "n")]
    for name in metric_names:
        values = {source: row.get(name) for source, row in rows.items()}
        if all(isinstance(value, (int, float)) and math.isfinite(value) for value in values.values()):
            macro[name] = macro_average(values)
        elif name == "mean_entropy":
            macro[name] = None
    return {"benchmarks": rows, "macro": macro}


# --------------------------------------------------------------------------------------------------
# A run: load the problems and the policy, resume the folder (`store`), sample what is missing, summarize


def load_eval_problems(settings: EvalSettings, data_root: str | os.PathLike[str] | None) -> list[Problem]:
    """The problems of the settings' benchmarks, the first `limit` of each."""
    problems: list[Problem] = []
    for name in settings.benchmarks:
        loaded = load_benchmark(name, data_root, split=settings.split)
        problems.extend(loaded if settings.limit is None else loaded[: settings.limit])
    return problems


def _adapter_folder(adapter: str) -> Path:
    folder = Path(adapter).expanduser()
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a peft adapter folder (no adapter_config.json)")
    return folder


def _check_model_paths(settings: EvalSettings) -> None:
    """Raise FileNotFoundError for a model or adapter folder that does not exist."""
    from selfdistill.models import resolve_model

    resolve_model(settings.model)  # builds nothing: "tiny" and "smollm2" pass as they are
    if settings.adapter is not None:
        _adapter_folder(settings.adapter)


def load_policy(settings: EvalSettings, device: str = "auto") -> tuple[Any, Any]:
    """(model, tokenizer) for the settings' backend.

    "hf": the transformers model in the settings' dtype on `device` ("auto": CUDA when available),
    with the LoRA adapter merged into it. "vllm": the model folder (the vLLM backend loads it) and its
    tokenizer.
    """
    import torch

    if settings.backend == "vllm":
        from transformers import AutoTokenizer

        from selfdistill.models import model_folder

        folder = model_folder(settings.model)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return str(folder), tokenizer

    from selfdistill.models import load_model

    model, tokenizer = load_model(settings.model, dtype=getattr(torch, settings.dtype))
    if settings.adapter is not None:
        from peft import PeftModel

        adapter = _adapter_folder(settings.adapter)
        # Merged: generation then runs at the base model's speed; same function up to rounding.
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), tokenizer


def run_eval(
    settings: EvalSettings,
    out_dir: str | os.PathLike[str],
    *,
    data_root: str | os.PathLike[str] | None = None,
    device: str = "auto",
    progress: bool = True,
    grader: Grader | None = None,
) -> dict[str, Any]:
    """Evaluate into a run folder, resuming what is already there; returns the summary.json content.

    The folder gets settings.json (checked on a re-run: other settings raise SettingsMismatchError),
    samples.jsonl (one record per line, appended as generation calls finish, so a killed run loses at
    most the call in flight) and summary.json (``{"settings", "benchmarks", "macro", "timing"}``).
    """
    _check_model_paths(settings)  # before anything is written into the run folder
    out = Path(out_dir)
    prepare_run_folder(out, settings)
    samples_path = out / SAMPLES_FILE
    environment = record_environment(out)  # environment.json: versions, commit, hardware

    problems = load_eval_problems(settings, data_root)
    done = done_records(samples_path, problems, settings.n)
    done_keys = {r.key for r in done}
    remaining = len(problems) * settings.n - len(done_keys)
    if done_keys:
        log.warning("%s: resuming, %d samples already done, %d to go", out, len(done_keys), remaining)

    started = time.perf_counter()
    new: list[SampleRecord] = []
    if remaining > 0:
        model, tokenizer = load_policy(settings, device)
        builder = PromptBuilder(tokenizer, template="opsd_mild", max_prompt_tokens=settings.max_prompt_tokens)
        backend: str | RolloutBackend = settings.backend
        if settings.backend == "vllm":
            backend = make_backend(
                "vllm", model, tokenizer, adapter=settings.adapter, seed=settings.seed, dtype=settings.dtype
            )
        new = evaluate_problems(
            model, tokenizer, problems, n=settings.n, temperature=settings.temperature,
            max_new_tokens=settings.max_new_tokens, top_p=settings.top_p, seed=settings.seed,
            prompt_builder=builder, backend=backend, batch_size=settings.batch_size, grader=grader,
            progress=progress, on_records=lambda records: append_records(samples_path, records), skip=done_keys,
        )
    seconds = time.perf_counter() - started

    summary = {
        "settings": settings.to_json(),
        **summarize(merge_records(done, new, problems)),
        "environment": summary_line(environment),
        "timing": {
            "seconds": seconds,
            "new_samples": len(new),
            "samples_per_second": len(new) / seconds if new and seconds > 0 else None,
            "resumed_samples": len(done_keys),
        },
    }
    write_summary(out, summary)
    return summary


__all__ = [
    "default_ks",
    "evaluate_problems",
    "load_eval_problems",
    "load_policy",
    "problem_seed",
    "run_eval",
    "summarize",
]
