r"""Format and length rewards: they look at the shape of a completion, never at whether it is right."""

from __future__ import annotations

from rlvr_vocab.rewards.text import boxed_contents, completion_text, last_boxed, last_number


def boxed_format_reward(completions: list, **kwargs) -> list[float]:
    r"""1.0 for exactly one ``\boxed{...}`` with non-empty content (and no unclosed one), else 0.0.

    A small shaping reward; its yaml weight sets how much it counts next to correctness.

    Example:
        >>> boxed_format_reward([r"so \boxed{7}", r"\boxed{7} or \boxed{8}", r"\boxed{ }", "7", r"\boxed{7"])
        [1.0, 0.0, 0.0, 0.0, 0.0]
    """
    rewards = []
    for completion in completions:
        boxes = boxed_contents(completion_text(completion))
        rewards.append(1.0 if len(boxes) == 1 and boxes[0] else 0.0)
    return rewards


boxed_format_reward.__name__ = "boxed_format"
boxed_format_reward.judges_answer = True  # with a thinking span: the box must be in the answer after it


class ThinkFormat:
    """1.0 if the completion is ``<think>reasoning</think>`` followed by an answer, else 0.0.

    Both tags must appear exactly once, the open tag first (leading whitespace allowed), the reasoning may not
    be blank, and the answer must hold something a grader can read: a ``\\boxed{}`` or a number (the answers of
    this project's math tasks; ``heldout/closed_answered_rate`` counts the same). Punctuation after the span
    (``</think>>``, measured: 6 of 10 runs of experiment=think_arith settled on it) or more tags are no answer.

    Args:
        open_tag, close_tag: the reasoning delimiters.
        open_tag_in_prompt: the chat template already ends the prompt with ``open_tag`` (Qwen3,
            DeepSeek-R1 style), so the completion starts inside the reasoning.

    Example:
        >>> ThinkFormat()(["<think>2+2=4</think> The answer is 4.", "<think>hm</think>", "The answer is 4."])
        [1.0, 0.0, 0.0]
        >>> ThinkFormat()(["<think>2+2=4</think>>", "<think>2+2</think> so \\boxed{x+1}"])
        [0.0, 1.0]
        >>> ThinkFormat(open_tag_in_prompt=True)(["2+2=4</think> 4"])
        [1.0]
    """

    __name__ = "think_format"

    def __init__(self, open_tag: str = "<think>", close_tag: str = "</think>", open_tag_in_prompt: bool = False):
        if not open_tag or not close_tag or open_tag == close_tag:
            raise ValueError(f"think_format needs two different non-empty tags, got {open_tag!r} and {close_tag!r}.")
        self.open_tag = open_tag
        self.close_tag = close_tag
        self.open_tag_in_prompt = open_tag_in_prompt

    def use_span(self, open_tag: str, close_tag: str, starts_inside: bool) -> None:
        """Take the run's tags, and whether its prompt opens the span (rewards.registry.for_span calls this)."""
        self.open_tag, self.close_tag, self.open_tag_in_prompt = open_tag, close_tag, starts_inside

    def score(self, text: str) -> float:
        if self.open_tag_in_prompt:
            text = self.open_tag + text
        text = text.lstrip()
        if not text.startswith(self.open_tag) or text.count(self.open_tag) != 1 or text.count(self.close_tag) != 1:
            return 0.0
        reasoning, _, answer = text[len(self.open_tag) :].partition(self.close_tag)
        return 1.0 if reasoning.strip() and self._is_answer(answer) else 0.0

    def __call__(self, completions: list, completion_span: list | None = None, completion_answer=None, **kwargs):
        if completion_span is None or completion_answer is None:
            return [self.score(completion_text(c)) for c in completions]
        # From token ids (the trainer's split): a closed span with thinking in it, then an answer that holds no
        # tag (as in the text path, where each tag appears once) and a box or a number: more close tags, or
        # punctuation, after the span are not an answer, and a policy must not be paid for writing them.
        return [
            1.0 if span.closed and span.think_tokens > 1 and self._is_answer(answer) else 0.0
            for span, answer in zip(completion_span, completion_answer, strict=True)
        ]

    def _is_answer(self, answer: str | None) -> bool:
        if not answer or self.open_tag in answer or self.close_tag in answer:
            return False
        return bool(last_boxed(answer)) or last_number(answer) is not None


class SoftOverlong:
    r"""DAPO's soft overlong penalty (Eq. 13) on the completion length in tokens.

    0 up to ``max_completion_length - soft_cache_length`` tokens, then linear down to -1 at
    ``max_completion_length``, and -1 beyond. Set ``max_completion_length`` to the training one.

    Example:
        >>> SoftOverlong(max_completion_length=100, soft_cache_length=20)(
        ...     completions=["a"] * 4, completion_ids=[[0] * 50, [0] * 80, [0] * 90, [0] * 120])
        [0.0, 0.0, -0.5, -1.0]
    """

    __name__ = "soft_overlong"

    def __init__(self, max_completion_length: int = 1024, soft_cache_length: int = 256):
        if not 0 < soft_cache_length <= max_completion_length:
            raise ValueError(
                f"soft_overlong: need 0 < soft_cache_length ({soft_cache_length}) <= max_completion_length "
                f"({max_completion_length})."
            )
        self.max_completion_length = int(max_completion_length)
        self.soft_cache_length = int(soft_cache_length)

    def __call__(self, completions: list, completion_ids: list | None = None, **kwargs) -> list[float | None]:
        if completion_ids is None:  # called outside a trainer without token ids: nothing to measure
            return [None] * len(completions)
        limit = self.max_completion_length - self.soft_cache_length
        rewards: list[float | None] = []
        for ids in completion_ids:
            length = len(ids)
            if length <= limit:
                rewards.append(0.0)
            elif length <= self.max_completion_length:
                rewards.append((limit - length) / self.soft_cache_length)
            else:
                rewards.append(-1.0)
        return rewards
