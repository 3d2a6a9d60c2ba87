"""selfdistill.grading.extract: boxed answers, fallbacks, the linear bound, and answer normalization."""

from __future__ import annotations

import time

import pytest

from selfdistill.grading import extract_answer, last_boxed, normalize_answer
from tests.grading.helpers import BOUNDED


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"first \boxed{1} then \boxed{2}", "2"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"so $\boxed{\left( 3, \frac{\pi}{2} \right)}$.", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"\fbox{7} and earlier \boxed{3}", "3"),
        (r"\boxed{3} then \fbox{7}", "7"),
        (r"hence \boxed 5$.", "5"),
        (r"hence \boxed 42", "42"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\boxed{a \} b}", r"a \} b"),
        (r"\boxed{ 12 }", "12"),
        (r"\boxed{\boxed{9}}", "9"),
        # The last box is cut off (truncated generation): the last complete one is used.
        (r"\boxed{4} wait, actually \boxed{\frac{1}{", "4"),
        # A longer command that starts with \boxed is not a box.
        (r"\boxed{6} \boxedsymbol{x}", "6"),
    ],
)
def test_extract_boxed(text: str, expected: str) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is 12.", "12"),
        ("so the final answer is $\\frac{3}{4}$.", "\\frac{3}{4}"),
        ("The answer is 3. Let me double-check: yes.", "3"),
        ("The answer is 3.5", "3.5"),
        ("The answer is 1.\nHmm, no. The final answer is: 2.", "2"),
        ("**The final answer is 17**", "17"),
        ("Janet makes 9 * 2 = 18 dollars.\n#### 18", "18"),
        ("#### 1,450,000", "1450000"),
        ("#### 5\nlater #### 6", "6"),
        # The phrase beats ####, and a box beats both.
        ("The answer is 4.\n#### 5", "4"),
        ("The answer is 4.\n#### 5 \\boxed{6}", "6"),
    ],
)
def test_extract_fallbacks(text: str, expected: str) -> None:
    assert extract_answer(text) == expected


def test_extract_without_fallback_and_nothing_found() -> None:
    assert extract_answer("The answer is 12.", fallback=False) is None
    assert extract_answer("#### 12", fallback=False) is None
    assert extract_answer(r"\boxed{12}", fallback=False) == "12"
    assert extract_answer("no answer here") is None
    assert extract_answer("") is None
    assert extract_answer(r"\boxed{}") is None
    assert extract_answer(r"\boxed{  }") is None
    assert extract_answer(r"only an unclosed \boxed{3") is None


def test_extract_is_linear_on_huge_inputs() -> None:
    # Each unclosed box would rescan to the end of the text without the scan limit: quadratic.
    many_unclosed = "\\boxed{" * 150_000
    one_mb = "x" * 1_000_000 + r"\boxed{7}" + " y" * 1000
    start = time.perf_counter()
    assert extract_answer(many_unclosed) is None
    assert extract_answer(one_mb) == "7"
    assert extract_answer("The answer is " + "9" * 1_000_000) == "9" * 1_000_000
    assert time.perf_counter() - start < BOUNDED  # quadratic rescans would take hours here


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (r"\dfrac{1}{2}", r"\frac{1}{2}"),
        (r"\tfrac12", r"\frac12"),
        (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"),
        (r"90^\circ", "90"),
        (r"90^{\circ}", "90"),
        (r"\text{(C)}", "(C)"),
        (r"\textbf{Monday}", "Monday"),
        (r"$5$", "5"),
        ("10\\,000", "10000"),
        ("x = 5.", "x=5"),
    ],
)
def test_normalize_equal(a: str, b: str) -> None:
    assert normalize_answer(a) == normalize_answer(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [("1/2", r"\frac{1}{2}"), ("(1,2)", "[1,2]"), ("3.5", "35"), (r"\leftarrow", "arrow")],
)
def test_normalize_keeps_different_strings_apart(a: str, b: str) -> None:
    assert normalize_answer(a) != normalize_answer(b)


def test_last_boxed():
    assert last_boxed("so $x=\\boxed{3}$ and then \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}") == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert last_boxed("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"  # escaped braces are content
    assert last_boxed("\\boxed{\\left\\{ x \\right.}") == "\\left\\{ x \\right."
    assert last_boxed("\\boxed {5}") == "5"
    assert last_boxed("\\boxed{}") == ""
    assert last_boxed("no box here {}") is None
    assert last_boxed("\\boxed{1} then \\boxed{2") == "1"  # an unclosed box is skipped
