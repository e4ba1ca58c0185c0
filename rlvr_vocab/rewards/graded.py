r"""Correctness rewards beyond ``accuracy``: a lenient number match and a signed boxed-answer reward.

``last_number`` serves the offline quickstart, where SmolLM2-135M-Instruct almost never writes
``\boxed{}``: it compares the last number written (the boxed content when there is one).
``binary_boxed`` is ``accuracy`` with a penalty for wrong answers and a smaller one for no box.
"""

from __future__ import annotations

from typing import Any

from rlvr_vocab.rewards.accuracy import Accuracy
from rlvr_vocab.rewards.text import (
    BOXED_TEMPLATE,
    boxed_contents,
    completion_text,
    last_boxed,
    last_number,
    to_number,
)


def last_number_reward(completions: list, answer: list, **kwargs) -> list[float | None]:
    r"""1.0 if the last number in the completion (in the last ``\boxed{}`` if any) equals the gold, else 0.0.

    Numbers compare exactly (``18.0`` = ``18``, ``1,000`` = ``1000``). None when the gold is not a plain
    number (e.g. ``\frac{4}{3}``): this reward does not apply there, use ``accuracy``.

    Example:
        >>> last_number_reward(["3 + 4 = 7", "It is 7.0 apples.", r"\boxed{7} not 8", "8", "none"], answer=["7"] * 5)
        [1.0, 1.0, 1.0, 0.0, 0.0]
        >>> last_number_reward(["1.5"], answer=[r"\frac{3}{2}"])
        [None]
    """
    rewards: list[float | None] = []
    for completion, gold in zip(completions, answer, strict=True):
        target = to_number(str(gold))
        if target is None:
            rewards.append(None)
            continue
        text = completion_text(completion)
        boxed = last_boxed(text)
        value = last_number(boxed if boxed is not None else text)
        rewards.append(1.0 if value is not None and value == target else 0.0)
    return rewards


last_number_reward.__name__ = "last_number"
last_number_reward.correct_reward = 1.0  # what a right answer scores (rlvr-check-rewards uses it)
last_number_reward.answer_template = BOXED_TEMPLATE  # how rlvr-check-rewards writes an answer for it


class BinaryBoxed:
    r"""+1 for a right boxed answer, -1 for a wrong one, -0.5 when there is no non-empty ``\boxed{}``.

    Right/wrong is ``accuracy`` (math-verify). None where the gold is unparseable.

    Args:
        correct, wrong, no_boxed: the three reward values.
        **accuracy_kwargs: passed to ``Accuracy`` (``parsing_timeout``, ``verify_timeout``, ...).

    Example:
        >>> BinaryBoxed()([r"\boxed{7}", r"\boxed{8}", "7", r"\boxed{}"], answer=["7"] * 4)
        [1.0, -1.0, -0.5, -0.5]
    """

    __name__ = "binary_boxed"
    answer_template = BOXED_TEMPLATE

    def __init__(self, correct: float = 1.0, wrong: float = -1.0, no_boxed: float = -0.5, **accuracy_kwargs: Any):
        self.correct = self.correct_reward = float(correct)
        self.wrong = float(wrong)
        self.no_boxed = float(no_boxed)
        self.accuracy = Accuracy(**accuracy_kwargs)

    def __call__(self, completions: list, answer: list, **kwargs) -> list[float | None]:
        texts = [completion_text(c) for c in completions]
        scores = self.accuracy.score_many(texts, list(answer))
        rewards: list[float | None] = []
        for text, (score, _) in zip(texts, scores, strict=True):
            if score is None:
                rewards.append(None)
            elif not any(boxed_contents(text)):  # no closed, non-empty box
                rewards.append(self.no_boxed)
            else:
                rewards.append(self.correct if score == 1.0 else self.wrong)
        return rewards
