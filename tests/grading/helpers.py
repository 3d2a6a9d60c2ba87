"""Bounds shared by the tests of selfdistill.grading."""

from __future__ import annotations

BOUNDED = 60.0
SLACK = 3.0  # seconds allowed beyond a timeout: killing, reading pipes, a loaded 2-core machine
TOWER = r"The answer is $\boxed{10^{10^{10^{10}}}}$."
