r"""Correctness rewards beyond ``accuracy``: a lenient number match and two strict boxed-answer rewards.

``last_number`` serves the offline quickstart, where SmolLM2-135M-Instruct almost never writes
``\boxed{}``: it compares the last number written (the boxed content when there is one).
``boxed_accuracy`` is ``accuracy`` that only counts a final answer inside ``\boxed{}``: ``accuracy``
(TRL's grading) also takes ``The answer is $7$``, and, since math-verify evaluates what it parses,
``\boxed{3 + 4}`` for a gold of 7. A model learns to copy the question into the box within ten
GRPO steps (seen on two-digit addition), so the strict reward scores unevaluated arithmetic as wrong.
``binary_boxed`` signs it: a penalty for wrong answers and a smaller one for no box.
"""

from __future__ import annotations

from typing import Any

from rlvr_vocab.rewards.accuracy import Accuracy, gold_is_parseable
from rlvr_vocab.rewards.text import (
    BOXED_TEMPLATE,
    boxed_contents,
    completion_text,
    is_unevaluated,
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


class BoxedAccuracy:
    r"""1.0 when the completion has a non-empty ``\boxed{}`` with a final answer that math-verify finds right.

    The strict score: ``accuracy`` grades ``\boxed{}`` first but also takes an answer in ``$...$``;
    here an unboxed answer scores 0.0. Where the gold is a plain number, a box holding arithmetic still to
    do (``13 + 45``, ``116/2``; see ``text.is_unevaluated``) scores 0.0 too. None where the gold is
    unparseable.

    Args:
        **accuracy_kwargs: passed to ``Accuracy`` (``parsing_timeout``, ``verify_timeout``, ...).

    Example:
        >>> BoxedAccuracy()([r"so \boxed{7}.", r"\boxed{8}", "The answer is $7$.", r"\boxed{}", r"\boxed{3 + 4}"],
        ...                 answer=["7"] * 5)
        [1.0, 0.0, 0.0, 0.0, 0.0]
    """

    __name__ = "boxed_accuracy"
    correct_reward = 1.0
    answer_template = BOXED_TEMPLATE

    def __init__(self, **accuracy_kwargs: Any):
        self.accuracy = Accuracy(**accuracy_kwargs)

    def outcomes(self, completions: list, answer: list) -> list[str | None]:
        """Per completion: ``"right"``, ``"wrong"`` (a boxed answer that is not right, or not final), ``"no_boxed"``,
        or None (the gold is unparseable)."""
        texts = [completion_text(c) for c in completions]
        golds = list(answer)
        boxes = [[b for b in boxed_contents(text) if b] for text in texts]  # closed, non-empty boxes
        boxed = [i for i, b in enumerate(boxes) if b]
        graded = self.accuracy.score_many([texts[i] for i in boxed], [golds[i] for i in boxed])
        scores = dict(zip(boxed, graded, strict=True))
        result: list[str | None] = []
        for i, gold in enumerate(golds):
            if i in scores:  # math-verify read the box first (boxed_match_priority=0)
                score = scores[i][0]
                final = not any(is_unevaluated(b, gold) for b in boxes[i])
                result.append(None if score is None else "right" if score == 1.0 and final else "wrong")
            else:  # unboxed: math-verify is not asked (saves its time), only whether the gold applies
                result.append("no_boxed" if gold_is_parseable(gold) else None)
        return result

    def __call__(self, completions: list, answer: list, **kwargs) -> list[float | None]:
        return [None if o is None else float(o == "right") for o in self.outcomes(completions, answer)]


class BinaryBoxed(BoxedAccuracy):
    r"""+1 for a right boxed answer, -1 for a wrong one, -0.5 when there is no non-empty ``\boxed{}``.

    Right/wrong is ``boxed_accuracy``. None where the gold is unparseable.

    Args:
        correct, wrong, no_boxed: the three reward values.
        **accuracy_kwargs: passed to ``Accuracy`` (``parsing_timeout``, ``verify_timeout``, ...).

    Example:
        >>> BinaryBoxed()([r"\boxed{7}", r"\boxed{8}", "7", r"\boxed{}"], answer=["7"] * 4)
        [1.0, -1.0, -0.5, -0.5]
    """

    __name__ = "binary_boxed"

    def __init__(self, correct: float = 1.0, wrong: float = -1.0, no_boxed: float = -0.5, **accuracy_kwargs: Any):
        super().__init__(**accuracy_kwargs)
        self.correct_reward = float(correct)
        self.values = {"right": float(correct), "wrong": float(wrong), "no_boxed": float(no_boxed)}

    def __call__(self, completions: list, answer: list, **kwargs) -> list[float | None]:
        return [None if o is None else self.values[o] for o in self.outcomes(completions, answer)]
