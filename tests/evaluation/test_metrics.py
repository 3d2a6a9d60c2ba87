"""Tests of the evaluation metrics against brute-force references and hand-worked cases."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import torch

from selfdistill.evaluation.metrics import (
    EPISTEMIC_MARKERS,
    avg_at_k,
    entropy_stats,
    epistemic_density,
    epistemic_markers,
    macro_average,
    maj_at_k,
    majority_vote,
    pass_at_k,
    pass_at_k_table,
    repetition_rate,
    response_length,
    truncation_rate,
)
from selfdistill.grading import normalize_answer

# ---- pass@k ----------------------------------------------------------------------------------------


def _pass_at_k_brute_force(n: int, c: int, k: int) -> float:
    """Fraction of the k-subsets of n samples (the first c correct) that hold a correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_enumeration(n: int) -> None:
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k_brute_force(n, c, k), abs=1e-12)


def test_pass_at_k_closed_forms_and_large_n() -> None:
    assert pass_at_k(16, 0, 16) == 0.0
    assert pass_at_k(16, 16, 1) == 1.0
    assert pass_at_k(16, 4, 1) == pytest.approx(4 / 16)
    # Large n: the product form stays accurate where binomials would overflow floats.
    n, c, k = 2000, 3, 100
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize(("n", "c", "k"), [(4, 5, 1), (4, -1, 1), (4, 2, 5), (4, 2, 0), (0, 0, 1)])
def test_pass_at_k_rejects_bad_arguments(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_pass_at_k_rejects_non_integers() -> None:
    with pytest.raises(TypeError):
        pass_at_k(4.0, 2, 1)  # type: ignore[arg-type]


def test_pass_at_k_table() -> None:
    table = pass_at_k_table([0, 2, 4], 4, [1, 2, 4])
    assert table[1] == pytest.approx((0 + 0.5 + 1) / 3)
    assert table[2] == pytest.approx((0 + (1 - 1 / 6) + 1) / 3)
    assert table[4] == pytest.approx(2 / 3)
    per_problem_n = pass_at_k_table([1, 1], [2, 4], [2])
    assert per_problem_n[2] == pytest.approx((1.0 + 0.5) / 2)
    with pytest.raises(ValueError):
        pass_at_k_table([], 4, [1])
    with pytest.raises(ValueError):
        pass_at_k_table([1, 2], [4], [1])
    with pytest.raises(ValueError):
        pass_at_k_table([1], 4, [8])


# ---- Avg@k, maj@k, macro ---------------------------------------------------------------------------


def test_avg_at_k_weighs_problems_equally() -> None:
    assert avg_at_k([[1, 0, 0, 1], [1, 1]]) == pytest.approx((0.5 + 1.0) / 2)
    assert avg_at_k([[0.0]]) == 0.0
    with pytest.raises(ValueError):
        avg_at_k([])
    with pytest.raises(ValueError, match="problem 1"):
        avg_at_k([[1], []])


def test_avg_at_k_equals_mean_pass_at_1() -> None:
    rng = random.Random(0)
    correct = [[rng.random() < 0.3 for _ in range(8)] for _ in range(20)]
    expected = pass_at_k_table([sum(row) for row in correct], 8, [1])[1]
    assert avg_at_k(correct) == pytest.approx(expected)


def test_majority_vote() -> None:
    assert majority_vote(["1", "2", "2", "1", None, None, None]) == 0  # tie: "1" came first
    assert majority_vote(["3", "2", "2"]) == 1
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None
    assert majority_vote([r"\dfrac12", r"\frac12", "7"], key=normalize_answer) == 0


def test_maj_at_k() -> None:
    answers = [
        ["5", "4", "5", None],  # "5" wins, and is correct
        [None, None, None, None],  # nothing to vote: 0
        ["1", "2", "2", "1"],  # tie: "1" (first) wins; wrong
        ["7", "8", "8", "8"],  # first 2 samples: tie, "7" wins; all 4: "8" wins
    ]
    correct = [[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 1]]
    assert maj_at_k(answers, correct) == pytest.approx(2 / 4)
    assert maj_at_k(answers, correct, k=2) == pytest.approx(1 / 4)  # "5" vs "4": "5"; "7" wins row 4


def test_maj_at_k_counts_the_vote_correct_if_any_carrier_is() -> None:
    # The second "3" lost its grade to a timeout; the vote is still right.
    assert maj_at_k([["3", "3", "4"]], [[0, 1, 0]]) == 1.0
    # key merges equal answers written differently.
    assert maj_at_k([[r"\dfrac12", "7", r"\frac12"]], [[1, 0, 1]], key=normalize_answer) == 1.0
    assert maj_at_k([[r"\dfrac12", "7", "7"]], [[1, 0, 0]], key=normalize_answer) == 0.0


def test_maj_at_k_validation() -> None:
    with pytest.raises(ValueError):
        maj_at_k([], [])
    with pytest.raises(ValueError):
        maj_at_k([["1"]], [[1], [0]])
    with pytest.raises(ValueError, match="problem 0"):
        maj_at_k([["1", "2"]], [[1]])
    with pytest.raises(ValueError, match="k=3"):
        maj_at_k([["1", "2"]], [[1, 0]], k=3)


def test_macro_average() -> None:
    assert macro_average({"aime24": 0.1, "math500": 0.9, "gsm8k": 0.8}) == pytest.approx(0.6)
    with pytest.raises(ValueError):
        macro_average({})
    with pytest.raises(ValueError, match="aime24"):
        macro_average({"aime24": float("nan"), "math500": 0.5})


# ---- entropy -------------------------------------------------------------------------------------


def test_entropy_stats_per_response() -> None:
    ent = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 9.0], [0.5, 0.5, 7.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]])  # 9.0 and 7.0 are padding
    stats = entropy_stats(ent, mask, top_frac=0.2)
    # Response 1: mean 3, top ceil(0.2*5)=1 token -> 5. Response 2: mean 0.5, top 1 token -> 0.5.
    assert stats["mean"] == pytest.approx((3.0 + 0.5) / 2)
    assert stats["top_mean"] == pytest.approx((5.0 + 0.5) / 2)
    assert stats["num_responses"] == 2 and stats["num_tokens"] == 7


def test_entropy_stats_token_reduction_pools_tokens() -> None:
    rows = [[1.0, 2.0, 3.0, 4.0, 5.0], [0.5, 0.5]]
    stats = entropy_stats(rows, reduction="token", top_frac=0.3)
    assert stats["mean"] == pytest.approx(16.0 / 7)
    assert stats["top_mean"] == pytest.approx((5.0 + 4.0 + 3.0) / 3)  # ceil(0.3 * 7) = 3


def test_entropy_stats_inputs_agree() -> None:
    gen = torch.Generator().manual_seed(0)
    ent = torch.rand(4, 15, generator=gen) * 3
    mask = torch.rand(4, 15, generator=gen) > 0.3
    ragged = [ent[b][mask[b]].tolist() for b in range(4)]
    for reduction in ("response", "token"):
        a = entropy_stats(ent, mask, reduction=reduction)
        b = entropy_stats(ent.numpy(), mask.numpy(), reduction=reduction)
        c = entropy_stats(ragged, reduction=reduction)
        d = entropy_stats([ent[b][mask[b]].to(torch.bfloat16).float() for b in range(4)], reduction=reduction)
        assert d["mean"] == pytest.approx(c["mean"], rel=1e-2)
        for key in ("mean", "top_mean"):
            assert a[key] == pytest.approx(b[key]) == pytest.approx(c[key])
    # The naive definition: sort each response, take its top ceil(0.2 L) tokens.
    tops = []
    for row in ragged:
        top = sorted(row, reverse=True)[: max(1, math.ceil(0.2 * len(row) - 1e-9))]
        tops.append(sum(top) / len(top))
    assert entropy_stats(ent, mask)["top_mean"] == pytest.approx(sum(tops) / len(tops))


def test_entropy_stats_top_count_has_no_float_noise() -> None:
    # 0.2 * 15 is 3.0000000000000004 in floats; the top group must still be 3 tokens.
    row = [float(i) for i in range(15)]
    assert entropy_stats([row])["top_mean"] == pytest.approx((14 + 13 + 12) / 3)


def test_entropy_stats_empty_and_invalid() -> None:
    empty = entropy_stats(torch.zeros(2, 3), torch.zeros(2, 3))
    assert empty == {"mean": 0.0, "top_mean": 0.0, "num_responses": 0.0, "num_tokens": 0.0}
    assert entropy_stats([])["mean"] == 0.0
    # A response with no tokens is left out rather than counted as zero entropy.
    assert entropy_stats([[2.0, 4.0], []])["mean"] == pytest.approx(3.0)
    with pytest.raises(ValueError, match="top_frac"):
        entropy_stats([[1.0]], top_frac=0.0)
    with pytest.raises(ValueError, match="NaN"):
        entropy_stats([[1.0, float("nan")]])
    # NaN under the mask is ignored.
    assert entropy_stats(torch.tensor([[1.0, float("nan")]]), torch.tensor([[1, 0]]))["mean"] == 1.0
    with pytest.raises(ValueError, match="shape"):
        entropy_stats(torch.zeros(2, 3), torch.zeros(2, 4))


# ---- lengths, truncation, repetition -------------------------------------------------------------------


def test_response_length() -> None:
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    expected = {"mean": 2.0, "min": 1.0, "max": 3.0, "num_responses": 2.0}
    assert response_length(mask) == expected
    assert response_length([3, 1]) == expected
    assert response_length([[1, 1, 1], [1]]) == expected
    assert response_length(np.array([3, 1])) == expected
    assert response_length([]) == {"mean": 0.0, "min": 0.0, "max": 0.0, "num_responses": 0.0}
    with pytest.raises(ValueError):
        response_length([3, -1])


def test_truncation_rate() -> None:
    assert truncation_rate([True, False, False, True]) == 0.5
    assert truncation_rate(torch.tensor([True, True, False])) == pytest.approx(2 / 3)
    assert truncation_rate([]) == 0.0


def test_repetition_rate() -> None:
    assert repetition_rate([1, 2, 3, 4, 5, 6], n=2) == 0.0
    # 2-grams of 1 2 1 2 1 2: (1,2) (2,1) (1,2) (2,1) (1,2) -> 2 distinct of 5.
    assert repetition_rate([1, 2, 1, 2, 1, 2], n=2) == pytest.approx(1 - 2 / 5)
    assert repetition_rate("so so so so so", n=1) == pytest.approx(1 - 1 / 5)
    assert repetition_rate(torch.tensor([7, 7, 7, 7, 7]), n=4) == pytest.approx(1 - 1 / 2)
    looping = "let me check again . " * 50
    assert repetition_rate(looping) > 0.9
    assert repetition_rate([1, 2, 3], n=4) == 0.0
    assert repetition_rate("") == 0.0
    with pytest.raises(ValueError):
        repetition_rate([1, 2], n=0)


# ---- epistemic markers -----------------------------------------------------------------------------


def test_epistemic_marker_list() -> None:
    assert EPISTEMIC_MARKERS == (
        "wait",
        "hmm",
        "perhaps",
        "maybe",
        "actually",
        "alternatively",
        "seems",
        "might",
        "likely",
        "check",
    )


@pytest.mark.parametrize(
    ("text", "count"),
    [
        ("Wait, maybe I should CHECK. Hmm. Perhaps it seems likely; actually, alternatively it might.", 10),
        ("Hmmm, hmmmm... hm.", 2),  # drawn-out "hmm" counts, a single "hm" does not
        ("I checked it, a mighty likelihood; seemingly awaited, checking unlikely.", 0),
        ("check-in, re-check, (maybe)", 3),
        ("", 0),
    ],
)
def test_epistemic_markers(text: str, count: int) -> None:
    assert epistemic_markers(text) == count


def test_epistemic_density() -> None:
    assert epistemic_density("wait wait maybe", 600) == pytest.approx(5.0)
    assert epistemic_density("", 0) == 0.0
    assert epistemic_density("no markers here", 3) == 0.0
    with pytest.raises(ValueError):
        epistemic_density("wait", -1)
