"""Evaluation metrics: accuracy over samples (Avg@k, pass@k, maj@k) and reasoning-health statistics.

All functions are pure and work on plain Python sequences; the entropy and length statistics also
take torch tensors. Conventions for empty inputs:

* accuracy metrics (:func:`avg_at_k`, :func:`pass_at_k_table`, :func:`maj_at_k`,
  :func:`macro_average`) raise ``ValueError`` on an empty benchmark: an accuracy of nothing is a bug
  upstream, not a number to report;
* health statistics (:func:`entropy_stats`, :func:`response_length`, :func:`truncation_rate`,
  :func:`repetition_rate`, :func:`epistemic_density`) return 0.0 for empty inputs, so that logging
  an all-masked batch never produces NaN; :func:`entropy_stats` and :func:`response_length` also
  report how many responses and tokens they saw, so a 0 from no data can be told apart.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from selfdistill.data.markers import EPISTEMIC_MARKERS

__all__ = [
    "EPISTEMIC_MARKERS",
    "avg_at_k",
    "entropy_stats",
    "epistemic_density",
    "epistemic_markers",
    "macro_average",
    "maj_at_k",
    "majority_vote",
    "pass_at_k",
    "pass_at_k_table",
    "repetition_rate",
    "response_length",
    "truncation_rate",
]

# --------------------------------------------------------------------------------------------------
# Accuracy over samples
# --------------------------------------------------------------------------------------------------


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem from ``n`` samples of which ``c`` are correct.

    ``1 - C(n-c, k) / C(n, k)``: the chance that ``k`` samples drawn without replacement from the
    ``n`` contain a correct one, computed as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)`` so that no
    binomial coefficient is formed. Requires ``1 <= k <= n`` and ``0 <= c <= n``.
    """
    n, c, k = _check_int("n", n), _check_int("c", c), _check_int("k", k)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"c must be in [0, n={n}], got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")
    if n - c < k:  # every draw of k samples contains a correct one
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_at_k_table(correct_counts: Sequence[int], n: int | Sequence[int], ks: Iterable[int]) -> dict[int, float]:
    """Mean unbiased pass@k over problems for each ``k`` in ``ks``.

    ``correct_counts[i]`` is the number of correct samples of problem ``i``; ``n`` is the number of
    samples per problem (one int for all, or one per problem). Every ``k`` must be <= each ``n``.
    """
    counts = list(correct_counts)
    if not counts:
        raise ValueError("pass_at_k_table needs at least one problem")
    sizes = [n] * len(counts) if isinstance(n, (int, np.integer)) else list(n)
    if len(sizes) != len(counts):
        raise ValueError(f"{len(counts)} correct counts but {len(sizes)} sample sizes")
    return {int(k): sum(pass_at_k(size, c, k) for size, c in zip(sizes, counts, strict=True)) / len(counts) for k in ks}


def avg_at_k(correct: Sequence[Sequence[float]]) -> float:
    """Avg@k: the mean over problems of the mean correctness of each problem's samples.

    ``correct[i][j]`` is the score (0/1, or partial credit) of sample ``j`` of problem ``i``; problems
    may have different numbers of samples, and each problem weighs the same. With equal sample counts
    this is the unbiased pass@1.
    """
    if len(correct) == 0:
        raise ValueError("avg_at_k needs at least one problem")
    total = 0.0
    for i, samples in enumerate(correct):
        if len(samples) == 0:
            raise ValueError(f"problem {i} has no samples")
        total += sum(float(s) for s in samples) / len(samples)
    return total / len(correct)


def majority_vote(answers: Sequence[str | None], *, key: Callable[[str], str] | None = None) -> int | None:
    """Index of the first sample carrying the most frequent answer, or None if all are None.

    None answers (nothing extracted) never vote. ``key`` maps an answer to the form compared (for
    example :func:`selfdistill.grading.normalize_answer`); by default answers are compared as given.
    Ties go to the answer that occurs first.
    """
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for j, answer in enumerate(answers):
        if answer is None:
            continue
        form = key(answer) if key is not None else answer
        counts[form] = counts.get(form, 0) + 1
        first.setdefault(form, j)
    if not counts:
        return None
    # max() keeps the first maximum it meets, and dicts iterate in first-occurrence order.
    winner = max(counts, key=counts.__getitem__)
    return first[winner]


def maj_at_k(
    answers: Sequence[Sequence[str | None]],
    correct: Sequence[Sequence[float]],
    *,
    k: int | None = None,
    key: Callable[[str], str] | None = None,
) -> float:
    """maj@k: the fraction of problems whose majority-voted answer is correct.

    ``answers[i][j]`` is the extracted answer of sample ``j`` of problem ``i`` (None if there was
    none) and ``correct[i][j]`` its grade. The vote (see :func:`majority_vote`) runs over the first
    ``k`` samples (default: all). The voted answer counts as correct if any sample carrying it was
    graded correct: samples with the same answer should share one grade, and taking any keeps a
    grading timeout on one of them from flipping the vote's score. A problem where every answer is
    None scores 0.
    """
    if len(answers) != len(correct):
        raise ValueError(f"{len(answers)} answer lists but {len(correct)} correctness lists")
    if len(answers) == 0:
        raise ValueError("maj_at_k needs at least one problem")
    if k is not None and _check_int("k", k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    total = 0.0
    for i, (sample_answers, sample_correct) in enumerate(zip(answers, correct, strict=True)):
        if len(sample_answers) != len(sample_correct):
            raise ValueError(f"problem {i}: {len(sample_answers)} answers but {len(sample_correct)} correctness flags")
        if k is not None and k > len(sample_answers):
            raise ValueError(f"problem {i} has {len(sample_answers)} samples, fewer than k={k}")
        window = len(sample_answers) if k is None else k
        forms = [None if a is None else (a if key is None else key(a)) for a in sample_answers[:window]]
        winner = majority_vote(forms)
        if winner is not None:
            total += max(float(sample_correct[j]) for j in range(window) if forms[j] == forms[winner])
    return total / len(answers)


def macro_average(per_benchmark: Mapping[str, float]) -> float:
    """Unweighted mean over benchmarks (each benchmark counts once, whatever its size)."""
    if not per_benchmark:
        raise ValueError("macro_average needs at least one benchmark")
    values = [float(v) for v in per_benchmark.values()]
    bad = [name for name, v in zip(per_benchmark, values, strict=True) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"non-finite score for {bad}")
    return sum(values) / len(values)


# --------------------------------------------------------------------------------------------------
# Reasoning health
# --------------------------------------------------------------------------------------------------


def _to_array(x: Any) -> np.ndarray | list[np.ndarray]:
    """A torch tensor or array becomes a 2-D float array; a list of rows becomes a list of 1-D arrays."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().float().cpu().numpy()
    if isinstance(x, np.ndarray):
        if x.ndim != 2:
            raise ValueError(f"expected a [B, T] array, got shape {tuple(x.shape)}")
        return x.astype(np.float64)
    return [
        np.asarray(row.detach().float().cpu().numpy() if hasattr(row, "detach") else row, dtype=np.float64).reshape(-1)
        for row in x
    ]


def _valid_rows(values: Any, mask: Any | None) -> list[np.ndarray]:
    """Per response, the values at positions where ``mask`` is set (all positions if no mask)."""
    rows = _to_array(values)
    masks = None if mask is None else _to_array(mask)
    if masks is None:
        return [np.asarray(r) for r in rows]
    if len(masks) != len(rows):
        raise ValueError(f"mask has {len(masks)} rows but values have {len(rows)}")
    out = []
    for b, (row, m) in enumerate(zip(rows, masks, strict=True)):
        if row.shape != m.shape:
            raise ValueError(f"row {b}: values have shape {row.shape} but mask has {m.shape}")
        out.append(row[m != 0])
    return out


def _top_count(length: int, top_frac: float) -> int:
    """How many of ``length`` tokens make the top fraction: ceil, at least 1 (float noise removed)."""
    return max(1, math.ceil(top_frac * length - 1e-9))


def entropy_stats(
    entropies: Any,
    mask: Any | None = None,
    *,
    top_frac: float = 0.2,
    reduction: Literal["response", "token"] = "response",
) -> dict[str, float]:
    """Mean token entropy, and mean entropy of the highest-entropy ``top_frac`` of tokens.

    Args:
        entropies: per-token entropies, a ``[B, T]`` tensor/array or a list of (possibly ragged) rows.
        mask: same shape, nonzero where the token belongs to the response (None: all tokens count).
        top_frac: fraction of tokens in the "top" group, in (0, 1]; a response of ``L`` tokens
            contributes its ``ceil(top_frac * L)`` highest-entropy tokens.
        reduction: ``"response"`` (default) computes both means within each response and then
            averages over responses, so every response weighs the same whatever its length (the
            health of a typical response); ``"token"`` pools all tokens of the batch and takes the
            top fraction of the pool (long responses weigh more).

    Returns ``{"mean", "top_mean", "num_responses", "num_tokens"}``; responses without tokens are
    left out, and with no tokens at all both means are 0.0. Non-finite entropies raise ValueError.
    """
    if not 0.0 < top_frac <= 1.0:
        raise ValueError(f"top_frac must be in (0, 1], got {top_frac}")
    if reduction not in ("response", "token"):
        raise ValueError(f"reduction must be 'response' or 'token', got {reduction!r}")
    rows = [r for r in _valid_rows(entropies, mask) if r.size > 0]
    num_tokens = sum(r.size for r in rows)
    if any(not np.isfinite(r).all() for r in rows):
        raise ValueError("entropies contain NaN or infinite values at unmasked positions")
    result = {"mean": 0.0, "top_mean": 0.0, "num_responses": float(len(rows)), "num_tokens": float(num_tokens)}
    if not rows:
        return result
    groups = rows if reduction == "response" else [np.concatenate(rows)]
    means, top_means = [], []
    for row in groups:
        top = _top_count(row.size, top_frac)
        means.append(float(row.mean()))
        top_means.append(float(np.partition(row, row.size - top)[row.size - top :].mean()))
    result["mean"] = sum(means) / len(means)
    result["top_mean"] = sum(top_means) / len(top_means)
    return result


def response_length(lengths_or_mask: Any) -> dict[str, float]:
    """Mean, min and max response length in tokens.

    Takes either one length per response (a flat sequence of ints) or a ``[B, T]`` response mask
    (tensor, array or list of rows), whose row sums are the lengths. Returns
    ``{"mean", "min", "max", "num_responses"}``, all 0.0 when there are no responses.
    """
    x = lengths_or_mask
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        lengths = (x != 0).sum(axis=1) if x.ndim == 2 else x.reshape(-1)
    elif len(x) > 0 and not isinstance(x[0], (int, float, np.number)):
        lengths = np.array([np.count_nonzero(np.asarray(row)) for row in x])
    else:
        lengths = np.asarray(x, dtype=np.float64).reshape(-1)
    if lengths.size == 0:
        return {"mean": 0.0, "min": 0.0, "max": 0.0, "num_responses": 0.0}
    if (lengths < 0).any():
        raise ValueError("response lengths must be >= 0")
    return {
        "mean": float(lengths.mean()),
        "min": float(lengths.min()),
        "max": float(lengths.max()),
        "num_responses": float(lengths.size),
    }


def truncation_rate(truncated: Sequence[bool] | Any) -> float:
    """Fraction of responses that hit the generation length limit (0.0 for no responses)."""
    flags = truncated.detach().cpu().numpy() if hasattr(truncated, "detach") else truncated
    flags = np.asarray(flags).reshape(-1)
    return float((flags != 0).mean()) if flags.size else 0.0


def repetition_rate(tokens_or_text: str | Sequence[int], n: int = 4) -> float:
    """Fraction of the n-grams of one response that repeat an earlier n-gram (seq-rep-n).

    ``1 - distinct n-grams / all n-grams``: 0.0 when no n-gram occurs twice, close to 1.0 for a
    response stuck in a loop. Token ids are used as given; a string is split on whitespace into
    words. A response shorter than ``n`` has no n-grams and scores 0.0.
    """
    if _check_int("n", n) < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if hasattr(tokens_or_text, "detach"):
        tokens_or_text = tokens_or_text.detach().cpu().reshape(-1).tolist()
    units = tokens_or_text.split() if isinstance(tokens_or_text, str) else list(tokens_or_text)
    total = len(units) - n + 1
    if total <= 0:
        return 0.0
    distinct = len({tuple(units[i : i + n]) for i in range(total)})
    return 1.0 - distinct / total


# Whole words, any case. "hmm" also matches its drawn-out spellings ("Hmmm"), which models write
# often; everything else must match exactly ("checked", "mighty" and "seemsthat" do not count).
_MARKER_RE = re.compile(
    r"\b(?:" + "|".join("hm{2,}" if w == "hmm" else re.escape(w) for w in EPISTEMIC_MARKERS) + r")\b",
    re.IGNORECASE,
)


def epistemic_markers(text: str) -> int:
    """Number of epistemic markers (:data:`EPISTEMIC_MARKERS`) in ``text``.

    Whole words, case-insensitive; "hmm" with any number (>= 2) of m's. Unlike the substring count
    of the SDPO evaluation script, "checked" or "likelihood" do not count.
    """
    return len(_MARKER_RE.findall(text))


def epistemic_density(text: str, num_tokens: int) -> float:
    """Epistemic markers per 1,000 tokens of a response of ``num_tokens`` tokens (0.0 if empty)."""
    if _check_int("num_tokens", num_tokens) < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    if num_tokens == 0:
        return 0.0
    return 1000.0 * epistemic_markers(text) / num_tokens
