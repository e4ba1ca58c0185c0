r"""Answer correctness with math-verify, as TRL's ``accuracy_reward`` grades it, fed a gold it can parse.

``Accuracy`` keeps TRL's grading exactly (``trl/rewards/accuracy_rewards.py``): the gold is parsed
with math-verify's default extraction, the completion with LaTeX extraction only, ``\boxed{}``
first, no un-anchored matches, units normalised, first match; ``verify(gold, answer)`` decides.
It calls math-verify directly instead of TRL's function for three reasons, all measured:

* TRL's function can raise: it builds ``str(answer_parsed)`` for its log columns outside any
  ``try`` or timeout, and a completion like ``\boxed{\binom{100000}{50000}}`` makes that a
  ValueError (integer too large to print) that would crash a training step.
* In a thread other than the main one, TRL turns math-verify's timeouts off (they rely on
  ``signal.alarm``), so one pathological completion can hang training. Here such calls go to a
  child process with a hard deadline instead (see ``_ScoringWorker``).
* The gold column holds the bare final answer (``18``, ``\frac43``). math-verify only finds LaTeX
  between delimiters, so a bare MATH gold parses as its first number (``3\sqrt{13}`` -> 3). We wrap
  it in ``$...$`` and repair what breaks parsing; see ``normalize_gold``.

One addition to the completion side, ``repair_completions`` (default on): TeX shorthand such as
``\boxed{\frac43}`` or ``\sqrt3`` is braced before parsing. It typesets identically, but
math-verify's completion parser reads it as nothing, so a model copying MATH's style of writing
would score 0 for a right answer. A test checks that everything else agrees with TRL's function.

One deviation toward strictness, ``digits_agree``: math-verify compares numbers after rounding to 6
decimal places, so ``0.0000673`` scored 1.0 against a gold of ``0.0000672``. Where the gold is a plain
number, an answer must now agree with it in every digit the gold writes.

Rewards: 1.0 right, 0.0 wrong or no parseable answer in the completion, None when the GOLD cannot be
parsed (the row does not count; ``gold_is_parseable`` lets data.py drop such rows up front). Inside
``$...$`` that only happens for an empty gold: math-verify falls back to exact string matching for
LaTeX it cannot turn into a math object.
"""

from __future__ import annotations

import logging
import multiprocessing
import re
import threading
from fractions import Fraction
from functools import lru_cache
from typing import Any

from rlvr_vocab.rewards.text import (
    BOXED_TEMPLATE,
    completion_text,
    decimal_unit,
    last_boxed,
    repair_latex_shorthand,
    to_number,
)

log = logging.getLogger(__name__)

# What extraction TRL's accuracy_reward uses for the completion (built lazily: importing math_verify takes ~1 s).
_ANSWER_CONFIG: list | None = None


def _answer_extraction_config() -> list:
    global _ANSWER_CONFIG
    if _ANSWER_CONFIG is None:
        from latex2sympy2_extended import NormalizationConfig
        from math_verify import LatexExtractionConfig

        _ANSWER_CONFIG = [
            LatexExtractionConfig(
                normalization_config=NormalizationConfig(units=True),
                boxed_match_priority=0,  # \boxed{} first
                try_extract_without_anchor=False,
            )
        ]
    return _ANSWER_CONFIG


# ------------------------------------------------------------------------------------------- gold side
_DELIMITED_RE = re.compile(
    r"\$\$(?P<a>(?:\\.|[^$\\])*)\$\$|\$(?P<b>(?:\\.|[^$\\])*)\$|\\\((?P<c>.*)\\\)|\\\[(?P<d>.*)\\\]", re.DOTALL
)
# A whole answer that is one number with thousands separators: 1,000  1{,}000  1,\!000  1\,000, optionally
# with a sign, \$, decimals, \% or a \text{} unit. Only whole answers: "[1,100]" is an interval, not 1100.
_THOUSANDS_RE = re.compile(
    r"(?P<pre>(?:\\\$)?\s*-?\s*)(?P<num>\d{1,3}(?:(?:,|\{,\}|,\\!|\\,)\d{3})+)(?P<post>(?:\.\d+)?\s*(?:\\%|\\text\{[^{}]*\})?)"
)


def normalize_gold(answer: Any) -> str:
    r"""The gold final answer as LaTeX math-verify parses as intended: ``$...$`` around a repaired answer.

    Repairs: outer ``$``/``\(``/``\[`` delimiters and ``\boxed{}`` are unwrapped (then wrapped once),
    thousands separators go (``1,000``, ``10{,}000``, ``1,\!000``), TeX shorthand is braced
    (``\frac43``), a trailing full stop after a number goes, and bare ``$`` (currency) is escaped.
    ``\dfrac``, ``\text{}`` units, ``^\circ`` and ``\%`` are left to math-verify, which handles them.

    Example:
        >>> normalize_gold("1,000")
        '$1000$'
        >>> normalize_gold(r"\frac43")
        '$\\frac{4}{3}$'
        >>> normalize_gold(r"$\boxed{(3, \frac{\pi}{2})}$")
        '$(3, \\frac{\\pi}{2})$'
        >>> normalize_gold("")
        ''
    """
    s = "" if answer is None else str(answer).strip()
    for _ in range(3):  # $$x$$, $x$, \(x\), \[x\] -> x
        m = _DELIMITED_RE.fullmatch(s)
        if m is None:
            break
        s = next(g for g in m.groups() if g is not None).strip()
    if "\\boxed" in s:
        s = last_boxed(s) or s
    s = s.replace("\n", " ").strip()
    if (m := _THOUSANDS_RE.fullmatch(s)) is not None:
        s = m["pre"] + re.sub(r"\D", "", m["num"]) + m["post"]
    s = re.sub(r"(?<=\d)\.$", "", s)
    s = repair_latex_shorthand(s)
    s = re.sub(r"(?<!\\)\$", r"\\$", s)
    return f"${s}$" if s else ""


def _timeouts_allowed() -> bool:
    """math-verify's timeouts use signal.alarm, which only works in the main thread."""
    return threading.current_thread() is threading.main_thread()


@lru_cache(maxsize=16384)
def _parse_gold(gold_latex: str, parsing_timeout: int | None) -> tuple:
    """math-verify's parse of a normalised gold, cached: each gold is graded num_generations times."""
    from math_verify import parse

    if not gold_latex:
        return ()
    try:
        return tuple(parse(gold_latex, parsing_timeout=parsing_timeout))
    except Exception:  # parse catches its own errors; this is for the unexpected
        log.debug("gold parse failed: %r", gold_latex, exc_info=True)
        return ()


def gold_is_parseable(answer: Any, strict: bool = False, parsing_timeout: int | None = 10) -> bool:
    r"""Whether ``Accuracy`` can grade against this gold (otherwise it returns None for the row).

    Inside ``$...$`` math-verify falls back to the extracted LaTeX string when it cannot build a math
    object, and then grades by exact string match; so nearly every non-empty gold is gradable.
    ``strict=True`` asks for a math object (to report golds that will only match verbatim).

    Example:
        >>> gold_is_parseable("18"), gold_is_parseable(r"\frac43"), gold_is_parseable(""), gold_is_parseable("$ $")
        (True, True, False, False)
        >>> gold_is_parseable(r"\frac{1}{"), gold_is_parseable(r"\frac{1}{", strict=True)
        (True, False)
    """
    timeout = parsing_timeout if _timeouts_allowed() else None
    parsed = _parse_gold(normalize_gold(answer), timeout)
    return len(parsed) > 0 and (not strict or not isinstance(parsed[0], str))


# ------------------------------------------------------------------------------------------ grading
def _score_pair(
    gold_latex: str, content: str, parsing_timeout: int | None, verify_timeout: int | None, repair: bool
) -> tuple[float | None, str]:
    """(reward, extracted answer as text) for one completion; never raises."""
    from math_verify import parse, verify

    try:
        gold_parsed = _parse_gold(gold_latex, parsing_timeout)
        if not gold_parsed:
            return None, "[gold unparseable]"
        if repair:
            content = repair_latex_shorthand(content)
        answer_parsed = parse(
            content,
            extraction_config=_answer_extraction_config(),
            extraction_mode="first_match",
            parsing_timeout=parsing_timeout,
        )
        reward = float(verify(list(gold_parsed), answer_parsed, timeout_seconds=verify_timeout))
        if reward == 1.0 and not digits_agree(gold_latex, answer_parsed):
            reward = 0.0  # math-verify rounds to 6 decimals: 0.0000673 "equals" 0.0000672
        # parse returns [sympy object, the extracted LaTeX]; the string is cheap and safe to log.
        text = next((a for a in reversed(answer_parsed) if isinstance(a, str)), "[unparseable]")
        return reward, text[:200]
    except Exception:  # a reward must not take down a training step
        log.debug("accuracy grading failed", exc_info=True)
        return 0.0, "[error]"


def digits_agree(gold_latex: str, answer_parsed: list) -> bool:
    r"""Whether a numeric answer agrees with a plain-number gold in every digit the gold writes.

    math-verify compares numbers after rounding both to 6 decimal places, so ``0.0000673`` equals a gold of
    ``0.0000672`` and ``0.5000001`` equals ``0.5``. For a gold that is a plain decimal number, an answer
    written as a plain number must equal it exactly (``0.50`` and ``1,000`` still do); an answer written as
    an expression (``\frac{1}{2}``, ``6.72\times10^{-5}``) must be within half a unit of the gold's last
    digit. Anything else (a symbolic gold, a non-numeric answer) is left to math-verify: True.

    Example:
        >>> from math_verify import parse
        >>> digits_agree("$0.0000672$", parse("$0.0000673$")), digits_agree("$0.5$", parse(r"$\frac{1}{2}$"))
        (False, True)
        >>> digits_agree("$0.0000672$", parse(r"$6.73\times10^{-5}$")), digits_agree(r"$\frac{4}{3}$", parse("$1.333333$"))
        (False, True)
    """
    gold_text = gold_latex.strip().strip("$")
    gold = to_number(gold_text)
    if gold is None:
        return True
    text = next((a for a in reversed(answer_parsed) if isinstance(a, str)), None)
    written = to_number(text) if text is not None else None
    if written is not None:
        return written == gold
    value = next((a for a in answer_parsed if not isinstance(a, str)), None)
    if value is None or not getattr(value, "is_number", False):
        return True
    try:
        import sympy

        approx = Fraction(str(sympy.N(value, 30)))
    except (TypeError, ValueError, ArithmeticError):  # complex, infinite, ... : math-verify's verdict stands
        return True
    return 2 * abs(approx - gold) <= decimal_unit(gold_text)


class Accuracy:
    r"""1.0 when the completion's answer (``\boxed{}`` first) equals the gold per math-verify, else 0.0.

    Args:
        parsing_timeout: seconds math-verify may spend parsing one string (TRL: 10).
        verify_timeout: seconds per comparison in ``verify`` (TRL: 5).
        repair_completions: brace TeX shorthand (``\frac43``) in completions before parsing.

    Example:
        >>> accuracy = Accuracy()
        >>> accuracy([[{"role": "assistant", "content": r"so \boxed{\frac{4}{3}}"}], r"\boxed{\frac43}", "4/3", "no"],
        ...          answer=[r"\frac43"] * 4)
        [1.0, 1.0, 0.0, 0.0]
        >>> accuracy(["\\boxed{1}"], answer=[""])  # no gold to grade against: the row is skipped
        [None]
    """

    __name__ = "accuracy"
    correct_reward = 1.0  # what a right answer scores (rlvr-check-rewards uses it)
    answer_template = BOXED_TEMPLATE  # how rlvr-check-rewards writes an answer for this reward

    def __init__(
        self, parsing_timeout: int | None = 10, verify_timeout: int | None = 5, repair_completions: bool = True
    ):
        for name, value in (("parsing_timeout", parsing_timeout), ("verify_timeout", verify_timeout)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r}: math-verify timeouts are whole seconds >= 1 (or null: none).")
        self.parsing_timeout = parsing_timeout
        self.verify_timeout = verify_timeout
        self.repair_completions = repair_completions
        self._worker: _ScoringWorker | None = None

    def score(self, content: str, answer: Any) -> tuple[float | None, str]:
        """(reward, extracted answer) for one completion text against one gold answer."""
        return self.score_many([content], [answer])[0]

    def score_many(self, contents: list[str], answers: list[Any]) -> list[tuple[float | None, str]]:
        golds = [normalize_gold(a) for a in answers]
        if _timeouts_allowed():
            return [
                _score_pair(g, c, self.parsing_timeout, self.verify_timeout, self.repair_completions)
                for g, c in zip(golds, contents, strict=True)
            ]
        if self._worker is None:
            self._worker = _ScoringWorker(self.parsing_timeout, self.verify_timeout, self.repair_completions)
        return self._worker.score(list(zip(golds, contents, strict=True)))

    def __call__(self, completions: list, answer: list, log_extra=None, **kwargs) -> list[float | None]:
        scored = self.score_many([completion_text(c) for c in completions], list(answer))
        if log_extra is not None:  # columns of TRL's completions table, prefixed so rewards don't collide
            log_extra(f"{self.__name__}/gold", [normalize_gold(a) for a in answer])
            log_extra(f"{self.__name__}/answer_parsed", [text for _, text in scored])
        return [reward for reward, _ in scored]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_worker"] = None  # a child process does not pickle; the copy starts its own when needed
        return state


# ------------------------------------------------------------------------------ off the main thread
def _worker_main(conn, parsing_timeout: int | None, verify_timeout: int | None, repair: bool) -> None:
    import signal

    import math_verify  # noqa: F401 -- import before announcing readiness

    # Ctrl-C reaches the whole process group: the trainer turns it into "save and stop after this step",
    # and this grader must live to finish the step (it exits when the parent closes the pipe).
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    conn.send("ready")
    while True:
        try:
            item = conn.recv()
        except EOFError:
            return
        if item is None:
            return
        conn.send(_score_pair(*item, parsing_timeout, verify_timeout, repair))


class _ScoringWorker:
    """A child process that grades with math-verify's signal timeouts, for callers off the main thread.

    Each item gets a hard deadline (both parses plus up to four comparisons, plus slack); a child that
    misses it is killed, the item scores 0.0, and the next item starts a fresh child. Where no child
    can be started (a daemonic parent), it grades in-thread without timeouts, as TRL does there.
    """

    STARTUP_S = 120.0

    def __init__(self, parsing_timeout: int | None, verify_timeout: int | None, repair: bool):
        self.args = (parsing_timeout, verify_timeout, repair)
        self.deadline_s = 2 * (parsing_timeout or 10) + 4 * (verify_timeout or 5) + 5.0
        self._proc = None
        self._conn = None
        self._unavailable = False
        self._lock = threading.Lock()

    def score(self, pairs: list[tuple[str, str]]) -> list[tuple[float | None, str]]:
        with self._lock:
            return [self._score_one(pair) for pair in pairs]

    def _score_one(self, pair: tuple[str, str]) -> tuple[float | None, str]:
        if self._unavailable:  # e.g. inside a daemonic process, which may not have children
            return _score_pair(*pair, None, None, self.args[2])
        try:
            if self._proc is None or not self._proc.is_alive():
                self._start()
        except Exception:
            log.warning(
                "accuracy: cannot start a grading process off the main thread; grading in-thread without "
                "timeouts, as TRL does",
                exc_info=True,
            )
            self.close()
            self._unavailable = True
            return _score_pair(*pair, None, None, self.args[2])
        try:
            self._conn.send(pair)
            if self._conn.poll(self.deadline_s):
                return self._conn.recv()
            log.warning("accuracy: grading one completion exceeded %.0f s; scored 0.0", self.deadline_s)
            outcome = "[timeout]"
        except Exception:
            log.warning("accuracy: grading worker failed; scored 0.0", exc_info=True)
            outcome = "[error]"
        self.close()
        return 0.0, outcome

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # fork is unsafe in a threaded (torch) parent
        parent, child = ctx.Pipe()
        self._proc = ctx.Process(target=_worker_main, args=(child, *self.args), daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent
        if not parent.poll(self.STARTUP_S) or parent.recv() != "ready":
            raise RuntimeError("accuracy grading worker did not start")

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.join(timeout=5)
        self._proc = self._conn = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
