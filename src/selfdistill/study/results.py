"""A finished (or partly finished) study folder read back from disk, and its aggregation over seeds.

Everything comes from study.json, base/eval.json and runs/*/eval.json + metrics.jsonl, so a report can
be rebuilt from the folder alone. Spreads are the sample standard deviation over seeds (ddof = 1; 0 with
a single seed) and the min–max range; paired differences compare two methods seed by seed (run k of
every method shares seed k: data order and rollout seeds).

Both study tasks share one eval.json schema: "search" adds an out-of-distribution row ("ood") and
per-line measurements (StepAcc, ...); "chains" has neither. Token-entropy kinds differ by task
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

from selfdistill.study.settings import SWEEP_METHODS

EVAL_FILE = "eval.json"
METRICS_FILE = "metrics.jsonl"
# How many final training steps are averaged for "final" training entropy / reward.
FINAL_WINDOW = 5
# held_out_curve key -> the scalar holding the same number at the final evaluation.
CURVE_SCALARS = {"avg@n": "avg", "epistemic_per_response": "epistemic_per_response", "step_acc": "step_acc",
                 "ood_avg@n": "ood_avg", "ood_epistemic_per_response": "ood_epistemic_per_response",
                 "ood_step_acc": "ood_step_acc"}


def _pass_keys(summary: dict[str, Any]) -> list[str]:
    return [key for key in summary if key.startswith("pass@")]


def evaluation_scalars(part: dict[str, Any]) -> dict[str, float]:
    """The numbers of one model under one prompt ({"summary", "token_entropy"[, "ood"]}) that the tables use:
    avg, pass@k, length, E(y) per response and per 1k tokens, step_acc, H_<kind>, and ood_* when present."""
    summary = part["summary"]
    values: dict[str, Any] = {
        "avg": summary["avg@n"],
        **{key: summary[key] for key in _pass_keys(summary)},
        "length": summary["mean_length"],
        "epistemic_per_response": summary.get("epistemic_per_response"),
        "epistemic_per_1k": summary.get("epistemic_per_1k"),
        "step_acc": summary.get("step_acc"),
    }
    for kind, entropy in part.get("token_entropy", {}).get("entropy", {}).items():
        values[f"H_{kind}"] = entropy  # None when the kind had no tokens: dropped below
    ood = part.get("ood")
    if ood:
        n = summary.get("n") or max(int(key[5:]) for key in _pass_keys(ood))
        values.update({"ood_avg": ood["avg@n"], f"ood_pass@{n}": ood.get(f"pass@{n}"), "ood_length": ood["mean_length"],
                       "ood_epistemic_per_response": ood.get("epistemic_per_response"),
                       "ood_step_acc": ood.get("step_acc")})
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

    @property
    def methods(self) -> list[str]:
        """Every method that has a finished run, in the study's order."""
        order = self.study["settings"]["methods"]
        return [m for m in order if m in self.runs] + sorted(m for m in self.runs if m not in order)

    @property
    def main_methods(self) -> list[str]:
        """The methods without DASD's sweep variants (those get their own section)."""
        return [m for m in self.methods if m not in SWEEP_METHODS]

    @property
    def sweep_methods(self) -> list[str]:
        return [m for m in self.methods if m in SWEEP_METHODS]

    @property
    def task(self) -> str:
        """"search" or "chains" (the chains task's json has no "kind")."""
        return self.study["settings"]["task"].get("kind", "chains")

    @property
    def has_ood(self) -> bool:
        return bool(self.base["student"].get("ood"))

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


def paired_difference(a: Sequence[RunResult], b: Sequence[RunResult], metric: str) -> Spread | None:
    """Per shared seed where both runs have the metric, metric(a) − metric(b); None when there is none."""
    b_by_seed = {run.seed: run.scalars() for run in b}
    diffs = []
    for run in a:
        values, other = run.scalars(), b_by_seed.get(run.seed, {})
        if metric in values and metric in other:
            diffs.append(values[metric] - other[metric])
    return Spread(diffs) if diffs else None


def direction(diff: Spread) -> int:
    """+1 / −1 when a paired difference is positive / negative in every seed (at least two) and its mean
    exceeds twice its standard error; 0 when it is not told apart from the seed noise."""
    if len(diff.values) < 2:
        return 0
    same_sign = all(v > 0 for v in diff.values) or all(v < 0 for v in diff.values)
    if same_sign and abs(diff.mean) > 2 * diff.standard_error:
        return 1 if diff.mean > 0 else -1
    return 0


def verdict(diff: Spread) -> str:
    """A plain word on whether a paired difference stands out from the seed noise."""
    if len(diff.values) < 2:
        return "one seed: no spread"
    if all(v == 0 for v in diff.values):
        return "identical in every seed"
    sign = direction(diff)
    if sign:
        return f"{'higher' if sign > 0 else 'lower'} in every seed"
    if all(v > 0 for v in diff.values) or all(v < 0 for v in diff.values):
        return f"same sign in all {len(diff.values)} seeds, but within 2 SE"
    return "within seed noise (signs differ)"


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
    labels = {"avg": f"Avg@{n}", "ood_avg": f"OOD Avg@{n}", "epistemic_per_response": "E(y)/response",
              "epistemic_per_1k": "E(y)/1k tokens", "step_acc": "StepAcc", "length": "length (tokens)",
              "ood_step_acc": "OOD StepAcc", "ood_length": "OOD length", "ood_epistemic_per_response":
              "OOD E(y)/response", "train_entropy_final": "final training entropy",
              "train_clip_fraction": "clip fraction"}
    if metric.startswith("H_"):
        return f"H {metric[2:]} (held-out)"
    return labels.get(metric, metric)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
