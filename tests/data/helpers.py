"""Helpers of the tests of selfdistill.data: the operation-chain solution parser."""

import re

from selfdistill.grading import last_boxed

CHAIN_LINE = re.compile(r"(\d+)([+\-*])(\d+)=(\d+)")


def parse_chain_solution(solution: str) -> tuple[list[tuple[int, str, int, int]], str]:
    """([(left, operator, right, result)], boxed content) read back from a worked solution."""
    *lines, last = solution.split("\n")
    steps = []
    for line in lines:
        match = CHAIN_LINE.fullmatch(line)
        assert match, line
        steps.append((int(match.group(1)), match.group(2), int(match.group(3)), int(match.group(4))))
    assert re.fullmatch(r"\\boxed\{\d+\}", last), last
    return steps, last_boxed(last)
