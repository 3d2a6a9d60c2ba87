"""A finished (or partly finished) study folder read back from disk, and its aggregation over seeds.

Everything comes from study.json, base/eval.json and runs/*/eval.json + metrics.jsonl, so a report can
be rebuilt from the folder alone. Spreads are the sample standard deviation over seeds (ddof = 1; 0 with
a single seed) and the min–max range; run k of every method shares seed k (data order and rollout seeds),
so per-problem scores pair up seed by seed for the registered claims.

Both study tasks share one eval.json schema: "search" adds the out-of-distribution sets ("ood": set name ->
row), per-line measurements (StepAcc, the marker rate, the verification gap, ...) and per-problem scores
("per_problem", what the registered claims are judged on); "chains" has none of them. Token-entropy kinds differ by task
("fork" / "marker" / "forced" on search, "free" / "forced" on chains) and are read from the files.
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
# How many final training steps are averaged for "final" training entropy / reward.
FINAL_WINDOW = 5
# held_out_curve key -> the scalar holding the same number at the final evaluation.
CURVE_SCALARS = {"avg@n": "avg", "marker_rate": "marker_rate", "step_acc": "step_acc",
                 **{f"ood_{split}_{key}": f"ood_{split}_{scalar}" for split in ("breadth", "depth")
                    for key, scalar in (("avg@n", "avg"), ("marker_rate", "marker_rate"), ("step_acc", "step_acc"))}}
# Scalars of a summary row beside Avg@n, pass@k and length, when the task measures them.
TRACE_SCALARS = ("epistemic_per_response", "epistemic_per_1k", "step_acc", "marker_rate", "verification_gap",
                 "yes_on_answer", "yes_on_wrong", "unlisted_share", "chance_avg", "first_try_right")


def _pass_keys(summary: dict[str, Any]) -> list[str]:
    return [key for key in summary if key.startswith("pass@")]


def _row_scalars(summary: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    values = {f"{prefix}avg": summary["avg@n"], **{f"{prefix}{key}": summary[key] for key in _pass_keys(summary)},
              f"{prefix}length": summary["mean_length"]}
    values.update({f"{prefix}{key}": summary.get(key) for key in TRACE_SCALARS})
    return values


def evaluation_scalars(part: dict[str, Any]) -> dict[str, float]:
    """The numbers of one model under one prompt ({"summary", "token_entropy"[, "ood"]}) that the tables use:
    avg, pass@k, length, the task's trace measurements (`TRACE_SCALARS`), H_<kind>, and the same prefixed
    "ood_<set>_" for each out-of-distribution set."""
    values = _row_scalars(part["summary"])
    for kind, entropy in part.get("token_entropy", {}).get("entropy", {}).items():
        values[f"H_{kind}"] = entropy  # None when the kind had no tokens: dropped below
    for split, summary in part.get("ood", {}).items():
        values.update(_row_scalars(summary, f"ood_{split}_"))
    return {name: float(value) for name, value in values.items() if value is not None}


@dataclass
class RunResult:
    """One training run: its final held-out evaluation and its per-step training log."""

    method: str
    seed: int
    evaluation: dict[str, Any]  # eval.json
    metrics: list[dict[str, Any]]  # metrics.jsonl rows, one per step

    def curve(self, name: str) -> list[float]:
        return [float(row[name]) for row in self.metrics if row.get(name) is not None]

    def held_out_curve(self, key: str, base_value: float) -> tuple[list[int], list[float]]:
        """(steps, values) of a held-out number (a `CURVE_SCALARS` key): step 0 is the warm start's value,
        then the evaluations during training, then the final evaluation at the last step."""
        points = [(0, base_value)] + [(int(p["step"]), float(p[key]))
                                      for p in self.evaluation.get("held_out_curve", []) if p.get(key) is not None]
        final = self.scalars().get(CURVE_SCALARS[key])
        if final is not None:
            points.append((int(self.evaluation.get("steps", len(self.metrics))), final))
        return [step for step, _ in points], [value for _, value in points]

    def scalars(self) -> dict[str, float]:
        """The run's numbers that the tables aggregate: `evaluation_scalars` of the student plus the training
        log's entropy (first step, mean of the last `FINAL_WINDOW`), final reward, mean clip fraction."""
        values = evaluation_scalars(self.evaluation["student"])
        entropy, reward, clip = self.curve("entropy"), self.curve("reward"), self.curve("clip_fraction")
        if entropy:
            values.update(train_entropy_first=entropy[0], train_entropy_final=_tail_mean(entropy))
        if reward:
            values["train_reward_final"] = _tail_mean(reward)
        if clip:
            values["train_clip_fraction"] = statistics.fmean(clip)
        values["train_seconds"] = float(self.evaluation["train_seconds"])
        return values


@dataclass
class StudyResults:
    """All of a study folder, as read back from disk."""

    folder: Path
    study: dict[str, Any]
    base: dict[str, Any]
    runs: dict[str, list[RunResult]] = field(default_factory=dict)  # method -> runs sorted by seed
    tuning: dict[str, Any] = field(default_factory=dict)  # tuning.json ({} without tuning runs)

    @property
    def methods(self) -> list[str]:
        """Every method that has a finished run, in the study's order."""
        order = self.study["settings"]["methods"]
        return [m for m in order if m in self.runs] + sorted(m for m in self.runs if m not in order)

    @property
    def task(self) -> str:
        """"search" or "chains" (the chains task's json has no "kind")."""
        return self.study["settings"]["task"].get("kind", "chains")

    @property
    def ood_sets(self) -> list[str]:
        """The out-of-distribution sets' names, as the base evaluation lists them ([] on a task without)."""
        return list(self.base["student"].get("ood", {}))

    @property
    def common_seeds(self) -> list[int]:
        """The seeds every method finished (an interrupted study may have more runs of some methods)."""
        seeds = [{run.seed for run in runs} for runs in self.runs.values()]
        return sorted(set.intersection(*seeds)) if seeds else []

    def per_problem_scores(self) -> dict[tuple[str, str], Any]:
        """`(method, metric) -> [seeds, problems]` arrays over `common_seeds`, in seed order, of every method
        whose runs all carry per-problem scores (what `preregistration.judge` takes)."""
        import numpy as np

        scores = {}
        common = set(self.common_seeds)
        for method, runs in self.runs.items():
            tables = [run.evaluation["student"].get("per_problem", {}) for run in runs if run.seed in common]
            if not tables:
                continue
            for metric in tables[0]:
                if all(metric in table for table in tables):
                    scores[(method, metric)] = np.array([table[metric] for table in tables], dtype=np.float64)
        return scores

    @property
    def ks(self) -> list[int]:
        return list(range(1, self.n + 1))

    @property
    def n(self) -> int:
        return int(self.study["settings"]["eval_samples"])

    @property
    def token_kinds(self) -> list[str]:
        """The task's token-entropy kinds, as the base evaluation lists them."""
        return list(self.base["student"].get("token_entropy", {}).get("entropy", {}))

    @property
    def choice_kind(self) -> str:
        """The token kind that marks a free choice: "fork" on search, "free" on chains."""
        return next((k for k in ("fork", "free") if k in self.token_kinds), self.token_kinds[0])

    @property
    def prompts(self) -> list[str]:
        """The base's evaluated prompts: "student", then "teacher_<view>" for each teacher view."""
        return ["student", *sorted(key for key in self.base if key.startswith("teacher_"))]

    def base_scalars(self, prompt: str = "student") -> dict[str, float]:
        return evaluation_scalars(self.base[prompt])

    def spreads(self, method: str) -> dict[str, Spread]:
        return method_spreads(self.runs[method])

    @property
    def seed_count(self) -> int:
        """The most seeds any method ran."""
        return max(len(runs) for runs in self.runs.values())


def _tail_mean(values: Sequence[float]) -> float:
    tail = list(values)[-FINAL_WINDOW:]
    return sum(tail) / len(tail) if tail else math.nan


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
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
    if (folder / "tuning.json").exists():
        results.tuning = json.loads((folder / "tuning.json").read_text())
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

    @property
    def standard_error(self) -> float:
        return self.std / math.sqrt(len(self.values))

    def text(self, digits: int = 3) -> str:
        if len(self.values) == 1:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"

    def range_text(self, digits: int = 3) -> str:
        return f"{min(self.values):.{digits}f}–{max(self.values):.{digits}f}"

    def diff_text(self, digits: int = 3) -> str:
        """A difference: signed mean, then ± std with several values."""
        spread = f" ± {self.std:.{digits}f}" if len(self.values) > 1 else ""
        return f"{self.mean:+.{digits}f}{spread}"

    def per_seed_text(self, digits: int = 3) -> str:
        return ", ".join(f"{v:+.{digits}f}" for v in self.values)


def method_spreads(runs: Sequence[RunResult]) -> dict[str, Spread]:
    """Per metric that every run has, the spread of the runs' values over seeds."""
    per_run = [run.scalars() for run in runs]
    names = [name for name in per_run[0] if all(name in values for values in per_run)]
    return {name: Spread([values[name] for values in per_run]) for name in names}


def curve_band(runs: Sequence[RunResult], name: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """(steps, mean, min, max) over seeds of a per-step training metric, up to the shortest run."""
    curves = [run.curve(name) for run in runs]
    length = min(len(c) for c in curves)
    columns = [[c[i] for c in curves] for i in range(length)]
    return (list(range(1, length + 1)), [statistics.fmean(c) for c in columns], [min(c) for c in columns],
            [max(c) for c in columns])


def held_out_band(runs: Sequence[RunResult], key: str,
                  base_value: float) -> tuple[list[int], list[float], list[float], list[float]]:
    """(steps, mean, min, max) over seeds of a held-out curve (`RunResult.held_out_curve`); when the runs
    were evaluated at different steps, only the common ends (warm start, final) are kept."""
    curves = [run.held_out_curve(key, base_value) for run in runs]
    steps = curves[0][0]
    if any(c[0] != steps for c in curves):
        steps = [0, steps[-1]]
        curves = [([0, c[0][-1]], [c[1][0], c[1][-1]]) for c in curves]
    columns = list(zip(*(c[1] for c in curves), strict=True))
    return steps, [statistics.fmean(c) for c in columns], [min(c) for c in columns], [max(c) for c in columns]


def metric_label(metric: str, n: int) -> str:
    """The tables' name of a `RunResult.scalars` key."""
    labels = {"avg": f"Avg@{n}", "epistemic_per_response": "E(y)/response", "epistemic_per_1k": "E(y)/1k tokens",
              "step_acc": "StepAcc", "length": "length (tokens)", "marker_rate": "marker rate",
              "verification_gap": "verification gap", "train_entropy_final": "final training entropy",
              "train_clip_fraction": "clip fraction"}
    if metric.startswith("H_"):
        return f"H {metric[2:]} (held-out)"
    if metric.startswith("ood_"):
        split, _, rest = metric[4:].partition("_")
        return f"OOD {split} {metric_label(rest, n)}"
    return labels.get(metric, metric)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
