"""The four graded rewards of the Hugging Face / Unsloth cookbook GRPO recipe (issue #5).

The model is asked (``COOKBOOK_SYSTEM_PROMPT``) to answer as::

    <start_working_out> ...reasoning... <end_working_out><SOLUTION>answer</SOLUTION>

and four rewards, summed, grade it:

=========================  ====================================================================
``cookbook_format_exact``   3.0 when the whole completion has that shape
``cookbook_format_approx``  per tag: +0.5 when it appears exactly once, ``penalty`` otherwise
                            (missing or duplicated; -0.5 in the HF cookbook, -1.0 in Unsloth's)
``cookbook_answer``         the text in <SOLUTION>: 3.0 equal to the gold, 1.5 equal after stripping
                            whitespace, else by the ratio answer/gold: 0.5 within 10%, 0.25 within
                            20%, -1.0 otherwise; -0.5 when it is not a number; 0.0 with no match
``cookbook_number``         1.5 when the first number after <SOLUTION> equals the gold, else 0.0
=========================  ====================================================================

Deviations from the notebooks, all toward correctness: ``cookbook_number`` keeps a minus sign and
needs a digit (the notebooks' ``[\\d\\.]+`` turns "-3" into 3 and can capture a lone "."); a zero
gold gives -1.0 instead of a ZeroDivisionError's -0.5; ``cookbook_number`` returns None when the
gold is not a number (the reward does not apply) instead of 0.0.
"""

from __future__ import annotations

import re

from rlvr_vocab.rewards.text import completion_text, to_number

REASONING_START = "<start_working_out>"
REASONING_END = "<end_working_out>"
SOLUTION_START = "<SOLUTION>"
SOLUTION_END = "</SOLUTION>"

# The data side of the recipe: use it as dataset.system_prompt (see conf/reward/cookbook.yaml).
COOKBOOK_SYSTEM_PROMPT = (
    "You are given a problem.\n"
    "Think about the problem and provide your working out.\n"
    f"Place it between {REASONING_START} and {REASONING_END}.\n"
    f"Then, provide your solution between {SOLUTION_START}{SOLUTION_END}"
)


class _CookbookReward:
    """Shared tag handling. ``reasoning_start_in_prompt``: the chat template already opened the reasoning."""

    def __init__(
        self,
        reasoning_start: str = REASONING_START,
        reasoning_end: str = REASONING_END,
        solution_start: str = SOLUTION_START,
        solution_end: str = SOLUTION_END,
        reasoning_start_in_prompt: bool = False,
    ):
        self.tags = (reasoning_start, reasoning_end, solution_start, solution_end)
        if not all(self.tags) or len(set(self.tags)) != 4:
            raise ValueError(f"{type(self).__name__}: the four tags must be distinct and non-empty, got {self.tags}.")
        self.reasoning_start_in_prompt = reasoning_start_in_prompt
        self.match_number = re.compile(rf"{re.escape(solution_start)}.*?(-?\d[\d.,]*)", flags=re.DOTALL)

    @property
    def answer_template(self) -> str:
        """How rlvr-check-rewards writes an answer for this reward (``{answer}`` is replaced)."""
        rs, re_, ss, se = self.tags
        return f"{rs}Let me work this out step by step.{re_}{ss}{{answer}}{se}"

    def text(self, completion) -> str:
        text = completion_text(completion)
        return self.tags[0] + text if self.reasoning_start_in_prompt else text

    def solution(self, text: str) -> str | None:
        r"""The text between the solution tags of a well-formed completion, or None.

        Same result as the notebooks' ``re.search`` with
        ``^[\s]{0,}RS.+?RE.*?SS(.+?)SE[\s]{0,}$`` (MULTILINE | DOTALL), in linear time: that regex
        backtracks quadratically (37 s on 100k newlines). The first reasoning tag that starts a line
        (after whitespace) decides; then the first end tag, solution tag, and the first closing tag
        followed only by whitespace up to a line end.
        """
        rs, re_, ss, se = self.tags
        q = text.find(rs)
        while q >= 0 and not _starts_line(text, q):
            q = text.find(rs, q + 1)
        if q < 0:
            return None
        e = text.find(re_, q + len(rs) + 1)  # .+? : at least one character of reasoning
        if e < 0:
            return None
        s = text.find(ss, e + len(re_))
        if s < 0:
            return None
        start = s + len(ss)
        end = text.find(se, start + 1)  # (.+?) : a non-empty solution
        while end >= 0:
            if _ends_line(text, end + len(se)):
                return text[start:end]
            end = text.find(se, end + 1)
        return None


def _starts_line(text: str, i: int) -> bool:
    """Only non-newline whitespace between the previous line break (or the start) and ``i``."""
    while i > 0 and text[i - 1] != "\n":
        if not text[i - 1].isspace():
            return False
        i -= 1
    return True


def _ends_line(text: str, i: int) -> bool:
    """Only non-newline whitespace between ``i`` and the next line break (or the end)."""
    while i < len(text) and text[i] != "\n":
        if not text[i].isspace():
            return False
        i += 1
    return True


class CookbookFormatExact(_CookbookReward):
    """``reward`` (3.0) when the completion is reasoning then solution, in the tags, else 0.0.

    Example:
        >>> CookbookFormatExact()(["<start_working_out>4+3<end_working_out><SOLUTION>7</SOLUTION>", "7"])
        [3.0, 0.0]
    """

    __name__ = "cookbook_format_exact"

    def __init__(self, reward: float = 3.0, **tags):
        super().__init__(**tags)
        self.reward = float(reward)

    def __call__(self, completions: list, **kwargs) -> list[float]:
        return [self.reward if self.solution(self.text(c)) is not None else 0.0 for c in completions]


class CookbookFormatApprox(_CookbookReward):
    """Per tag: ``present`` (+0.5) when it appears exactly once, ``penalty`` when missing or repeated.

    Example:
        >>> CookbookFormatApprox()(["<start_working_out>x<end_working_out><SOLUTION>7</SOLUTION>",
        ...                         "<SOLUTION>7</SOLUTION><SOLUTION>8</SOLUTION>"])
        [2.0, -2.0]
    """

    __name__ = "cookbook_format_approx"

    def __init__(self, present: float = 0.5, penalty: float = -0.5, **tags):
        super().__init__(**tags)
        self.present = float(present)
        self.penalty = float(penalty)

    def __call__(self, completions: list, **kwargs) -> list[float]:
        rewards = []
        for completion in completions:
            text = self.text(completion)
            rewards.append(sum(self.present if text.count(tag) == 1 else self.penalty for tag in self.tags))
        return rewards


class CookbookAnswer(_CookbookReward):
    """Grades the text in ``<SOLUTION>`` against the gold string, with partial credit by ratio.

    Example:
        >>> wrap = "<start_working_out>...<end_working_out><SOLUTION>{}</SOLUTION>".format
        >>> CookbookAnswer()([wrap("100"), wrap(" 100 "), wrap("95"), wrap("85"), wrap("50"), wrap("many"), "100"],
        ...                  answer=["100"] * 7)
        [3.0, 1.5, 0.5, 0.25, -1.0, -0.5, 0.0]
    """

    __name__ = "cookbook_answer"

    def __init__(
        self,
        exact: float = 3.0,
        stripped: float = 1.5,
        within_10pct: float = 0.5,
        within_20pct: float = 0.25,
        wrong: float = -1.0,
        not_a_number: float = -0.5,
        **tags,
    ):
        super().__init__(**tags)
        self.exact = self.correct_reward = float(exact)
        self.stripped = float(stripped)
        self.within_10pct = float(within_10pct)
        self.within_20pct = float(within_20pct)
        self.wrong = float(wrong)
        self.not_a_number = float(not_a_number)

    def score(self, guess: str | None, gold: str) -> float:
        if guess is None:
            return 0.0
        if guess == gold:
            return self.exact
        if guess.strip() == gold.strip():
            return self.stripped
        try:  # float() as in the notebooks: no thousands separators, "1e3" and "inf" accepted
            ratio = float(guess) / float(gold)
        except ZeroDivisionError:
            return self.wrong
        except (ValueError, OverflowError):
            return self.not_a_number
        if 0.9 <= ratio <= 1.1:
            return self.within_10pct
        if 0.8 <= ratio <= 1.2:
            return self.within_20pct
        return self.wrong

    def __call__(self, completions: list, answer: list, **kwargs) -> list[float]:
        return [
            self.score(self.solution(self.text(c)), str(gold)) for c, gold in zip(completions, answer, strict=True)
        ]


class CookbookNumber(_CookbookReward):
    """``reward`` (1.5) when the first number after ``<SOLUTION>`` equals the gold number, else 0.0.

    Thousands separators are dropped (``1,000`` = 1000). None when the gold is not a plain number.

    Example:
        >>> CookbookNumber()(["<SOLUTION>It is 1,000 apples</SOLUTION>", "<SOLUTION>999</SOLUTION>", "1000"],
        ...                  answer=["1000"] * 3)
        [1.5, 0.0, 0.0]
        >>> CookbookNumber()(["<SOLUTION>-3</SOLUTION>", "<SOLUTION>1</SOLUTION>"], answer=["-3", "x"])
        [1.5, None]
    """

    __name__ = "cookbook_number"

    def __init__(self, reward: float = 1.5, **tags):
        super().__init__(**tags)
        self.reward = self.correct_reward = float(reward)

    def __call__(self, completions: list, answer: list, **kwargs) -> list[float | None]:
        rewards: list[float | None] = []
        for completion, gold in zip(completions, answer, strict=True):
            target = to_number(str(gold))
            if target is None:
                rewards.append(None)
                continue
            m = self.match_number.search(self.text(completion))
            guess = to_number(m.group(1)) if m else None
            rewards.append(self.reward if guess is not None and guess == target else 0.0)
        return rewards
