"""Tables and plots of evaluation runs: one run's summary (rich, Markdown, CSV), and several runs side by
side (``selfdistill report``): a Markdown table per benchmark and PNG plots of pass@k curves and of the
response-length and E(y) distributions."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfdistill.evaluation.metrics import epistemic_density
from selfdistill.evaluation.store import SAMPLES_FILE, SUMMARY_FILE, SampleRecord, load_records

MACRO = "macro"

# Column key -> header. pass@k columns are added between avg@n and maj@n from the summary itself.
_HEADERS = {
    "benchmark": "benchmark",
    "problems": "problems",
    "n": "n",
    "avg@n": "Avg@n",
    "maj@n": "maj@n",
    "mean_length": "length",
    "truncation_rate": "truncated",
    "epistemic_per_1k": "E(y)/1k",
    "mean_entropy": "entropy",
}
LEGEND = (
    "Avg@n, pass@k, maj@n and truncated in %; length: mean response tokens (EOS included); "
    "E(y)/1k: epistemic markers per 1,000 tokens (mean over responses); entropy: mean token entropy (nats)."
)
_PERCENT = ("avg@n", "maj@n", "truncation_rate")  # shown as percentages in the human-readable tables


def _is_percent(key: str) -> bool:
    return key in _PERCENT or key.startswith("pass@")


def metric_columns(*summaries: dict[str, Any]) -> list[str]:
    """The metric keys of the summaries' rows, in table order (every pass@k any row has, by k)."""
    rows = [row for summary in summaries for row in (*summary["benchmarks"].values(), summary["macro"])]
    ks = sorted({int(key[5:]) for row in rows for key in row if key.startswith("pass@")})
    return [
        "problems", "n", "avg@n", *(f"pass@{k}" for k in ks), "maj@n",
        "mean_length", "truncation_rate", "epistemic_per_1k", "mean_entropy",
    ]  # fmt: skip


def header(key: str) -> str:
    """The column title of a metric key."""
    return _HEADERS.get(key, key)


def format_value(key: str, value: Any) -> str:
    """A metric as table text: accuracies and rates in percent (1 decimal), counts as ints, '–' for none."""
    if value is None:
        return "–"
    if key in ("problems", "n"):
        return str(int(value))
    if _is_percent(key):
        return f"{100.0 * float(value):.1f}"
    if key == "mean_length":
        return f"{float(value):.1f}"
    return f"{float(value):.3f}"


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(benchmark name, row) for each benchmark, then ("macro", macro row)."""
    return [*summary["benchmarks"].items(), (MACRO, summary["macro"])]


# --------------------------------------------------------------------------------------------------
# One run


def summary_markdown(summary: dict[str, Any], *, title: str | None = None) -> str:
    """The summary as a Markdown table (one row per benchmark, then macro)."""
    columns = metric_columns(summary)
    lines = [f"# {title}", ""] if title else []
    lines.append("| benchmark | " + " | ".join(header(c) for c in columns) + " |")
    lines.append("|---|" + "---:|" * len(columns))
    for name, row in summary_rows(summary):
        label = f"**{name}**" if name == MACRO else name
        lines.append(f"| {label} | " + " | ".join(format_value(c, row.get(c)) for c in columns) + " |")
    lines += ["", LEGEND]
    if summary.get("environment"):
        lines += ["", f"Environment: {summary['environment']}"]
    return "\n".join(lines) + "\n"


def summary_csv(summary: dict[str, Any]) -> str:
    """The summary as CSV with raw values (fractions, not percent; empty for none)."""
    columns = metric_columns(summary)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["benchmark", *columns])
    for name, row in summary_rows(summary):
        writer.writerow([name, *("" if row.get(c) is None else row.get(c) for c in columns)])
    return buffer.getvalue()


def write_summary_files(summary: dict[str, Any], out_dir: str | os.PathLike[str], *, title: str | None = None) -> None:
    """Write summary.md and summary.csv into `out_dir`."""
    out = Path(out_dir)
    (out / "summary.md").write_text(summary_markdown(summary, title=title), encoding="utf-8")
    (out / "summary.csv").write_text(summary_csv(summary), encoding="utf-8")


def print_summary(summary: dict[str, Any], *, title: str | None = None, console: Any = None) -> None:
    """Print the summary as a rich table."""
    from rich.console import Console
    from rich.table import Table

    columns = metric_columns(summary)
    table = Table(title=title, caption=LEGEND)
    table.add_column("benchmark")
    for column in columns:
        table.add_column(header(column), justify="right")
    for name, row in summary_rows(summary):
        table.add_row(name, *(format_value(c, row.get(c)) for c in columns), style="bold" if name == MACRO else None)
    if console is None:  # rich assumes 80 columns when not on a terminal: too narrow for this table
        console = Console() if sys.stdout.isatty() else Console(width=200)
    console.print(table)


# --------------------------------------------------------------------------------------------------
# Several runs


@dataclass
class EvalRun:
    """One run folder, read back: its label in reports, summary.json and samples.jsonl."""

    label: str
    path: Path
    summary: dict[str, Any]
    records: list[SampleRecord]


def load_run(run_dir: str | os.PathLike[str], label: str | None = None) -> EvalRun:
    """Read a run folder written by ``selfdistill eval`` (it needs summary.json and samples.jsonl)."""
    path = Path(run_dir)
    summary_path = path / SUMMARY_FILE
    if not summary_path.is_file():
        raise FileNotFoundError(f"{path} has no {SUMMARY_FILE}: not a finished `selfdistill eval` run folder")
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    return EvalRun(label or path.resolve().name, path, summary, load_records(path / SAMPLES_FILE))


def _unique_labels(paths: Sequence[Path]) -> list[str]:
    """Folder names, or parent/name where two runs share a name."""
    names = [p.resolve().name for p in paths]
    return [
        f"{p.resolve().parent.name}/{name}" if names.count(name) > 1 else name
        for p, name in zip(paths, names, strict=True)
    ]


def comparison_markdown(runs: Sequence[EvalRun]) -> str:
    """One Markdown table per benchmark (macro first), one row per run."""
    benchmarks = [MACRO]
    for run in runs:
        benchmarks += [name for name in run.summary["benchmarks"] if name not in benchmarks]
    columns = metric_columns(*(run.summary for run in runs))
    lines = ["# Evaluation runs side by side", ""]
    lines += [f"- **{run.label}**: `{run.path}` — " + _settings_line(run.summary) for run in runs]
    lines += [f"- **{run.label}** environment: {run.summary['environment']}" for run in runs
              if run.summary.get("environment")]
    for benchmark in benchmarks:
        lines += ["", f"## {benchmark}", ""]
        lines.append("| run | " + " | ".join(header(c) for c in columns) + " |")
        lines.append("|---|" + "---:|" * len(columns))
        for run in runs:
            row = run.summary["macro"] if benchmark == MACRO else run.summary["benchmarks"].get(benchmark)
            cells = ["–"] * len(columns) if row is None else [format_value(c, row.get(c)) for c in columns]
            lines.append(f"| {run.label} | " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", LEGEND]) + "\n"


def _settings_line(summary: dict[str, Any]) -> str:
    settings = summary.get("settings", {})
    parts = [f"model {settings.get('model')}", f"benchmarks {','.join(settings.get('benchmarks', []))}"]
    if settings.get("adapter"):
        parts.append(f"adapter {settings['adapter']}")
    parts += [f"{key} {settings.get(key)}" for key in ("n", "temperature", "top_p", "max_new_tokens", "limit")]
    return ", ".join(parts)


def _grid(count: int) -> tuple[int, int]:
    columns = min(3, count)
    return (count + columns - 1) // columns, columns


def plot_pass_at_k(runs: Sequence[EvalRun], path: Path) -> None:
    """pass@k against k (log2 axis), one panel per benchmark and one for macro, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [MACRO]
    for run in runs:
        panels += [name for name in run.summary["benchmarks"] if name not in panels]
    rows, cols = _grid(len(panels))
    figure, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for index, panel in enumerate(panels):
        axis = axes[index // cols][index % cols]
        highest = 0.0
        for run in runs:
            row = run.summary["macro"] if panel == MACRO else run.summary["benchmarks"].get(panel)
            if row is None:
                continue
            ks = sorted(int(key[5:]) for key in row if key.startswith("pass@"))
            values = [100.0 * row[f"pass@{k}"] for k in ks]
            highest = max(highest, *values)
            axis.plot(ks, values, marker="o", label=run.label, clip_on=False)  # markers at 0 stay whole
            axis.set_xscale("log", base=2)
            axis.set_xticks(ks, [str(k) for k in ks])
        axis.set_ylim(0.0, min(102.0, max(1.0, 1.15 * highest)))  # a percentage: never below 0
        axis.set_title(panel)
        axis.set_xlabel("k")
        axis.set_ylabel("pass@k (%)")
        axis.grid(alpha=0.3)
    for index in range(len(panels), rows * cols):
        axes[index // cols][index % cols].axis("off")
    axes[0][0].legend(fontsize="small")
    figure.suptitle("pass@k (unbiased estimator)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _per_benchmark_values(run: EvalRun, value: Any) -> dict[str, list[float]]:
    values: dict[str, list[float]] = {}
    for record in run.records:
        values.setdefault(record.source, []).append(float(value(record)))
    return values


def plot_distribution(runs: Sequence[EvalRun], path: Path, *, what: str) -> None:
    """Histograms per benchmark (one outline per run) of response length ("length", tokens) or of the
    epistemic-marker density ("epistemic", E(y) markers per 1k tokens of each response)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if what == "length":
        value, xlabel, title = (lambda r: r.num_tokens), "response length (tokens)", "response length"
    elif what == "epistemic":
        value = lambda r: epistemic_density(r.completion, r.num_tokens)  # noqa: E731
        xlabel, title = "E(y) markers per 1k tokens", "epistemic-marker density E(y)"
    else:
        raise ValueError(f"what must be 'length' or 'epistemic', got {what!r}")
    per_run = [_per_benchmark_values(run, value) for run in runs]
    panels: list[str] = []
    for values in per_run:
        panels += [name for name in values if name not in panels]
    rows, cols = _grid(len(panels))
    figure, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for index, panel in enumerate(panels):
        axis = axes[index // cols][index % cols]
        pooled = [v for values in per_run for v in values.get(panel, [])]
        low, high = min(pooled), max(pooled)
        bins = np.linspace(low, high if high > low else low + 1.0, 21)
        for run, values in zip(runs, per_run, strict=True):
            if panel in values:
                data = values[panel]
                axis.hist(data, bins=bins, histtype="step", linewidth=1.6,
                          label=f"{run.label} (mean {np.mean(data):.1f})")
        axis.set_title(panel)
        axis.set_xlabel(xlabel)
        axis.set_ylabel("responses")
        axis.legend(fontsize="x-small")
        axis.grid(alpha=0.3)
    for index in range(len(panels), rows * cols):
        axes[index // cols][index % cols].axis("off")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def compare_runs(
    run_dirs: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str], *, labels: Sequence[str] | None = None
) -> dict[str, Path]:
    """Write report.md (tables side by side, linking the plots), pass_at_k.png, lengths.png and
    epistemic.png into `out_dir`; returns their paths by name."""
    if not run_dirs:
        raise ValueError("no run folders given")
    paths = [Path(d) for d in run_dirs]
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} runs")
    names = list(labels) if labels is not None else _unique_labels(paths)
    runs = [load_run(path, label) for path, label in zip(paths, names, strict=True)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "pass_at_k": out / "pass_at_k.png",
        "lengths": out / "lengths.png",
        "epistemic": out / "epistemic.png",
        "report": out / "report.md",
    }
    plot_pass_at_k(runs, files["pass_at_k"])
    plot_distribution(runs, files["lengths"], what="length")
    plot_distribution(runs, files["epistemic"], what="epistemic")
    plots = "\n".join(f"![{name}]({files[name].name})" for name in ("pass_at_k", "lengths", "epistemic"))
    files["report"].write_text(comparison_markdown(runs) + "\n## Plots\n\n" + plots + "\n", encoding="utf-8")
    return files


__all__ = [
    "EvalRun",
    "compare_runs",
    "comparison_markdown",
    "format_value",
    "load_run",
    "metric_columns",
    "plot_distribution",
    "plot_pass_at_k",
    "print_summary",
    "summary_csv",
    "summary_markdown",
    "write_summary_files",
]
