"""Text helpers shared by the rewards: completion text, ``\\boxed{}`` contents, numbers, LaTeX shorthand.

Everything here is pure, total (never raises on any ``str``) and linear in the input length, so the
rewards built on it can be fed arbitrary model output.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

# Numbers longer than this (digits and separators) are not converted: Python refuses int(str) beyond
# 4300 digits, and no gold answer in GSM8K/MATH comes close.
MAX_NUMBER_CHARS = 100

# How rlvr-check-rewards writes an answer for the rewards that read \boxed{} (``{answer}`` is replaced).
BOXED_TEMPLATE = "Let me work this out step by step.\nSo the answer is \\boxed{{answer}}."


def completion_text(completion: Any) -> str:
    """The text of one completion, conversational or plain; ``""`` for anything else.

    TRL passes conversational completions as ``[{"role": "assistant", "content": ...}]``; with tools
    there may be several messages, and the final answer is in the last assistant one.

    Example:
        >>> completion_text([{"role": "assistant", "content": "x = 1"}])
        'x = 1'
        >>> completion_text("plain text")
        'plain text'
        >>> completion_text([{"role": "assistant", "content": [{"type": "text", "text": "a"}]}])
        'a'
        >>> completion_text(None)
        ''
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if not isinstance(completion, (list, tuple)) or not completion:
        return ""
    messages = [m for m in completion if isinstance(m, dict)]
    assistant = [m for m in messages if m.get("role", "assistant") == "assistant"] or messages
    if not assistant:
        return ""
    content = assistant[-1].get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multimodal content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


_BOXED_RE = re.compile(r"\\boxed\s*\{")


def boxed_contents(text: str) -> list[str | None]:
    """Contents of every ``\\boxed{...}`` in order (nested braces allowed); ``None`` for an unclosed one.

    Example:
        >>> boxed_contents(r"so \\boxed{\\frac{1}{2}} or \\boxed{ 3 } and \\boxed{4")
        ['\\\\frac{1}{2}', '3', None]
    """
    found: list[str | None] = []
    pos = 0
    while (m := _BOXED_RE.search(text, pos)) is not None:
        start = m.end()
        end = _matching_brace(text, start)
        if end is None:
            found.append(None)  # unclosed: it runs to the end of the text, so nothing follows it
            break
        found.append(text[start:end].strip())
        pos = end + 1
    return found


def last_boxed(text: str) -> str | None:
    """Content of the last closed ``\\boxed{...}``, or None.

    Example:
        >>> last_boxed(r"\\boxed{1} then \\boxed{2}")
        '2'
        >>> last_boxed("no box") is None
        True
    """
    closed = [c for c in boxed_contents(text) if c is not None]
    return closed[-1] if closed else None


def _matching_brace(text: str, start: int) -> int | None:
    """Index of the ``}`` closing the group whose ``{`` is just before ``start``; None if unclosed."""
    depth = 1
    for i in range(start, len(text)):
        ch = text[i]
        if ch == "\\":  # skip escaped braces \{ \}
            continue
        if ch == "{" and text[i - 1] != "\\":
            depth += 1
        elif ch == "}" and text[i - 1] != "\\":
            depth -= 1
            if depth == 0:
                return i
    return None


# A number as people write it: optional minus sign (not right after a word character or a closing
# bracket, so "3-5" reads as 3 and 5), digits with optional thousands separators, optional decimals.
_NUMBER_RE = re.compile(r"(?:(?<![\w.)\]}])-)?(?<![\d.])(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")


def to_number(token: str) -> Fraction | None:
    """Exact value of a plain number string (``1,000``, ``-2.5``, ``$18``, ``18.``); None if it is not one.

    Example:
        >>> to_number("1,000"), to_number("-2.50"), to_number("$18"), to_number("1/2")
        (Fraction(1000, 1), Fraction(-5, 2), Fraction(18, 1), None)
    """
    if not isinstance(token, str):
        return None
    s = token.strip().replace("\\$", "").replace("$", "").replace(",", "").replace("\\!", "").replace("{}", "")
    s = s.rstrip(".").strip()
    if not s or len(s) > MAX_NUMBER_CHARS or not re.fullmatch(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)", s):
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def decimal_unit(token: str) -> Fraction | None:
    """The place value of the last digit written in a plain number (``0.0672`` -> 1/10000); None if not one.

    Example:
        >>> decimal_unit("0.0000672"), decimal_unit("18"), decimal_unit("1,000"), decimal_unit("2.50"), decimal_unit("x")
        (Fraction(1, 10000000), Fraction(1, 1), Fraction(1, 1), Fraction(1, 100), None)
    """
    if to_number(token) is None:
        return None
    s = token.strip().rstrip(".").strip()
    decimals = len(s.rsplit(".", 1)[1]) if "." in s else 0
    return Fraction(1, 10**decimals)


# Two numbers joined by an operator: arithmetic still to be done (13 + 45, 2\times 29, 116/2, 10^{3}).
_OPERATION_RE = re.compile(
    r"(?:\d|\))\s*(?:[-+*/^×÷·]|\\times|\\cdot|\\div|\\ast)\s*(?:\d|\.\d|\(|\{|\\left|\\[dtc]?frac|\\sqrt)"
)
_FRACTION_OR_ROOT_RE = re.compile(r"\\[dtc]?frac|\\sqrt")


def is_unevaluated(answer: str, gold: str) -> bool:
    r"""Whether a (boxed) answer still holds arithmetic to do, where the gold is a plain number.

    math-verify evaluates what it parses, so ``\boxed{13 + 45}`` equals a gold of 58: a model that copies
    the question into the box scores as right. For a plain-number gold, an answer with two numbers joined
    by an operator is not a final answer; for a whole-number gold, neither is a fraction or a root. Other
    golds (``\frac43``, intervals, expressions) are left to math-verify.

    Example:
        >>> [is_unevaluated(a, "58") for a in ["58", "-58", "58.0", "1,000", "13 + 45", "2\\times29", "116/2", r"\frac{116}{2}"]]
        [False, False, False, False, True, True, True, True]
        >>> is_unevaluated(r"\frac{1}{2}", "0.5"), is_unevaluated("1/2", "0.5"), is_unevaluated("x+1", r"\frac43")
        (False, True, False)
        >>> is_unevaluated(r"12 \times 5 = 60", "60"), is_unevaluated("60 = 12 + 48", "60")
        (False, True)
    """
    value = to_number(str(gold))
    if value is None:
        return False
    s = answer.replace("{,}", "").replace("\\!", "").replace("\\,", "")
    # "12 \times 5 = 60": the value after the last "=" is the answer (math-verify reads it so)
    s = s.rsplit("=", 1)[-1]
    if _OPERATION_RE.search(s):
        return True
    return value.denominator == 1 and bool(_FRACTION_OR_ROOT_RE.search(s))


def last_number(text: str) -> Fraction | None:
    """The last number written in ``text`` (see ``to_number``), or None.

    Example:
        >>> last_number("3 + 4 = 7, so 1,000 - 3-5 = 992.5")
        Fraction(1985, 2)
        >>> last_number(r"\\boxed{10,\\!080}")
        Fraction(10080, 1)
        >>> last_number("none") is None
        True
    """
    text = text.replace("{,}", ",").replace(",\\!", ",")  # LaTeX thousands separators: 10{,}000, 10,\!000
    matches = list(_NUMBER_RE.finditer(text))
    return to_number(matches[-1].group(0)) if matches else None


# ------------------------------------------------------------------------------------ LaTeX shorthand
# Commands whose arguments TeX also accepts undelimited: \frac43 is \frac{4}{3}, \sqrt3 is \sqrt{3}.
_SHORTHAND_ARITY = {"frac": 2, "dfrac": 2, "tfrac": 2, "cfrac": 2, "sqrt": 1, "binom": 2, "dbinom": 2, "tbinom": 2}
# Control words that are a whole argument on their own (symbols, not commands taking arguments).
_SYMBOL_WORDS = frozenset(
    "pi alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu nu xi rho sigma "
    "tau upsilon phi varphi chi psi omega Gamma Delta Theta Lambda Xi Pi Sigma Phi Psi Omega infty ell".split()
)
_COMMAND_RE = re.compile(r"\\(" + "|".join(sorted(_SHORTHAND_ARITY, key=len, reverse=True)) + r")(?![a-zA-Z])")


def repair_latex_shorthand(text: str) -> str:
    r"""Brace the undelimited arguments TeX allows: ``\frac43`` -> ``\frac{4}{3}``, ``\sqrt3`` -> ``\sqrt{3}``.

    The result typesets identically (a single token is a whole argument in TeX); it exists because
    math-verify's answer parser reads ``\frac43`` in a completion as nothing parseable. Only single
    characters and symbol control words (``\pi``) are braced; anything unusual is left as it is.
    Linear time: braces are matched once, then only insertions are made.

    Example:
        >>> repair_latex_shorthand(r"\frac43 + \dfrac 12 - \sqrt3 + \frac{\sqrt2}3 + \frac\pi2 + \sqrt[3]2")
        '\\frac{4}{3} + \\dfrac {1}{2} - \\sqrt{3} + \\frac{\\sqrt{2}}{3} + \\frac{\\pi}{2} + \\sqrt[3]{2}'
        >>> repair_latex_shorthand(r"\frac{1}{2}")
        '\\frac{1}{2}'
    """
    if "\\" not in text or _COMMAND_RE.search(text) is None:
        return text
    closing = _brace_pairs(text)
    inserts: list[tuple[int, int, str]] = []  # (position, 0 for "}" / 1 for "{", text): "}{" at a shared position
    for m in _COMMAND_RE.finditer(text):
        i = m.end()
        if m.group(1) == "sqrt":  # optional [index]
            j = _skip_spaces(text, i)
            if j < len(text) and text[j] == "[":
                close = text.find("]", j, j + 200)  # bounded look-ahead keeps the pass linear
                if close < 0:
                    continue
                i = close + 1
        for _ in range(_SHORTHAND_ARITY[m.group(1)]):
            j = _skip_spaces(text, i)
            if j >= len(text):
                break
            if text[j] == "{":
                if j not in closing:
                    break
                i = closing[j] + 1
                continue
            if text[j].isalnum():
                token_end = j + 1
            elif text[j] == "\\" and (w := _CONTROL_WORD_RE.match(text, j)) and w.group(1) in _SYMBOL_WORDS:
                token_end = w.end()
            else:
                break
            inserts += [(j, 1, "{"), (token_end, 0, "}")]
            i = token_end
    if not inserts:
        return text
    out, pos = [], 0
    for at, _, brace in sorted(inserts):
        out.append(text[pos:at])
        out.append(brace)
        pos = at
    out.append(text[pos:])
    return "".join(out)


_CONTROL_WORD_RE = re.compile(r"\\([a-zA-Z]+)")


def _brace_pairs(text: str) -> dict[int, int]:
    """Index of each ``{`` -> index of its ``}`` (unescaped braces; unclosed ones are left out)."""
    pairs: dict[int, int] = {}
    stack: list[int] = []
    for i, ch in enumerate(text):
        if ch in "{}" and (i == 0 or text[i - 1] != "\\"):
            if ch == "{":
                stack.append(i)
            elif stack:
                pairs[stack.pop()] = i
    return pairs


def _skip_spaces(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\n":
        i += 1
    return i
