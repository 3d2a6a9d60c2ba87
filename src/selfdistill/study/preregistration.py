"""The third study's claims, fixed before any run that judges them (issue #23, item 1): each claim, its matched
control, the per-problem score it is judged on, the test and its threshold, the seeds, and the rule that turns
the numbers into a verdict. The report names the commit of this file; changing a claim after the result runs
means a new pre-registration, said as such.

The rule (`judge`): for each claim, the paired difference a − b over every training seed × held-out problem,
resampled by a crossed bootstrap (`statistics.paired_bootstrap`, seeds and problems both drawn):

- `greater` / `less`: the one-sided bootstrap p-value of "a − b ≤ 0" (resp. "≥ 0");
- `equivalent` ("keeps X"): two one-sided tests that |a − b| < `margin` (`statistics.equivalence`), so that a
  "keeps" claim can fail.

Holm's correction runs over the whole family (every claim in `CLAIMS`, the ones whose methods did not run
counted with p = 1, so the family is the one registered here, not the one that happened to run). A claim
**holds** when its Holm-adjusted p < `ALPHA`. Otherwise it is **reversed** when the 95 % interval lies wholly on
the other side of 0 (directional claims) or wholly outside ±margin (equivalence claims), and **not shown**
otherwise. Tuning of any knob uses `TUNING_SEEDS` and the validation slice, never `CLAIM_SEEDS` or the held-out
and out-of-distribution sets.

Registrations (each a commit of this file before the runs it governs; the report names the commit):

1. 2026-12-03 (`c7228f4`): the claims below; the tuning chose DASD's beta alone.
2. 2026-12-04: the claims, statistics and seeds unchanged; the tuning chooses DASD's beta **and** its floor on
   the delta scale together (`TUNED_KNOBS`, grid `settings.TUNING_GRID`), because a check on the validation side
   after the first registration's runs found that the floor's library default (0.1, from the second study's
   tainted sweep) was not the validation choice. Library defaults are set from this tuning's choice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from selfdistill.study.statistics import DEFAULT_RESAMPLES, Interval, equivalence, holm, paired_bootstrap

ALPHA = 0.05
"""Family-wise error rate of the claim family (Holm)."""
CONFIDENCE = 0.95
"""The reported interval of every difference."""
CLAIM_SEEDS = (0, 1, 2, 3, 4)
"""Training seeds the claims are judged on (at least 5)."""
TUNING_SEEDS = (100, 101, 102)
"""Training seeds any tuning (the DASD sweep included) uses, with the validation slice cut from the RL pool."""
TUNED_KNOBS = {"beta": "smaller", "scale_floor": "larger"}
"""The knobs the tuning runs choose (DASD's beta and its floor on the delta scale), each with the side a tie
goes to: the weaker intervention (a smaller beta, a larger floor). The chosen values go to every DASD-family
claim run."""
TESTS = ("greater", "less", "equivalent")
HOLDS, REVERSED, NOT_SHOWN, NOT_RUN = "holds", "reversed", "not shown", "not run"


@dataclass(frozen=True)
class Hypothesis:
    """One claim: method `a` against its matched control `b` on the per-problem score `metric`.

    test: `greater` (a − b > 0), `less` (a − b < 0) or `equivalent` (|a − b| < margin). control: what `b` differs
    from `a` in, and nothing else (the claim is about exactly that)."""

    name: str
    text: str
    a: str
    b: str
    metric: str
    test: str
    control: str
    margin: float = 0.0

    def __post_init__(self) -> None:
        if self.test not in TESTS:
            raise ValueError(f"{self.name}: test must be one of {TESTS}, got {self.test!r}")
        if (self.test == "equivalent") != (self.margin > 0):
            raise ValueError(f"{self.name}: an equivalence claim needs a positive margin, and only it has one")
        if self.a == self.b:
            raise ValueError(f"{self.name}: a claim compares two methods, got {self.a!r} twice")


# The controls several claims share (what b differs from a in).
AT_BETA_ZERO = "GRPO with token-mean aggregation: DASD at beta = 0"
PAPERS_COMPARISON = "the verifier's reward instead of the rich teacher (the paper's comparison)"


# Per-problem scores the study's evaluation writes for every run (each an [seeds, problems] array):
#   avg            in-distribution Avg@k of the problem
#   ood_breadth    out-of-distribution Avg@k, more candidates than in training
#   ood_depth      out-of-distribution Avg@k, longer checks than in training
#   epistemic      the problem's marker rate: optional E(y) markers said per failed check followed by another
#                  try, pooled over its k responses (NaN when none failed and retried: `complete_columns`)
#   step_acc       share of the step lines of the problem's k responses that are verifiably right
CLAIMS: tuple[Hypothesis, ...] = (
    # DASD's direction routing, against the controls that differ only in it.
    Hypothesis("D1", "DASD raises out-of-distribution (breadth) Avg@k over GRPO reduced as DASD is",
               "dasd", "grpo_token_mean", "ood_breadth", "greater",
               control=AT_BETA_ZERO),
    Hypothesis("D2", "DASD raises out-of-distribution (depth) Avg@k over GRPO reduced as DASD is",
               "dasd", "grpo_token_mean", "ood_depth", "greater",
               control=AT_BETA_ZERO),
    Hypothesis("D3", "the entropy routing matters: DASD above DASD with omega shuffled within each rollout (OOD "
               "breadth)", "dasd", "dasd_shuffled", "ood_breadth", "greater",
               control="the same term, size and signal, omega permuted within each rollout"),
    Hypothesis("D4", "DASD keeps in-distribution Avg@k (within 0.02 of GRPO reduced as DASD is)",
               "dasd", "grpo_token_mean", "avg", "equivalent", margin=0.02,
               control=AT_BETA_ZERO),
    Hypothesis("D5", "DASD keeps verbalized doubt (marker rate within 0.05 of GRPO reduced as DASD is)",
               "dasd", "grpo_token_mean", "epistemic", "equivalent", margin=0.05,
               control=AT_BETA_ZERO),
    Hypothesis("D6", "always pulling (conform) lowers verbalized doubt against DASD",
               "conform", "dasd", "epistemic", "less",
               control="DASD's beta and signal with omega = +1 on every token"),
    Hypothesis("D7", "always pushing (novelty) lowers StepAcc against DASD",
               "novelty", "dasd", "step_acc", "less",
               control="DASD's beta and signal with omega = -1 on every token"),
    # Kim et al.: self-distillation from a rich context suppresses verbalized doubt and hurts OOD.
    Hypothesis("K1", "OPSD lowers verbalized doubt against GRPO", "opsd", "grpo", "epistemic", "less",
               control=PAPERS_COMPARISON),
    Hypothesis("K2", "OPSD lowers out-of-distribution (depth) Avg@k against GRPO", "opsd", "grpo", "ood_depth",
               "less", control=PAPERS_COMPARISON),
    Hypothesis("K3", "a poorer context hurts less: OPSD with the answer-only teacher above OPSD with the full "
               "search trace (OOD depth)", "opsd_weak", "opsd", "ood_depth", "greater",
               control="the same method, the teacher shown the answer only instead of the trace"),
)


def choose_tuned(validation_avg: Mapping[str, Sequence[float]],
                 knob_values: Mapping[str, Mapping[str, float]]) -> str:
    """The tuning rule: the tuning method with the highest mean validation Avg@k over the tuning seeds; a tie
    (equal means) goes to the weaker intervention, knob by knob in `TUNED_KNOBS` order (the smaller beta, then
    the larger floor). knob_values: method -> {knob: its value} for every knob of `TUNED_KNOBS`."""
    if not validation_avg:
        raise ValueError("no tuning results to choose from")

    def rank(method: str) -> tuple[float, ...]:
        weaker = [-knob_values[method][knob] if side == "smaller" else knob_values[method][knob]
                  for knob, side in TUNED_KNOBS.items()]
        return (float(np.mean(validation_avg[method])), *map(float, weaker))

    return max(validation_avg, key=rank)


def complete_columns(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`a`, `b` ([seeds, problems]) without the problems that lack a score (NaN) in any seed of either: a
    paired claim compares the problems both methods were scored on (e.g. the marker rate of a problem whose
    samples never failed a check is undefined)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired scores must have one shape, got {a.shape} and {b.shape}")
    keep = ~(np.isnan(a).any(axis=0) | np.isnan(b).any(axis=0))  # [problems]
    return a[:, keep], b[:, keep]


@dataclass(frozen=True)
class Verdict:
    claim: Hypothesis
    verdict: str
    interval: Interval | None  # the CONFIDENCE interval of a − b (None: not run)
    p: float  # the test's own p-value (1 when not run)
    p_holm: float  # Holm-adjusted over the family


def _test(claim: Hypothesis, a: np.ndarray, b: np.ndarray, resamples: int, seed: int) -> tuple[Interval, float, str]:
    """(the CONFIDENCE interval of a − b, the test's p-value, the verdict if it is not significant)."""
    interval = paired_bootstrap(a, b, confidence=CONFIDENCE, resamples=resamples, seed=seed)
    if claim.test == "equivalent":
        _, p = equivalence(a, b, margin=claim.margin, alpha=ALPHA, resamples=resamples, seed=seed)
        outside = interval.low >= claim.margin or interval.high <= -claim.margin
        return interval, p, REVERSED if outside else NOT_SHOWN
    if claim.test == "greater":
        return interval, interval.below, REVERSED if interval.high < 0 else NOT_SHOWN
    return interval, interval.above, REVERSED if interval.low > 0 else NOT_SHOWN


def judge(scores: Mapping[tuple[str, str], np.ndarray], claims: tuple[Hypothesis, ...] = CLAIMS, *,
          resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> list[Verdict]:
    """Every claim's verdict by the module's rule. scores: `(method, metric) -> [seeds, problems]` per-problem
    scores, the seeds in the same order for every method; a claim whose pair is missing, or shares no problem
    scored in every seed (`complete_columns`), is `not run`."""
    tested: dict[str, tuple[Interval, float, str]] = {}
    for claim in claims:
        a, b = scores.get((claim.a, claim.metric)), scores.get((claim.b, claim.metric))
        if a is not None and b is not None:
            a, b = complete_columns(a, b)
            if a.shape[1]:
                tested[claim.name] = _test(claim, a, b, resamples, seed)
    adjusted = holm({claim.name: tested[claim.name][1] if claim.name in tested else 1.0 for claim in claims})
    verdicts = []
    for claim in claims:
        if claim.name not in tested:
            verdicts.append(Verdict(claim, NOT_RUN, None, 1.0, adjusted[claim.name]))
            continue
        interval, p, otherwise = tested[claim.name]
        verdict = HOLDS if adjusted[claim.name] < ALPHA else otherwise
        verdicts.append(Verdict(claim, verdict, interval, p, adjusted[claim.name]))
    return verdicts
