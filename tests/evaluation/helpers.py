"""Helpers of the tests of selfdistill.evaluation: a sample record built in one call."""

from __future__ import annotations

from selfdistill.evaluation.store import SampleRecord


def _record(source: str, problem: str, index: int, correct: float, extracted: str | None, tokens: int = 10,
            text: str = "", entropy: float | None = 1.0, truncated: bool = False) -> SampleRecord:
    return SampleRecord(source, problem, index, text, extracted, correct, tokens, truncated, entropy)
