"""The study's report: read a study folder, write report.md and PNG plots into it (`build_report`).

Sections: the warm start (the base model under every prompt, and the premise check), held-out results in
and (on the search task) out of distribution, min–max over seeds, paired differences seed by seed, the
claims judged from them (`claims`), DASD's sweep when it ran, the plots (`plots`), budget and timing.
Loading and aggregation live in `results`; the main tables and plots show the main methods only.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from selfdistill.study.claims import Claim, claims_section, judge
from selfdistill.study.plots import write_plots
from selfdistill.study.results import (
    FINAL_WINDOW,
    Spread,
    StudyResults,
    load_results,
    markdown_table,
    metric_label,
    paired_difference,
    verdict,
)
from selfdistill.study.settings import METHODS

REPORT_FILE = "report.md"
TASK_TITLES = {"search": "search with verified checks", "chains": "operation chains"}
# Pairs (a, b) reported as paired differences a − b when both methods were run.
COMPARISONS = (("opsd", "grpo"), ("opsd_weak", "grpo"), ("opsd", "opsd_weak"), ("dasd", "grpo"), ("dasd", "opsd"),
               ("dasd", "conform"), ("dasd", "novelty"), ("conform", "grpo"), ("novelty", "grpo"),
               ("egrsd", "grpo"), ("rlsd", "grpo"), ("cl_egrsd", "grpo"), ("dasd_divergence", "grpo"),
               ("opsd_clip", "grpo"))
PROMPT_LABELS = {"student": "student (problem only)",
                 "teacher_rich": "teacher, rich view (problem + worked solution)",
                 "teacher_weak": "teacher, weak view (problem + answer only)"}
KIND_NOTES = {"fork": "the candidate tried next among untried ones", "marker": "epistemic markers",
              "free": "free-choice operands", "forced": "every other response token"}

# A table column: (header, scalars key, digits).
Column = tuple[str, str, int]


def _cell(spreads: dict[str, Spread], metric: str, digits: int) -> str:
    return spreads[metric].text(digits) if metric in spreads else "–"


def _base_spreads(results: StudyResults, prompt: str = "student") -> dict[str, Spread]:
    return {name: Spread([value]) for name, value in results.base_scalars(prompt).items()}


def _present(results: StudyResults, columns: Sequence[Column]) -> list[Column]:
    """The columns whose metric the task measures (the base student has it)."""
    base = results.base_scalars()
    return [column for column in columns if column[1] in base]


def _pass_ks(n: int) -> list[int]:
    return [k for k in (2, 4, 8) if k < n] + [n]


# ----------------------------------------------------------------------------------------------
# warm start


def _warm_start_section(results: StudyResults) -> str:
    record, study = results.study["warm_start"], results.study
    settings, task = record["settings"], study["settings"]["task"]
    n = results.n
    columns = _present(results, [(f"Avg@{n}", "avg", 3), ("pass@1", "pass@1", 3), (f"pass@{n}", f"pass@{n}", 3),
                                 ("E(y)/response", "epistemic_per_response", 3), ("StepAcc", "step_acc", 3),
                                 *[(f"H {kind}", f"H_{kind}", 3) for kind in results.token_kinds],
                                 ("length (tokens)", "length", 1)])
    rows = [[PROMPT_LABELS.get(prompt, prompt)] + [_cell(_base_spreads(results, prompt), m, d) for _, m, d in columns]
            for prompt in results.prompts]
    tokens = results.base["student"].get("token_entropy", {}).get("tokens", {})
    kinds = ", ".join(f"{kind} ({KIND_NOTES.get(kind, kind)}; {tokens.get(kind, 0)} tokens)"
                      for kind in results.token_kinds)
    problems = results.base["student"]["summary"].get("problems", task["n_eval"])
    premise_lines = study.get("premise", [])
    return "\n".join([
        "## Warm start",
        "",
        f"Tiny Qwen2 model, {record['parameters']:,} parameters (hidden {settings['hidden_size']}, "
        f"{settings['num_layers']} layers), from random weights. Stage 1: {settings['steps']} steps × "
        f"{settings['batch_size']} worked solutions of {task['n_sft']} problems, "
        f"{settings['teacher_fraction']:.0%} of them shown with a teacher view in the prompt, loss on the "
        f"response tokens only, peak lr {settings['lr']:g} with cosine decay (final loss "
        f"{_number(record.get('stage1_final_loss'))}). Stage 2: {settings['drill_steps']} more such steps at lr "
        f"{settings['drill_lr']:g}, each plus an arithmetic drill of {settings['drill_facts']} single operations "
        f"in the solution line format (final loss, task + drill, {_number(record.get('final_loss'))}). "
        f"**{record['train_seconds']:.0f} s** of training, once. {_warm_start_source(study)}",
        "",
        f"The base model in distribution ({problems} held-out problems, n = {n} samples each, temperature "
        f"{study['settings']['temperature']}) under each prompt. H is the mean next-token entropy (nats) along "
        f"the worked solutions under teacher forcing, by token kind: {kinds}.",
        "",
        markdown_table(["prompt", *[header for header, _, _ in columns]], rows),
        "",
        "Premise (each teacher view the methods use must beat the student prompt by "
        f"{study['settings']['premise_margin']:g} Avg@{n}):",
        "",
        *[f"- {line}" for line in premise_lines],
    ])


def _base_section(results: StudyResults) -> str:
    """The warm start's section, or the base model's where a given model replaced the warm start."""
    if "base_model" not in results.study:
        return _warm_start_section(results)
    from selfdistill.study.model_base import base_model_section

    n = results.n
    columns = _present(results, [(f"Avg@{n}", "avg", 3), ("pass@1", "pass@1", 3), (f"pass@{n}", f"pass@{n}", 3),
                                 ("E(y)/response", "epistemic_per_response", 3),
                                 *[(f"H {kind}", f"H_{kind}", 3) for kind in results.token_kinds],
                                 ("length (tokens)", "length", 1)])
    rows = [[PROMPT_LABELS.get(prompt, prompt)] + [_cell(_base_spreads(results, prompt), m, d) for _, m, d in columns]
            for prompt in results.prompts]
    return base_model_section(results.study, markdown_table(["prompt", *[header for header, _, _ in columns]], rows))


def _number(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _warm_start_source(study: dict[str, Any]) -> str:
    source, digest = study.get("warm_start_source"), study.get("warm_start_sha256")
    if source == "shipped":
        return (f"This study used the warm start shipped with the package (model.safetensors SHA-256 "
                f"`{digest}`), not a fresh training.")
    if source == "trained":
        return (f"This study trained its own warm start (model.safetensors SHA-256 `{digest}`); another machine's "
                "build can differ (docs/study.md).")
    return "The folder is cached."


# ----------------------------------------------------------------------------------------------
# results tables


def _method_table(results: StudyResults, columns: Sequence[Column], *, training: bool) -> str:
    """Base row, then a row per main method (with its seed count); `training` adds the training-log columns."""
    base_row = ["base (warm start)", *[_cell(_base_spreads(results), m, d) for _, m, d in columns]]
    header = ["method", *[h for h, _, _ in columns]]
    if training:
        header += ["train H first → final", "train reward final"]
        base_row += ["–", "–"]
    rows = [base_row]
    for method in results.main_methods:
        s = results.spreads(method)
        row = [f"{method} ({len(results.runs[method])})", *[_cell(s, m, d) for _, m, d in columns]]
        if training:
            first = f"{s['train_entropy_first'].mean:.3f}" if "train_entropy_first" in s else "–"
            row += [f"{first} → {_cell(s, 'train_entropy_final', 3)}", _cell(s, "train_reward_final", 3)]
        rows.append(row)
    return markdown_table(header, rows)


def _in_distribution(results: StudyResults) -> str:
    n = results.n
    columns = _present(results, [(f"Avg@{n}", "avg", 3), *[(f"pass@{k}", f"pass@{k}", 3) for k in _pass_ks(n)],
                                 ("E(y)/resp", "epistemic_per_response", 3), ("E(y)/1k", "epistemic_per_1k", 2),
                                 ("StepAcc", "step_acc", 3), ("length", "length", 1),
                                 *[(f"H {kind}", f"H_{kind}", 3) for kind in results.token_kinds]])
    return _method_table(results, columns, training=True)


def _out_of_distribution(results: StudyResults) -> str:
    n = results.n
    columns = _present(results, [(f"Avg@{n}", "ood_avg", 3), (f"pass@{n}", f"ood_pass@{n}", 3),
                                 ("E(y)/resp", "ood_epistemic_per_response", 3), ("StepAcc", "ood_step_acc", 3),
                                 ("length", "ood_length", 1)])
    return _method_table(results, columns, training=False)


def _range_table(results: StudyResults) -> str:
    n = results.n
    metrics = [m for m in ("avg", f"pass@{n}", "ood_avg", "epistemic_per_response", "step_acc",
                           f"H_{results.choice_kind}", "train_entropy_final")
               if m in results.base_scalars() or m.startswith("train_")]
    rows = []
    for method in results.main_methods:
        s = results.spreads(method)
        rows.append([method, *[s[m].range_text() if m in s else "–" for m in metrics]])
    return markdown_table(["method", *[f"{metric_label(m, n)} min–max" for m in metrics]], rows)


def _comparison_table(results: StudyResults) -> str:
    n = results.n
    metrics = ("avg", "ood_avg", "epistemic_per_response", "step_acc", "length", f"H_{results.choice_kind}",
               "train_entropy_final")
    rows = []
    for a, b in COMPARISONS:
        if a not in results.runs or b not in results.runs:
            continue
        for metric in metrics:
            diff = paired_difference(results.runs[a], results.runs[b], metric)
            if diff is not None:
                rows.append([f"{a} − {b}", metric_label(metric, n), f"{diff.mean:+.3f}", f"{diff.std:.3f}",
                             diff.per_seed_text(), verdict(diff)])
    if not rows:
        return "_No method pairs to compare._"
    return markdown_table(["pair", "metric", "mean diff", "std", "per seed", "reading"], rows)


# ----------------------------------------------------------------------------------------------
# DASD's sweep


def _changes(method: str) -> str:
    """What a sweep variant changes from `dasd`, read from its METHODS entry."""
    entry = {key: value for key, value in METHODS[method].items() if key != "name"}
    entry.update(entry.pop("optim", {}))
    return ", ".join(f"{key} = {value}" for key, value in entry.items()) or "reference"


def _dasd_defaults() -> str:
    """The library's DASD knobs that the sweep varies, as the code now has them."""
    from selfdistill.objectives import OBJECTIVES

    defaults = OBJECTIVES["dasd"].knob_defaults()
    return ", ".join(f"{knob} = {defaults[knob]}" for knob in ("beta", "quantile", "push_signal"))


def _sweep_section(results: StudyResults) -> str:
    """DASD and its sweep variants side by side; the variant is chosen in distribution, judged out of it."""
    variants = results.sweep_methods
    n = results.n
    columns = _present(results, [(f"ID Avg@{n}", "avg", 3), (f"OOD Avg@{n}", "ood_avg", 3),
                                 ("E(y)/resp", "epistemic_per_response", 3), ("StepAcc", "step_acc", 3)])
    columns.append(("clip fraction (mean over steps)", "train_clip_fraction", 3))
    candidates = [m for m in ("dasd",) if m in results.runs] + variants
    rows = []
    for method in candidates:
        s = results.spreads(method)
        rows.append([f"{method} ({len(results.runs[method])})", _changes(method),
                     *[_cell(s, m, d) for _, m, d in columns]])
    chosen = max(candidates, key=lambda m: results.spreads(m)["avg"].mean)
    lines = ["## DASD's sweep", "",
             f"Each variant changes one of DASD's open choices from the reference, the library's `dasd` "
             f"({_dasd_defaults()}, 1 PPO epoch); they are left out of the tables and plots above.", "",
             markdown_table(["method", "changes", *[h for h, _, _ in columns]], rows), "",
             f"Selected on the in-distribution split: **{chosen}** (the highest mean ID Avg@{n}, "
             f"{results.spreads(chosen)['avg'].text()}). No choice is selected on the out-of-distribution split."]
    if chosen == "dasd":
        lines += ["", "The reference itself is selected: no variant beats the library's defaults in distribution."]
        return "\n".join(lines)
    if not results.has_ood:
        lines += ["", "This task has no out-of-distribution split, so the selection is not judged out of it."]
        return "\n".join(lines)
    result = judge(Claim("S", f"{chosen} above dasd out of distribution", chosen, "dasd", "ood_avg", +1), results)
    numbers = "" if result.diff is None else f" {result.diff.diff_text()} (per seed {result.diff.per_seed_text()});"
    lines += ["", f"Judged out of distribution: {chosen} − dasd OOD Avg@{n} ={numbers} the claim that it beats "
              f"dasd out of distribution: **{result.verdict}** ({result.note})."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# the rest


def _timing_section(results: StudyResults) -> str:
    settings = results.study["settings"]
    runs = [run.evaluation for method_runs in results.runs.values() for run in method_runs]
    ood = f" ({settings['ood_max_new_tokens']} out of distribution)" if results.has_ood else ""
    every = settings.get("eval_every", 0)
    curve = f"Held-out curves: every {every} steps during training." if every else "No held-out curve during training."
    return "\n".join([
        "## Budget and timing",
        "",
        f"Every run: {settings['steps']} steps × {settings['prompts_per_step']} prompts × {settings['group_size']} "
        f"samples = {settings['steps'] * settings['prompts_per_step'] * settings['group_size']} rollouts, AdamW "
        f"lr {settings['lr']:g} (constant), full fine-tuning, frozen teacher (the warm start), temperature "
        f"{settings['temperature']}, at most {settings['max_new_tokens']} new tokens per rollout and held-out "
        f"sample{ood}. {curve}",
        "",
        f"Wall time of this invocation: **{results.study['wall_seconds'] / 60:.1f} min** with "
        f"{results.study['workers']} worker process(es) (runs reused from an earlier invocation cost nothing here). "
        f"Per run on average: training {statistics.fmean(r['train_seconds'] for r in runs):.0f} s, evaluations "
        f"during training {statistics.fmean(r.get('curve_eval_seconds', 0.0) for r in runs):.0f} s, final "
        f"evaluation {statistics.fmean(r['eval_seconds'] for r in runs):.0f} s.",
    ])


def _results_sections(results: StudyResults) -> list[str]:
    n = results.n
    seeds = results.seed_count
    spread_note = ("mean ± sample standard deviation over seeds (ddof = 1)" if seeds > 1
                   else "a single seed: no spread")
    sections = [
        "## In distribution",
        "",
        f"Cells are {spread_note}; the number after each method is its count of seeds. Avg@{n} is the mean "
        f"accuracy of the {n} samples per problem; pass@k is the unbiased estimator. E(y): epistemic markers per "
        "response and per 1,000 response tokens. "
        + ("StepAcc: the share of check-line steps that are right. " if results.task == "search" else "")
        + "H <kind>: teacher-forced entropy along the held-out worked solutions. Train H: mean rollout entropy at "
        f"step 1 and over the last {FINAL_WINDOW} steps; train reward: last {FINAL_WINDOW} steps.",
        "",
        _in_distribution(results),
    ]
    if results.has_ood:
        sections += ["", "## Out of distribution", "",
                     "Harder problems than any seen in training (more candidates, longer check lines), with a "
                     "longer length limit; same cells as above.", "", _out_of_distribution(results)]
    return sections + ["", "Min–max over seeds:", "", _range_table(results)]


def build_report(folder: str | Path) -> Path:
    """Write report.md and the plots into the study folder; returns the report's path."""
    results = load_results(folder)
    if not results.main_methods:
        raise ValueError(f"{results.folder}: no finished runs of a main method to report (DASD's sweep variants "
                         "are reported against dasd and the others)")
    plots = write_plots(results, results.folder)
    title = TASK_TITLES.get(results.task, results.task)
    text = "\n".join([
        f"# Method study on {title} ({results.task} task): {', '.join(results.main_methods)}",
        "",
        _base_section(results),
        "",
        *_results_sections(results),
        "",
        "## Paired differences (same seed: same data order and rollout seeds)",
        "",
        "\"higher/lower in every seed\" means all per-seed differences share a sign and the mean exceeds twice "
        "its standard error; anything else is not distinguishable from seed noise at this scale.",
        "",
        _comparison_table(results),
        "",
        claims_section(results),
        "",
        *([_sweep_section(results), ""] if results.sweep_methods else []),
        "## Plots",
        "",
        *[line for path, caption in plots for line in (f"![{caption}]({path.name})", "")],
        _timing_section(results),
        "",
    ])
    path = results.folder / REPORT_FILE
    path.write_text(text)
    return path
