"""The study's report: read a study folder, write report.md and PNG plots into it (`build_report`).

Sections: the pre-registration (the commit and digest of `preregistration.py` the runs were made under), the
warm start (the base model under every prompt, and the premise checks), the tuning runs and the value they
chose, the registered claims judged by `preregistration.judge`, the results in and out of distribution with
the chance baselines (a listed candidate at random; the warm start) in every table, the plots, budget and
timing. Loading and aggregation live in `results`.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from selfdistill.study.plots import write_plots
from selfdistill.study.preregistration import ALPHA, CONFIDENCE, judge
from selfdistill.study.results import (
    FINAL_WINDOW,
    Spread,
    StudyResults,
    load_results,
    markdown_table,
)

REPORT_FILE = "report.md"
TASK_TITLES = {"search": "search with verified checks", "chains": "operation chains"}
PROMPT_LABELS = {"student": "student (problem only)",
                 "teacher_rich": "teacher, rich view (problem + full search trace)",
                 "teacher_weak": "teacher, weak view (problem + answer only)"}
KIND_NOTES = {"fork": "the candidate tried next among untried ones", "marker": "epistemic markers",
              "free": "free-choice operands", "forced": "every other response token"}
OOD_NOTES = {"breadth": "more candidates listed than in training, check lines as long",
             "depth": "as many candidates as in training, longer check lines"}

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
                                 ("marker rate", "marker_rate", 3), ("yes on answer", "yes_on_answer", 3),
                                 ("yes on wrong", "yes_on_wrong", 3), ("unlisted tries", "unlisted_share", 3),
                                 ("StepAcc", "step_acc", 3),
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
        "Marker rate: markers said per failed check followed by another try (the marker is optional). "
        "Yes on answer / yes on wrong: the share of the student's check lines on the answer / on a wrong listed "
        "candidate that end in \"yes\" (their difference is the verification gap); unlisted tries: the share of "
        "check lines whose candidate is not on the list.",
        "",
        "Premise (checked before any run; the study stops when one fails):",
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
# the pre-registration, the tuning and the claims


def _preregistration_section(results: StudyResults) -> str:
    record = results.study.get("preregistration", {})
    commit = record.get("commit") or "not in a git checkout"
    dirty = " (with uncommitted changes to it!)" if record.get("modified") else ""
    return "\n".join([
        "## Pre-registration",
        "",
        f"The claims, their controls, metrics, tests and thresholds, the seeds and the tuning rule are fixed in "
        f"`selfdistill/study/preregistration.py`, last changed by commit `{commit}`{dirty}; the runs were made "
        f"with that file's SHA-256 `{record.get('sha256', '?')}`. Claim runs: seeds 0..{results.seed_count - 1}; "
        "tuning runs: the tuning seeds on the validation slice cut from the RL pool (never the held-out or "
        "out-of-distribution sets).",
        *_incomplete(results),
    ])


def _incomplete(results: StudyResults) -> list[str]:
    """A warning when the claim runs are not the registered plan's: methods or seeds missing."""
    planned = results.study["settings"]
    missing = [m for m in planned["methods"] if m not in results.runs]
    seeds = results.common_seeds
    if not missing and len(seeds) >= planned["seeds"]:
        return []
    return ["", f"**Incomplete: not the registered plan.** The claims below are judged on the seeds every method "
                f"finished ({', '.join(map(str, seeds)) or 'none'} of 0..{planned['seeds'] - 1})"
                + (f"; methods without a finished run: {', '.join(missing)}" if missing else "")
                + ". Rerun `selfdistill study` with the same `--out` to finish it (finished runs are reused)."]


def _tuning_section(results: StudyResults) -> str:
    tuning = results.tuning
    if not tuning.get("chosen"):
        return "## Tuning\n\nNo tuning runs: every method used the library's defaults."
    n = results.n
    knobs = list(tuning["tuned"])  # the knobs this study's tuning chose (its record says which)
    rows = [[method, *(f"{entry[knob]:g}" for knob in knobs), Spread(entry["validation_avg"]).text(),
             ", ".join(f"{v:.3f}" for v in entry["validation_avg"])]
            for method, entry in tuning["methods"].items()]
    chosen = ", ".join(f"{knob} = {value:g}" for knob, value in tuning["tuned"].items())
    return "\n".join([
        "## Tuning",
        "",
        f"DASD's {', '.join(knobs)} chosen on the validation slice (the rule: the highest mean validation Avg@{n} "
        "over the tuning seeds; a tie goes to the weaker intervention: the smaller beta, then the larger floor):",
        "",
        markdown_table(["tuning run", *knobs, f"validation Avg@{n}", "per seed"], rows),
        "",
        f"Chosen: **{tuning['chosen']}**; every DASD-family claim run (dasd, its shuffled, conform and novelty "
        f"controls) used {chosen}.",
    ])


def _claims_section(results: StudyResults) -> str:
    scores = results.per_problem_scores()
    if not scores:
        return ("## Registered claims\n\nThe runs carry no per-problem scores (the chains task has none): the "
                "registered claims are not judged.")
    verdicts = judge(scores)
    rows = []
    for v in verdicts:
        claim = v.claim
        test = claim.test if claim.test != "equivalent" else f"equivalent (±{claim.margin:g})"
        numbers = ["–"] * 3 if v.interval is None else [
            f"{v.interval.estimate:+.3f}", f"[{v.interval.low:+.3f}, {v.interval.high:+.3f}]", f"{v.p:.4f}"]
        rows.append([claim.name, claim.text, f"{claim.a} − {claim.b}", claim.metric, test, *numbers,
                     f"{v.p_holm:.4f}", f"**{v.verdict}**"])
    return "\n".join([
        "## Registered claims",
        "",
        f"Each claim against its matched control, on per-problem scores paired by seed and problem (a crossed "
        f"bootstrap over seeds and problems, {CONFIDENCE:.0%} intervals of a − b). A claim holds when its "
        f"Holm-adjusted p (over the whole registered family) is below {ALPHA}; it is reversed when the interval "
        "lies wholly on the other side (outside ±margin for a \"keeps\" claim), not shown otherwise; not run when "
        "a method of the pair did not run.",
        "",
        markdown_table(["claim", "text", "a − b", "metric", "test", "estimate", f"{CONFIDENCE:.0%} interval", "p",
                        "p (Holm)", "verdict"], rows),
        "",
        "Controls: " + "; ".join(f"{v.claim.name}: {v.claim.control}" for v in verdicts) + ".",
    ])


# ----------------------------------------------------------------------------------------------
# results tables


def _chance_row(results: StudyResults, columns: Sequence[Column], prefix: str) -> list[str] | None:
    chance = results.base_scalars().get(f"{prefix}chance_avg")
    if chance is None:
        return None
    return ["a listed candidate at random", *[f"{chance:.3f}" if m == f"{prefix}avg" else "–" for _, m, _ in columns]]


def _method_table(results: StudyResults, columns: Sequence[Column], *, training: bool, prefix: str = "") -> str:
    """The chance row (where the task has one), the base row, then a row per method (with its seed count);
    `training` adds the training-log columns."""
    base_row = ["base (warm start)", *[_cell(_base_spreads(results), m, d) for _, m, d in columns]]
    header = ["method", *[h for h, _, _ in columns]]
    if training:
        header += ["train H first → final", "train reward final"]
        base_row += ["–", "–"]
    chance_row = _chance_row(results, columns, prefix)
    rows = ([chance_row + (["–", "–"] if training else [])] if chance_row else []) + [base_row]
    for method in results.methods:
        s = results.spreads(method)
        row = [f"{method} ({len(results.runs[method])})", *[_cell(s, m, d) for _, m, d in columns]]
        if training:
            first = f"{s['train_entropy_first'].mean:.3f}" if "train_entropy_first" in s else "–"
            row += [f"{first} → {_cell(s, 'train_entropy_final', 3)}", _cell(s, "train_reward_final", 3)]
        rows.append(row)
    return markdown_table(header, rows)


def _columns(results: StudyResults, prefix: str = "") -> list[Column]:
    n = results.n
    return _present(results, [(f"Avg@{n}", f"{prefix}avg", 3),
                              *[(f"pass@{k}", f"{prefix}pass@{k}", 3) for k in _pass_ks(n)],
                              ("marker rate", f"{prefix}marker_rate", 3),
                              ("E(y)/resp", f"{prefix}epistemic_per_response", 3),
                              ("verif. gap", f"{prefix}verification_gap", 3), ("StepAcc", f"{prefix}step_acc", 3),
                              ("length", f"{prefix}length", 1)])


def _in_distribution(results: StudyResults) -> str:
    columns = _columns(results) + _present(results, [(f"H {kind}", f"H_{kind}", 3) for kind in results.token_kinds])
    return _method_table(results, columns, training=True)


# ----------------------------------------------------------------------------------------------
# the rest


def _timing_section(results: StudyResults) -> str:
    settings = results.study["settings"]
    runs = [run.evaluation for method_runs in results.runs.values() for run in method_runs]
    ood = f" ({settings['ood_max_new_tokens']} out of distribution)" if results.ood_sets else ""
    every = settings.get("eval_every", 0)
    curve = f"Held-out curves: every {every} steps during training." if every else "No held-out curve during training."
    tuning_runs = sum(len(entry["validation_avg"]) for entry in results.tuning.get("methods", {}).values())
    return "\n".join([
        "## Budget and timing",
        "",
        f"Every run: {settings['steps']} steps × {settings['prompts_per_step']} prompts × {settings['group_size']} "
        f"samples = {settings['steps'] * settings['prompts_per_step'] * settings['group_size']} rollouts, AdamW "
        f"lr {settings['lr']:g} (constant), full fine-tuning, frozen teacher (the warm start), temperature "
        f"{settings['temperature']}, at most {settings['max_new_tokens']} new tokens per rollout and held-out "
        f"sample{ood}. {curve} {len(runs)} claim runs and {tuning_runs} tuning runs.",
        "",
        (f"Wall time of this invocation: **{results.study['wall_seconds'] / 60:.1f} min** with "
         if results.study.get("wall_seconds") is not None else "Wall time: **the invocation did not finish** ("
         "interrupted); with ")
        + f"{results.study['workers']} worker process(es) (runs reused from an earlier invocation cost nothing here). "
        f"Per claim run on average: training {statistics.fmean(r['train_seconds'] for r in runs):.0f} s, evaluations "
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
        f"accuracy of the {n} samples per problem; pass@k is the unbiased estimator. The first rows are the "
        "chance baselines: a listed candidate boxed at random (where the task lists candidates) and the warm "
        "start. E(y)/resp: epistemic markers per response. "
        + ("StepAcc: the share of check-line steps that are right; verif. gap: P(yes | answer tried) − P(yes | "
           "wrong candidate tried). " if results.task == "search" else "")
        + "H <kind>: teacher-forced entropy along the held-out worked solutions. Train H: mean rollout entropy at "
        f"step 1 and over the last {FINAL_WINDOW} steps; train reward: last {FINAL_WINDOW} steps.",
        "",
        _in_distribution(results),
    ]
    for split in results.ood_sets:
        prefix = f"ood_{split}_"
        sections += ["", f"## Out of distribution: {split}", "",
                     f"{OOD_NOTES.get(split, split)}; a longer length limit; same cells as above.", "",
                     _method_table(results, _columns(results, prefix), training=False, prefix=prefix)]
    return sections


def build_report(folder: str | Path) -> Path:
    """Write report.md and the plots into the study folder; returns the report's path."""
    results = load_results(folder)
    if not results.methods:
        raise ValueError(f"{results.folder}: no finished claim runs to report")
    plots = write_plots(results, results.folder)
    title = TASK_TITLES.get(results.task, results.task)
    text = "\n".join([
        f"# Method study on {title} ({results.task} task): {', '.join(results.methods)}",
        "",
        _preregistration_section(results),
        "",
        _base_section(results),
        "",
        _tuning_section(results),
        "",
        _claims_section(results),
        "",
        *_results_sections(results),
        "",
        "## Plots",
        "",
        *[line for path, caption in plots for line in (f"![{caption}]({path.name})", "")],
        _timing_section(results),
        "",
    ])
    path = results.folder / REPORT_FILE
    path.write_text(text)
    return path
