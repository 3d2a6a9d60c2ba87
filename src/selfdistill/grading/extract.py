"""Pure answer extraction and normalization: strings in, strings out, no processes.

:func:`extract_answer` finds the final answer in a completion, :func:`normalize_answer` gives the
canonical form compared by the fast path (and used as the key of majority votes), and
:func:`gold_answer` prepares a gold answer for both.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# --------------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------------

_BOX_COMMANDS = ("\\boxed", "\\fbox")

_FINAL_ANSWER_RE = re.compile(r"the\s+(?:final\s+)?answer\s+is\s*:?[ \t]*", re.IGNORECASE)
_GSM8K_RE = re.compile(r"####[ \t]*")


def _match_braces(text: str, open_pos: int, limit: int | None = None) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_pos``, or None when it is not closed before
    ``limit`` (default: the end of ``text``).

    A backslash escapes the next character, so ``\\{`` and ``\\}`` do not count.
    """
    depth = 0
    i = open_pos
    n = len(text) if limit is None else limit
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _box_content(text: str, cmd_pos: int, cmd: str, limit: int) -> tuple[str | None, bool]:
    """The argument of the box command at ``cmd_pos``, looking no further than ``limit``.

    Returns ``(content, unclosed)``: content is None when this is no usable box (a longer command
    such as ``\\boxedfoo``, nothing after it, or a ``{`` not closed before ``limit``, in which case
    ``unclosed`` is True).
    """
    i = cmd_pos + len(cmd)
    if i < limit and text[i].isalpha():
        return None, False
    while i < limit and text[i] in " \t":
        i += 1
    if i >= limit:
        return None, False
    if text[i] == "{":
        close = _match_braces(text, i, limit)
        if close is None:
            return None, True
        return text[i + 1 : close], False
    # Brace-less form ("\\boxed 5"): the argument runs to the next whitespace or "$".
    j = i
    while j < limit and not text[j].isspace() and text[j] != "$":
        j += 1
    return (text[i:j] or None), False


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed``/``\\fbox`` in ``text``.

    A box whose ``{`` is never closed (a truncated one) is skipped. No earlier box can close after
    such a brace (it keeps every enclosing group open), so earlier boxes are only scanned up to it,
    which keeps the search linear in the length of ``text``.
    """
    scan_limit = len(text)
    # The last occurrence of each command not yet rejected; only the consumed one is searched again,
    # so every character is passed over a bounded number of times.
    candidates = {cmd: text.rfind(cmd) for cmd in _BOX_COMMANDS}
    while True:
        cmd = max(candidates, key=candidates.__getitem__)
        pos = candidates[cmd]
        if pos < 0:
            return None
        content, unclosed = _box_content(text, pos, cmd, scan_limit)
        if content is not None:
            return content
        if unclosed:
            scan_limit = pos
        candidates[cmd] = text.rfind(cmd, 0, pos)


def _clean_tail_answer(raw: str) -> str:
    """Tidy an answer written inline after a phrase: cut at the end of the sentence, drop markdown
    emphasis, surrounding ``$`` and the final period."""
    ans = raw.strip()
    sentence_end = re.search(r"\.(?:\s|$)", ans)
    if sentence_end:
        ans = ans[: sentence_end.start()]
    ans = ans.strip().strip("*").strip()
    ans = ans.strip("$").strip()
    return ans.rstrip(".").strip()


def _last_match(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    last = None
    for last in pattern.finditer(text):  # noqa: B007 (only the last one is wanted)
        pass
    return last


def extract_answer(text: str, *, fallback: bool = True) -> str | None:
    """The final answer written in ``text``, or None if there is none.

    The content of the last complete ``\\boxed{...}`` or ``\\fbox{...}`` wins (also ``\\boxed 5``
    without braces; braces are matched by scanning, escaped ``\\{``/``\\}`` ignored; an unclosed
    box such as one cut off by truncation is skipped). With ``fallback=True`` and no box, the last
    "The answer is X" / "The final answer is X" (case-insensitive, rest of the sentence, trailing
    period and ``$`` stripped) is used, then the last GSM8K-style ``#### X`` (commas removed).
    An empty answer counts as none.
    """
    boxed = last_boxed(text)
    if boxed is not None:
        boxed = boxed.strip()
        return boxed or None
    if not fallback:
        return None
    phrase = _last_match(_FINAL_ANSWER_RE, text)
    if phrase is not None:
        line_end = text.find("\n", phrase.end())
        ans = _clean_tail_answer(text[phrase.end() : line_end if line_end >= 0 else len(text)])
        if ans:
            return ans
    hashes = _last_match(_GSM8K_RE, text)
    if hashes is not None:
        line_end = text.find("\n", hashes.end())
        ans = text[hashes.end() : line_end if line_end >= 0 else len(text)]
        ans = ans.replace(",", "").strip().strip("$").strip().rstrip(".").strip()
        if ans:
            return ans
    return None


# --------------------------------------------------------------------------------------------------
# Normalization (the fast path)
# --------------------------------------------------------------------------------------------------

_WRAPPER_COMMANDS = ("\\text", "\\textbf", "\\mathrm", "\\mathbf", "\\mbox")
_SPACING_RE = re.compile(r"\\[,;:! ]|\\q?quad(?![a-zA-Z])")
_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right)(?![a-zA-Z])")
_DEGREE_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?")


def _unwrap_commands(text: str, commands: Sequence[str]) -> str:
    """Replace ``\\cmd{X}`` by ``X`` for the given commands (braces matched, nesting allowed)."""
    out: list[str] = []
    i = 0
    n = len(text)
    while i < n:
        if text[i] == "\\":
            for cmd in commands:
                end = i + len(cmd)
                if text.startswith(cmd, i) and end < n and text[end] == "{":
                    close = _match_braces(text, end)
                    if close is not None:
                        out.append(_unwrap_commands(text[end + 1 : close], commands))
                        i = close + 1
                        break
            else:
                out.append(text[i : i + 2])
                i += 2
            continue
        out.append(text[i])
        i += 1
    return "".join(out)


def normalize_answer(answer: str) -> str:
    """A canonical string form of an answer, for exact comparison and for majority votes.

    Only rewrites that never change the meaning: drop ``$``, ``\\left``/``\\right``, LaTeX spacing
    commands and all whitespace; ``\\dfrac``/``\\tfrac`` become ``\\frac``; ``\\text{X}`` (and
    ``\\textbf``, ``\\mathrm``, ``\\mathbf``, ``\\mbox``) become ``X``; degree marks ``^\\circ`` and a
    final period are dropped. Different strings may still be equal answers (``1/2`` and
    ``\\frac{1}{2}``); that is math-verify's job.
    """
    s = answer.replace("$", "")
    s = _SPACING_RE.sub("", s)
    s = _LEFT_RIGHT_RE.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _DEGREE_RE.sub("", s)
    s = _unwrap_commands(s, _WRAPPER_COMMANDS)
    s = "".join(s.split())
    return s.rstrip(".")


# --------------------------------------------------------------------------------------------------
# The gold side
# --------------------------------------------------------------------------------------------------


def gold_answer(gold: object, index: int) -> str:
    """The gold answer as a string: numbers are converted, ``$...$`` around it is dropped, and a gold
    holding a ``\\boxed{...}`` (a whole reference solution) is replaced by the box's content."""
    if isinstance(gold, bool) or not isinstance(gold, (str, int, float)):
        raise TypeError(f"gold {index} is {type(gold).__name__}, expected str")
    text = str(gold)
    boxed = last_boxed(text) if ("\\boxed" in text or "\\fbox" in text) else None
    return (boxed if boxed is not None else text).strip().strip("$").strip()
