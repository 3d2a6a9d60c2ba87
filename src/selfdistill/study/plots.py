"""The study's PNG plots, drawn from `StudyResults` (the claim runs; the tuning runs get a table).

Training curves (rollout entropy, reward) per optimizer step; held-out curves (Avg@n, the marker rate
and, on the search task, each out-of-distribution set's Avg@n) from step 0 = the warm start through the evaluations
during training to the final one; pass@k after training; teacher-forced entropy by token kind.
Each line is the mean over seeds, with a min–max band when there are several.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from selfdistill.study.results import CURVE_SCALARS, StudyResults, curve_band, held_out_band

# Every plot file; "ood_<set>_avg_at_k.png" only on a task with out-of-distribution sets, and the held-out curves
# ("avg_at_k", "marker_rate", "ood_<set>_avg_at_k") only when the runs measured them during training.
PLOTS = ("entropy.png", "reward.png", "avg_at_k.png", "marker_rate.png", "ood_breadth_avg_at_k.png",
         "ood_depth_avg_at_k.png", "pass_at_k.png", "token_entropy.png")


def _colors(methods: Sequence[str]) -> dict[str, Any]:
    import matplotlib

    palette = matplotlib.colormaps["tab10"]
    return {method: palette(i % 10) for i, method in enumerate(methods)}


def _line_style(method: str) -> str:
    return "--" if method in ("conform", "novelty") else "-"


def _save(fig: Any, ax: Any, path: Path, *, xlabel: str, ylabel: str, title: str, ncol: int = 3) -> Path:
    """Label, legend and grid a plot, write it to `path` and close it."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, ncol=ncol)
    ax.grid(alpha=0.3, axis="y" if xlabel == "" else "both")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


class _Plotter:
    """Shared state of one study's plots: the methods, their colours, the seed note, the output folder."""

    def __init__(self, results: StudyResults, folder: Path) -> None:
        self.results, self.folder = results, folder
        self.methods = results.methods
        self.colors = _colors(self.methods)
        self.seeds = max(len(results.runs[m]) for m in self.methods)
        self.band_note = f"band: min–max over {self.seeds} seeds" if self.seeds > 1 else "1 seed"

    def _band(self, ax: Any, method: str, steps: list[int], mean: list[float], low: list[float],
              high: list[float], marker: str = "") -> None:
        ax.plot(steps, mean, _line_style(method) + marker, color=self.colors[method], label=method, linewidth=1.6,
                markersize=3)
        if self.seeds > 1:
            ax.fill_between(steps, low, high, color=self.colors[method], alpha=0.12, linewidth=0)

    def training(self, metric: str, filename: str, ylabel: str) -> Path:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.2))
        for method in self.methods:
            if all(run.curve(metric) for run in self.results.runs[method]):
                self._band(ax, method, *curve_band(self.results.runs[method], metric))
        return _save(fig, ax, self.folder / filename, xlabel="optimizer step", ylabel=ylabel,
                     title=f"{metric} during training (mean over seeds; {self.band_note})")

    def held_out(self, key: str, filename: str, ylabel: str) -> Path:
        """A held-out curve (`RunResult.held_out_curve` key) from the warm start (step 0) to the end."""
        import matplotlib.pyplot as plt

        base_value = self.results.base_scalars()[CURVE_SCALARS[key]]
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for method in self.methods:
            self._band(ax, method, *held_out_band(self.results.runs[method], key, base_value), marker="o")
        return _save(fig, ax, self.folder / filename, xlabel="optimizer step (0 = warm start)", ylabel=ylabel,
                     title=f"{ylabel} during training (mean over seeds; {self.band_note})")

    def pass_at_k(self) -> Path:
        import matplotlib
        import matplotlib.pyplot as plt

        ks = self.results.ks
        fig, ax = plt.subplots(figsize=(7, 4.2))
        base = self.results.base_scalars()
        ax.plot(ks, [base[f"pass@{k}"] for k in ks], ":", color="black", label="base (warm start)")
        for method in self.methods:
            spreads = self.results.spreads(method)
            ax.plot(ks, [spreads[f"pass@{k}"].mean for k in ks], _line_style(method), color=self.colors[method],
                    label=method, linewidth=1.6)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks if len(ks) <= 8 else [k for k in ks if k & (k - 1) == 0])
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        plural = "s" if self.seeds > 1 else ""
        return _save(fig, ax, self.folder / "pass_at_k.png", xlabel="k", ylabel="held-out pass@k (unbiased)",
                     title=f"held-out pass@k, mean over seeds ({self.seeds} seed{plural})", ncol=2)

    def token_entropy(self) -> Path:
        """Grouped bars: per model (base, then each method), one bar per token kind, ± std over seeds."""
        import matplotlib.pyplot as plt

        kinds = self.results.token_kinds
        labels = ["base", *self.methods]
        base = self.results.base_scalars()
        spreads = [self.results.spreads(m) for m in self.methods]
        fig, ax = plt.subplots(figsize=(7.5, 3.8))
        width = 0.8 / len(kinds)
        palette = ("tab:orange", "tab:green", "tab:blue", "tab:red")
        for i, kind in enumerate(kinds):
            key = f"H_{kind}"
            means = [base.get(key, float("nan"))] + [s[key].mean if key in s else float("nan") for s in spreads]
            errors = [0.0] + [s[key].std if key in s else 0.0 for s in spreads]
            positions = [p + (i - (len(kinds) - 1) / 2) * width for p in range(len(labels))]
            ax.bar(positions, means, width, yerr=errors, label=f"{kind} tokens", color=palette[i % len(palette)],
                   capsize=2)
        ax.set_xticks(list(range(len(labels))), labels, rotation=30, fontsize=8)
        return _save(fig, ax, self.folder / "token_entropy.png", xlabel="", ylabel="entropy (nats)",
                     title="held-out entropy along the worked solutions (teacher forcing), by token kind; "
                           "bars: ± std over seeds")


def write_plots(results: StudyResults, folder: Path) -> list[tuple[Path, str]]:
    """Draw the plots into `folder`; returns (path, caption) of each, in the report's order."""
    import matplotlib

    matplotlib.use("Agg")
    plotter = _Plotter(results, folder)
    n = results.n
    curve_n = results.study["settings"].get("curve_samples", n)
    # Avg@k has the same expectation for every k: the curve's Avg@curve_n and the final Avg@n share the axis
    avg = f"Avg@k (k = {curve_n} during training, {n} at the end)" if curve_n != n else f"Avg@{n}"
    plots = []
    # held-out curves only where runs measured them during training (`eval_every`); without, such a plot would
    # be a straight line from the warm start to the final evaluation
    if any(run.evaluation.get("held_out_curve") for runs in results.runs.values() for run in runs):
        plots.append((plotter.held_out("avg@n", "avg_at_k.png", f"held-out {avg}"),
                      f"held-out Avg@{n} during training"))
        if "marker_rate" in results.base_scalars():
            plots.append((plotter.held_out("marker_rate", "marker_rate.png", "held-out marker rate"),
                          "held-out marker rate (markers said per failed check followed by another try) during "
                          "training"))
        for split in results.ood_sets:
            plots.append((plotter.held_out(f"ood_{split}_avg@n", f"ood_{split}_avg_at_k.png",
                                           f"out-of-distribution ({split}) {avg}"),
                          f"out-of-distribution ({split}) Avg@{n} during training"))
    plots += [
        (plotter.training("entropy", "entropy.png", "mean token entropy of rollouts (nats)"),
         "entropy during training"),
        (plotter.pass_at_k(), "held-out pass@k"),
        (plotter.token_entropy(), "held-out entropy by token kind"),
        (plotter.training("reward", "reward.png", "training reward (mean over rollouts)"), "reward during training"),
    ]
    return plots
