"""The study's report: read the run folders, aggregate over seeds, write report.md and PNG plots.

Everything is read back from disk (study.json, base/eval.json, runs/*/eval.json and metrics.jsonl),
so a report can be rebuilt from a finished study folder alone. Spreads are the sample standard
deviation over seeds (ddof = 1; 0 with a single seed) and the min–max range; paired differences
compare two methods seed by seed (run k of every method shares seed k: data order and rollout seeds).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EVAL_FILE = "eval.json"
METRICS_FILE = "metrics.jsonl"
REPORT_FILE = "report.md"
PLOTS = ("entropy.png", "avg_at_k.png", "pass_at_k.png", "reward.png", "choice_entropy.png")
# How many final training steps are averaged for "final" training entropy / reward.
FINAL_WINDOW = 5
# Pairs (a, b) reported as paired differences a − b when both methods were run.
COMPARISONS = (("opsd", "grpo"), ("dasd", "opsd"), ("dasd", "grpo"), ("dasd", "conform"), ("dasd", "novelty"),
               ("egrsd", "grpo"), ("opsd_clip", "grpo"), ("dasd_divergence", "grpo"), ("dasd_divergence", "opsd"))


@dataclass
class RunResult:
    """One training run: its held-out evaluation and its per-step training log."""

    method: str
    seed: int
    evaluation: dict[str, Any]  # eval.json
    metrics: list[dict[str, Any]]  # metrics.jsonl rows, one per step

    def curve(self, name: str) -> list[float]:
        return [float(row[name]) for row in self.metrics if name in row]

    def held_out_curve(self, base_avg: float) -> tuple[list[int], list[float]]:
        """(steps, held-out Avg@n): step 0 is the warm start, then the evaluations during training, then the end."""
        points = [(0, base_avg)] + [(int(p["step"]), float(p["avg@n"]))
                                    for p in self.evaluation.get("held_out_curve", [])]
        points.append((len(self.metrics), float(self.evaluation["student"]["summary"]["avg@n"])))
        return [step for step, _ in points], [value for _, value in points]

    def scalars(self, ks: Sequence[int]) -> dict[str, float]:
        """The run's numbers that the tables aggregate."""
        summary = self.evaluation["student"]["summary"]
        choice = self.evaluation["student"]["choice_entropy"]
        values = {
            "avg": summary["avg@n"],
            **{f"pass@{k}": summary[f"pass@{k}"] for k in ks},
            "length": summary["mean_length"],
            "sample_entropy": summary["mean_entropy"],
            "free_entropy": choice["free"],
            "forced_entropy": choice["forced"],
            "train_entropy_first": self.curve("entropy")[0],
            "train_entropy_final": _tail_mean(self.curve("entropy")),
            "train_reward_final": _tail_mean(self.curve("reward")),
            "train_seconds": self.evaluation["train_seconds"],
        }
        return {name: float(value) for name, value in values.items() if value is not None}


@dataclass
class StudyResults:
    """All of a study folder, as read back from disk."""

    folder: Path
    study: dict[str, Any]
    base: dict[str, Any]
    runs: dict[str, list[RunResult]] = field(default_factory=dict)  # method -> runs sorted by seed

    @property
    def methods(self) -> list[str]:
        order = self.study["settings"]["methods"]
        return [m for m in order if m in self.runs] + sorted(m for m in self.runs if m not in order)

    @property
    def ks(self) -> list[int]:
        return list(range(1, int(self.study["settings"]["eval_samples"]) + 1))


def _tail_mean(values: Sequence[float]) -> float:
    tail = list(values)[-FINAL_WINDOW:]
    return sum(tail) / len(tail) if tail else math.nan


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_results(folder: str | Path) -> StudyResults:
    """Read a study folder. Raises FileNotFoundError if study.json or base/eval.json is missing."""
    folder = Path(folder)
    study = json.loads((folder / "study.json").read_text())
    base = json.loads((folder / "base" / EVAL_FILE).read_text())
    results = StudyResults(folder=folder, study=study, base=base)
    for run_folder in sorted((folder / "runs").glob("*")):
        if not (run_folder / EVAL_FILE).exists():
            continue
        evaluation = json.loads((run_folder / EVAL_FILE).read_text())
        run = RunResult(method=evaluation["method"], seed=int(evaluation["seed"]), evaluation=evaluation,
                        metrics=_read_jsonl(run_folder / METRICS_FILE))
        results.runs.setdefault(run.method, []).append(run)
    for runs in results.runs.values():
        runs.sort(key=lambda run: run.seed)
    return results


# ----------------------------------------------------------------------------------------------
# aggregation


@dataclass
class Spread:
    """Mean, sample standard deviation (0 for one value), min and max of per-seed values."""

    values: list[float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    def text(self, digits: int = 3) -> str:
        if len(self.values) == 1:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"

    def range_text(self, digits: int = 3) -> str:
        return f"{min(self.values):.{digits}f}–{max(self.values):.{digits}f}"


def method_spreads(runs: Sequence[RunResult], ks: Sequence[int]) -> dict[str, Spread]:
    """Per metric, the spread of the runs' values over seeds."""
    per_run = [run.scalars(ks) for run in runs]
    names = [name for name in per_run[0] if all(name in values for values in per_run)]
    return {name: Spread([values[name] for values in per_run]) for name in names}


def paired_difference(a: Sequence[RunResult], b: Sequence[RunResult], metric: str,
                      ks: Sequence[int]) -> Spread | None:
    """Per shared seed, metric(a) − metric(b); None when the methods share no seed."""
    b_by_seed = {run.seed: run.scalars(ks) for run in b}
    diffs = [run.scalars(ks)[metric] - b_by_seed[run.seed][metric] for run in a if run.seed in b_by_seed]
    return Spread(diffs) if diffs else None


def _verdict(diff: Spread) -> str:
    """A plain word on whether a paired difference stands out from the seed noise."""
    if len(diff.values) < 2:
        return "one seed: no spread"
    if all(v == 0 for v in diff.values):
        return "identical in every seed"
    same_sign = all(v > 0 for v in diff.values) or all(v < 0 for v in diff.values)
    standard_error = diff.std / math.sqrt(len(diff.values))
    if same_sign and abs(diff.mean) > 2 * standard_error:
        return f"{'higher' if diff.mean > 0 else 'lower'} in every seed"
    if same_sign:
        return f"same sign in all {len(diff.values)} seeds, but within 2 SE"
    return "within seed noise (signs differ)"


def _curve_band(runs: Sequence[RunResult], name: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """(steps, mean, min, max) over seeds of a per-step metric, up to the shortest run."""
    curves = [run.curve(name) for run in runs]
    length = min(len(c) for c in curves)
    steps = list(range(1, length + 1))
    columns = [[c[i] for c in curves] for i in range(length)]
    return steps, [statistics.fmean(c) for c in columns], [min(c) for c in columns], [max(c) for c in columns]


# ----------------------------------------------------------------------------------------------
# plots


def _colors(methods: Sequence[str]) -> dict[str, Any]:
    import matplotlib

    palette = matplotlib.colormaps["tab10"]
    return {method: palette(i % 10) for i, method in enumerate(methods)}


def _line_style(method: str) -> str:
    return "--" if method in ("conform", "novelty") else "-"


def _save_line_plot(fig: Any, ax: Any, path: Path, *, xlabel: str, ylabel: str, title: str, ncol: int = 3) -> Path:
    """Label, legend and grid a line plot, write it to `path` and close it."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, ncol=ncol)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_plots(results: StudyResults, folder: Path) -> list[Path]:
    """The `PLOTS` in `folder`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = results.methods
    colors = _colors(methods)
    seeds = max(len(runs) for runs in results.runs.values())
    band_note = f"band: min–max over {seeds} seeds" if seeds > 1 else "1 seed"
    paths = []

    for metric, filename, ylabel in (("entropy", "entropy.png", "mean token entropy of rollouts (nats)"),
                                     ("reward", "reward.png", "training reward (mean over rollouts)")):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for method in methods:
            steps, mean, low, high = _curve_band(results.runs[method], metric)
            ax.plot(steps, mean, _line_style(method), color=colors[method], label=method, linewidth=1.6)
            if seeds > 1:
                ax.fill_between(steps, low, high, color=colors[method], alpha=0.12, linewidth=0)
        paths.append(_save_line_plot(fig, ax, folder / filename, xlabel="optimizer step", ylabel=ylabel,
                                     title=f"{metric} during training (mean over seeds; {band_note})"))

    base_avg = float(results.base["student"]["summary"]["avg@n"])
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method in methods:
        curves = [run.held_out_curve(base_avg) for run in results.runs[method]]
        steps = curves[0][0]
        if any(c[0] != steps for c in curves):  # runs evaluated at different steps: plot the common ends only
            steps = [0, steps[-1]]
            curves = [([0, c[0][-1]], [c[1][0], c[1][-1]]) for c in curves]
        columns = list(zip(*(c[1] for c in curves), strict=True))
        ax.plot(steps, [statistics.fmean(c) for c in columns], _line_style(method) + "o", color=colors[method],
                label=method, linewidth=1.6, markersize=3)
        if seeds > 1:
            ax.fill_between(steps, [min(c) for c in columns], [max(c) for c in columns], color=colors[method],
                            alpha=0.12, linewidth=0)
    n = results.ks[-1]
    paths.append(_save_line_plot(fig, ax, folder / "avg_at_k.png", xlabel="optimizer step (0 = warm start)",
                                 ylabel=f"held-out Avg@{n}",
                                 title=f"held-out Avg@{n} during training (mean over seeds; {band_note})"))

    ks = results.ks
    fig, ax = plt.subplots(figsize=(7, 4.2))
    base_summary = results.base["student"]["summary"]
    ax.plot(ks, [base_summary[f"pass@{k}"] for k in ks], ":", color="black", label="base (warm start)")
    for method in methods:
        spreads = method_spreads(results.runs[method], ks)
        ax.plot(ks, [spreads[f"pass@{k}"].mean for k in ks], _line_style(method), color=colors[method],
                label=method, linewidth=1.6)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks if len(ks) <= 8 else [k for k in ks if k & (k - 1) == 0])
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    paths.append(_save_line_plot(fig, ax, folder / "pass_at_k.png", xlabel="k", ylabel="held-out pass@k (unbiased)",
                                 title=f"held-out pass@k, mean over seeds ({seeds} seed{'s' if seeds > 1 else ''})",
                                 ncol=2))

    labels = ["base", *methods]
    free = [Spread([results.base["student"]["choice_entropy"]["free"]])]
    forced = [Spread([results.base["student"]["choice_entropy"]["forced"]])]
    for method in methods:
        spreads = method_spreads(results.runs[method], ks)
        free.append(spreads["free_entropy"])
        forced.append(spreads["forced_entropy"])
    fig, ax = plt.subplots(figsize=(7, 3.8))
    positions = list(range(len(labels)))
    width = 0.38
    ax.bar([p - width / 2 for p in positions], [s.mean for s in free], width, yerr=[s.std for s in free],
           label="free-choice tokens", color="tab:orange", capsize=2)
    ax.bar([p + width / 2 for p in positions], [s.mean for s in forced], width, yerr=[s.std for s in forced],
           label="forced tokens", color="tab:blue", capsize=2)
    ax.set_xticks(positions, labels, rotation=30, fontsize=8)
    ax.set_ylabel("entropy (nats)")
    ax.set_title("held-out entropy along the worked solutions (teacher forcing); bars: ± std over seeds",
                 fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    paths.append(folder / "choice_entropy.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    return paths


# ----------------------------------------------------------------------------------------------
# markdown


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _number(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _warm_start_section(results: StudyResults) -> str:
    record = results.study["warm_start"]
    settings = record["settings"]
    base = results.base
    rows = []
    for role, label in (("student", "student prompt (problem only)"),
                        ("teacher", "teacher prompt (problem + worked solution)")):
        summary, choice = base[role]["summary"], base[role]["choice_entropy"]
        rows.append([label, f"{summary['avg@n']:.3f}", f"{summary['pass@1']:.3f}",
                     f"{summary[f'pass@{results.ks[-1]}']:.3f}", f"{choice['free']:.3f}", f"{choice['forced']:.3f}",
                     f"{summary['mean_length']:.1f}"])
    n = results.ks[-1]
    task = results.study["settings"]["task"]
    free_tokens = base["student"]["choice_entropy"]["free_tokens"]
    forced_tokens = base["student"]["choice_entropy"]["forced_tokens"]
    return "\n".join([
        "## Warm start",
        "",
        f"Tiny Qwen2 model, {record['parameters']:,} parameters (hidden {settings['hidden_size']}, "
        f"{settings['num_layers']} layers), from random weights. Stage 1: {settings['steps']} steps × "
        f"{settings['batch_size']} worked solutions of {task['n_sft']} problems, "
        f"{settings['teacher_fraction']:.0%} of them shown with the worked solution in the prompt, loss on the "
        f"response tokens only, peak lr {settings['lr']:g} with cosine decay (final loss "
        f"{_number(record.get('stage1_final_loss'))}). Stage 2: {settings['drill_steps']} more such steps at lr "
        f"{settings['drill_lr']:g}, each plus an arithmetic drill of {settings['drill_facts']} single operations "
        f"in the solution line format (final loss, task + drill, {_number(record.get('final_loss'))}). "
        f"**{record['train_seconds']:.0f} s** of training, once. {_warm_start_source(results.study)}",
        "",
        f"Held-out ({task['n_eval']} problems, n = {n} samples each, temperature "
        f"{results.study['settings']['temperature']}); entropy is the mean next-token entropy (nats) along the "
        f"worked solutions under teacher forcing, on free-choice operand tokens ({free_tokens} of them) and on "
        f"all other (forced) response tokens ({forced_tokens}):",
        "",
        _table(["prompt", f"Avg@{n}", "pass@1", f"pass@{n}", "H free-choice", "H forced", "length (tokens)"], rows),
    ])


def _warm_start_source(study: dict[str, Any]) -> str:
    source, digest = study.get("warm_start_source"), study.get("warm_start_sha256")
    if source == "shipped":
        return (f"This study used the warm start shipped with the package (model.safetensors SHA-256 "
                f"`{digest}`), not a fresh training.")
    if source == "trained":
        return (f"This study trained its own warm start (model.safetensors SHA-256 `{digest}`); another machine's "
                "build can differ (docs/study.md).")
    return "The folder is cached."


def _main_table(results: StudyResults) -> str:
    ks = results.ks
    n = ks[-1]
    header = ["method", f"Avg@{n}", "pass@2", "pass@4", "pass@8", f"pass@{n}", "H free", "H forced",
              "train H first → final", "train reward final", "length"]
    base_summary, base_choice = results.base["student"]["summary"], results.base["student"]["choice_entropy"]
    rows = [["base (warm start)", f"{base_summary['avg@n']:.3f}",
             *[f"{base_summary[f'pass@{k}']:.3f}" for k in (2, 4, 8, n) if k <= n],
             f"{base_choice['free']:.3f}", f"{base_choice['forced']:.3f}", "–", "–",
             f"{base_summary['mean_length']:.1f}"]]
    for method in results.methods:
        s = method_spreads(results.runs[method], ks)
        rows.append([
            f"{method} ({len(results.runs[method])})", s["avg"].text(),
            *[s[f"pass@{k}"].text() for k in (2, 4, 8, n) if k <= n],
            s["free_entropy"].text(), s["forced_entropy"].text(),
            f"{s['train_entropy_first'].mean:.3f} → {s['train_entropy_final'].text()}",
            s["train_reward_final"].text(), s["length"].text(1),
        ])
    if n < 8:
        header = [h for h in header if not (h.startswith("pass@") and int(h[5:]) > n)]
    return _table(header, rows)


def _range_table(results: StudyResults) -> str:
    n = results.ks[-1]
    rows = []
    for method in results.methods:
        s = method_spreads(results.runs[method], results.ks)
        rows.append([method, s["avg"].range_text(), s[f"pass@{n}"].range_text(), s["free_entropy"].range_text(),
                     s["train_entropy_final"].range_text()])
    return _table(["method", f"Avg@{n} min–max", f"pass@{n} min–max", "H free min–max", "train H final min–max"],
                  rows)


def _comparison_table(results: StudyResults) -> str:
    n = results.ks[-1]
    metrics = (("train_entropy_final", "final training entropy"), ("free_entropy", "H free-choice (held-out)"),
               ("avg", f"Avg@{n}"), (f"pass@{n}", f"pass@{n}"))
    rows = []
    for a, b in COMPARISONS:
        if a not in results.runs or b not in results.runs:
            continue
        for metric, label in metrics:
            diff = paired_difference(results.runs[a], results.runs[b], metric, results.ks)
            if diff is None:
                continue
            per_seed = ", ".join(f"{v:+.3f}" for v in diff.values)
            rows.append([f"{a} − {b}", label, f"{diff.mean:+.3f}", f"{diff.std:.3f}", per_seed, _verdict(diff)])
    if not rows:
        return "_No method pairs to compare._"
    return _table(["pair", "metric", "mean diff", "std", "per seed", "reading"], rows)


def _timing_section(results: StudyResults) -> str:
    settings = results.study["settings"]
    train = [run.evaluation["train_seconds"] for runs in results.runs.values() for run in runs]
    evaluation = [run.evaluation["eval_seconds"] for runs in results.runs.values() for run in runs]
    return "\n".join([
        "## Budget and timing",
        "",
        f"Every run: {settings['steps']} steps × {settings['prompts_per_step']} prompts × {settings['group_size']} "
        f"samples = {settings['steps'] * settings['prompts_per_step'] * settings['group_size']} rollouts, AdamW "
        f"lr {settings['lr']:g} (constant), full fine-tuning, frozen teacher (the warm start), temperature "
        f"{settings['temperature']}, at most {settings['max_new_tokens']} new tokens.",
        "",
        f"Wall time of this invocation: **{results.study['wall_seconds'] / 60:.1f} min** with "
        f"{results.study['workers']} worker process(es) (runs reused from an earlier invocation cost nothing here). "
        f"Per run: training {statistics.fmean(train):.0f} s, evaluation {statistics.fmean(evaluation):.0f} s "
        "on average.",
    ])


def build_report(folder: str | Path) -> Path:
    """Write report.md and the plots into the study folder; returns the report's path."""
    results = load_results(folder)
    if not results.runs:
        raise ValueError(f"{results.folder}: no finished runs to report")
    write_plots(results, results.folder)
    n = results.ks[-1]
    seeds = max(len(runs) for runs in results.runs.values())
    spread_note = ("mean ± sample standard deviation over seeds (ddof = 1)" if seeds > 1
                   else "a single seed: no spread")
    text = "\n".join([
        "# Method study: GRPO vs OPSD vs DASD vs EGRSD on operation chains",
        "",
        _warm_start_section(results),
        "",
        "## Held-out results after training",
        "",
        f"Cells are {spread_note}; the number after each method is its count of seeds. Avg@{n} is the mean "
        f"accuracy of the {n} samples per problem (Avg@k has the same expectation for every k ≤ {n}); pass@k is "
        "the unbiased estimator. H free / H forced: teacher-forced entropy along the held-out worked solutions. "
        f"Train H: mean rollout entropy at step 1 and over the last {FINAL_WINDOW} steps; train reward: last "
        f"{FINAL_WINDOW} steps. E(y) epistemic markers are not reported: the task's responses are arithmetic "
        "lines and never contain them.",
        "",
        _main_table(results),
        "",
        "Min–max over seeds:",
        "",
        _range_table(results),
        "",
        "## Paired differences (same seed: same data order and rollout seeds)",
        "",
        "\"higher/lower in every seed\" means all per-seed differences share a sign and the mean exceeds twice "
        "its standard error; anything else is not distinguishable from seed noise at this scale.",
        "",
        _comparison_table(results),
        "",
        "## Plots",
        "",
        "![entropy during training](entropy.png)",
        "",
        f"![held-out Avg@{n} during training](avg_at_k.png)",
        "",
        "![held-out pass@k](pass_at_k.png)",
        "",
        "![free-choice vs forced entropy](choice_entropy.png)",
        "",
        "![reward during training](reward.png)",
        "",
        _timing_section(results),
        "",
    ])
    path = results.folder / REPORT_FILE
    path.write_text(text)
    return path
