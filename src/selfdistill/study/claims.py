"""The claims the search-task study tests, each judged from paired differences over seeds.

A claim is a record (`Claim`): methods a and b, a metric, and the claimed sign of a − b. One function
(`judge`) reads every claim with the same rule, on the paired difference seed by seed:

- "holds": the difference has the claimed sign in every seed and |mean| > 2 standard errors;
- "does not hold": the opposite sign in every seed and |mean| > 2 SE;
- "inconclusive": anything else, fewer than two shared seeds, or a method that did not run.

Two claim shapes bend that rule, and say so in the report: sign 0 ("a is not lower than b") holds
unless a − b is negative in every seed beyond 2 SE (it is the absence of a clear drop, not evidence
of equality); b None ("a is the best main method") holds when a has the highest mean and beats the
runner-up by the rule, and does not hold when any other main method beats a by the rule.
"""

from __future__ import annotations

from dataclasses import dataclass

from selfdistill.study.results import (
    Spread,
    StudyResults,
    direction,
    markdown_table,
    metric_label,
    paired_difference,
)

HOLDS, DOES_NOT_HOLD, INCONCLUSIVE = "holds", "does not hold", "inconclusive"


@dataclass(frozen=True)
class Claim:
    name: str
    text: str
    a: str
    b: str | None  # None: a against every other main method ("a is the best")
    metric: str  # a `RunResult.scalars` key
    sign: int  # +1: a − b > 0; −1: a − b < 0; 0: a − b not lower (see the module docstring)


CLAIMS = (
    # Kim et al.: self-distillation from a rich context suppresses epistemic verbalization.
    Claim("K1", "OPSD lowers E(y) per response vs GRPO", "opsd", "grpo", "epistemic_per_response", -1),
    Claim("K2", "OPSD shortens responses vs GRPO", "opsd", "grpo", "length", -1),
    Claim("K3", "OPSD raises in-distribution Avg@n vs GRPO", "opsd", "grpo", "avg", +1),
    Claim("K4", "OPSD lowers out-of-distribution Avg@n vs GRPO", "opsd", "grpo", "ood_avg", -1),
    Claim("K5", "the weak (answer-only) context hurts OOD less: OPSD-weak above OPSD on OOD Avg@n", "opsd_weak",
          "opsd", "ood_avg", +1),
    # DASD: its two ablations collapse one side each; DASD itself keeps both and comes out best.
    Claim("D1", "conformity (always pull) collapses E(y) vs GRPO", "conform", "grpo", "epistemic_per_response", -1),
    Claim("D2", "novelty (always push) collapses StepAcc vs GRPO", "novelty", "grpo", "step_acc", -1),
    Claim("D3", "DASD keeps E(y): not lower than GRPO in every seed", "dasd", "grpo", "epistemic_per_response", 0),
    Claim("D4", "DASD keeps StepAcc: not lower than GRPO in every seed", "dasd", "grpo", "step_acc", 0),
    Claim("D5", "DASD has the best in-distribution Avg@n of the main methods", "dasd", None, "avg", +1),
    Claim("D6", "DASD has the best out-of-distribution Avg@n of the main methods", "dasd", None, "ood_avg", +1),
)


@dataclass(frozen=True)
class ClaimResult:
    claim: Claim
    verdict: str  # HOLDS, DOES_NOT_HOLD or INCONCLUSIVE
    note: str  # why, in words
    against: str | None = None  # the b of the judged difference (for "best": the runner-up or the rival above)
    diff: Spread | None = None  # a − against, per shared seed


def judge(claim: Claim, results: StudyResults) -> ClaimResult:
    """The verdict on one claim (see the module docstring for the rule)."""
    missing = [m for m in (claim.a, claim.b) if m is not None and m not in results.runs]
    if missing:
        return ClaimResult(claim, INCONCLUSIVE, f"{' and '.join(missing)} did not run", claim.b)
    if claim.b is None:
        return _judge_best(claim, results)
    diff = paired_difference(results.runs[claim.a], results.runs[claim.b], claim.metric)
    return _judge_difference(claim, claim.b, diff)


def _judge_difference(claim: Claim, against: str, diff: Spread | None) -> ClaimResult:
    if diff is None:
        return ClaimResult(claim, INCONCLUSIVE, f"{claim.metric} not measured for both", against)
    if len(diff.values) < 2:
        return ClaimResult(claim, INCONCLUSIVE, "one shared seed: no spread", against, diff)
    sign = direction(diff)
    reading = {1: "higher in every seed, beyond 2 SE", -1: "lower in every seed, beyond 2 SE",
               0: "not the same sign in every seed beyond 2 SE"}[sign]
    if claim.sign == 0:  # "not lower": only a clear drop refutes it
        if sign < 0:
            return ClaimResult(claim, DOES_NOT_HOLD, reading, against, diff)
        return ClaimResult(claim, HOLDS, "no clear drop (not lower in every seed beyond 2 SE)", against, diff)
    result = HOLDS if sign == claim.sign else DOES_NOT_HOLD if sign == -claim.sign else INCONCLUSIVE
    return ClaimResult(claim, result, reading, against, diff)


def _judge_best(claim: Claim, results: StudyResults) -> ClaimResult:
    """a against every other main method with the metric: beaten by one -> does not hold; highest mean and
    clearly above the runner-up -> holds; otherwise inconclusive."""
    means = {m: s[claim.metric].mean for m in results.main_methods
             if claim.metric in (s := results.spreads(m))}
    if claim.a not in means or len(means) < 2:
        return ClaimResult(claim, INCONCLUSIVE, f"{claim.metric} not measured for {claim.a} and a rival")
    rivals = sorted((m for m in means if m != claim.a), key=means.get, reverse=True)
    diffs = {m: paired_difference(results.runs[claim.a], results.runs[m], claim.metric) for m in rivals}
    above = [m for m in rivals if diffs[m] is not None and direction(diffs[m]) < 0]
    if above:
        return ClaimResult(claim, DOES_NOT_HOLD, f"{above[0]} is above {claim.a} in every seed, beyond 2 SE",
                           above[0], diffs[above[0]])
    runner_up = rivals[0]
    if means[claim.a] <= means[runner_up]:
        note = f"not the highest mean: {runner_up} {means[runner_up]:.3f} vs {claim.a} {means[claim.a]:.3f}"
        return ClaimResult(claim, INCONCLUSIVE, note, runner_up, diffs[runner_up])
    result = _judge_difference(claim, runner_up, diffs[runner_up])
    return ClaimResult(claim, result.verdict, f"highest mean; against the runner-up {runner_up}: {result.note}",
                       runner_up, result.diff)


def claims_section(results: StudyResults) -> str:
    """The report's "Claims" section: the rule, then one row per claim."""
    if results.task != "search":
        return ("## Claims\n\nThe claims (Kim et al.'s on OPSD, DASD's on its ablations) need the search task: "
                "its epistemic markers, StepAcc and out-of-distribution split. This study ran the "
                f"{results.task} task.")
    rows = []
    for claim in CLAIMS:
        result = judge(claim, results)
        pair = f"{claim.a} − {result.against}" if result.against else claim.a
        numbers = ("–", "–") if result.diff is None else (result.diff.diff_text(), result.diff.per_seed_text())
        rows.append([claim.name, claim.text.replace("Avg@n", f"Avg@{results.n}"), pair,
                     metric_label(claim.metric, results.n), *numbers, f"**{result.verdict}**", result.note])
    header = ["", "claim", "difference", "metric", "mean diff ± std", "per seed", "verdict", "why"]
    return "\n".join([
        "## Claims",
        "",
        "Each claim is judged on its paired difference over seeds: **holds** when it has the claimed sign in every "
        "seed and |mean| > 2 standard errors, **does not hold** when it has the opposite sign in every seed and "
        "|mean| > 2 SE, **inconclusive** otherwise (or with fewer than two seeds, or a method that did not run). "
        "D3 and D4 claim \"not lower\": they hold unless DASD is below GRPO in every seed beyond 2 SE, so a "
        "\"holds\" there means no clear drop, not a shown equality. D5 and D6 hold when DASD has the highest "
        "mean of the main methods and is above the runner-up by the rule, and do not hold when another main "
        "method is above DASD by the rule.",
        "",
        markdown_table(header, rows),
    ])
