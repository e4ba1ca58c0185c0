"""Reward functions by name: ``conf/reward/*.yaml`` lists ``funcs``, ``weights`` and per-function ``kwargs``.

A registered entry is a reward function or a callable class (instantiated with its ``kwargs``). Every
callable returned has a ``__name__`` (TRL logs ``rewards/<name>/mean``) and pickles.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from rlvr_vocab.rewards.accuracy import Accuracy
from rlvr_vocab.rewards.cookbook import CookbookAnswer, CookbookFormatApprox, CookbookFormatExact, CookbookNumber
from rlvr_vocab.rewards.format import SoftOverlong, ThinkFormat, boxed_format_reward
from rlvr_vocab.rewards.graded import BinaryBoxed, BoxedAccuracy, last_number_reward

REWARD_REGISTRY: dict[str, type | Callable] = {
    "accuracy": Accuracy,  # 1/0 by math-verify, \boxed{} first (TRL's accuracy_reward)
    "last_number": last_number_reward,  # 1/0: last number (or boxed content) equals the gold number
    "boxed_format": boxed_format_reward,  # 1/0: exactly one non-empty \boxed{}
    "boxed_accuracy": BoxedAccuracy,  # 1/0 by math-verify, only an answer inside \boxed{} counts
    "binary_boxed": BinaryBoxed,  # +1 right, -1 wrong, -0.5 no \boxed{}
    "think_format": ThinkFormat,  # 1/0: <think>...</think> then an answer
    "soft_overlong": SoftOverlong,  # DAPO length penalty in [-1, 0]
    "cookbook_format_exact": CookbookFormatExact,  # 3.0 for the exact cookbook format
    "cookbook_format_approx": CookbookFormatApprox,  # +-0.5 per cookbook tag
    "cookbook_answer": CookbookAnswer,  # 3.0 / 1.5 / ratio-graded answer in <SOLUTION>
    "cookbook_number": CookbookNumber,  # 1.5 when the number in <SOLUTION> is right
}


class AnswerAfterSpan:
    r"""A correctness reward applied to the answer after the thinking span, not to the whole completion.

    An answer written inside the span does not count; a completion that ends inside a span has no answer
    (the inner reward scores an empty text). The trainer and the evaluation pass ``completion_answer``, the
    answer of each completion decided from its token ids (``thinking.split_completion``: a tag spelled out in
    text pieces closes nothing). Called without it (on plain texts), the answer is the text after the last
    ``close_tag``, or the whole text when no span was used.

    Example:
        >>> from rlvr_vocab.rewards.graded import last_number_reward
        >>> judge = AnswerAfterSpan(last_number_reward, "</think>", starts_inside=True)
        >>> judge(["3 + 4 = 7 </think> 7", "so 7", "</think> 8"], answer=["7"] * 3)
        [1.0, 0.0, 0.0]
        >>> judge(["any text"], answer=["7"], completion_answer=["\\boxed{7}"])
        [1.0]
    """

    def __init__(self, inner: Callable, close_tag: str, starts_inside: bool = False, open_tag: str = "<think>"):
        self.inner = inner
        self.close_tag = close_tag
        self.open_tag = open_tag
        self.starts_inside = starts_inside
        self.__name__ = inner.__name__  # TRL logs rewards/<name>/mean: the wrapped reward keeps its name
        self.correct_reward = getattr(inner, "correct_reward", 1.0)

    def text_answer(self, text: str) -> str:
        """The answer of a plain text: after the last close tag; empty when it ends inside a span."""
        head, closed, tail = text.rpartition(self.close_tag)
        if closed:
            return "" if self.open_tag in tail else tail
        if self.starts_inside or self.open_tag in text:
            return ""
        return text

    def __call__(self, completions: list, completion_answer: list | None = None, **kwargs) -> list[float | None]:
        if completion_answer is None:
            from rlvr_vocab.rewards.text import completion_text

            completion_answer = [self.text_answer(completion_text(c)) for c in completions]
        return self.inner([a if a is not None else "" for a in completion_answer], **kwargs)


def judges_answer(func: Callable) -> bool:
    """Whether a reward judges the final answer (correctness, or the answer's format) rather than the whole text."""
    return bool(getattr(func, "judges_answer", hasattr(func, "correct_reward")))


def for_span(funcs: list[Callable], open_tag: str, close_tag: str, starts_inside: bool) -> list[Callable]:
    """The reward functions for runs with a thinking span: answer rewards judge only the answer after it.

    Span-aware rewards (``think_format``) learn the tags and whether the prompt opens the span.
    """
    wrapped = []
    for func in funcs:
        if hasattr(func, "use_span"):
            func.use_span(open_tag, close_tag, starts_inside)
            wrapped.append(func)
        elif judges_answer(func):
            wrapped.append(AnswerAfterSpan(func, close_tag, starts_inside, open_tag))
        else:
            wrapped.append(func)
    return wrapped


def _as_dict(node: Any) -> dict:
    """A plain dict from a dict or an OmegaConf node (None -> {})."""
    if node is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(node, DictConfig):
            return OmegaConf.to_container(node, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if not isinstance(node, Mapping):
        raise ValueError(f"expected a mapping, got {type(node).__name__}: {node!r}")
    return dict(node)


def _get(cfg: Any, key: str) -> Any:
    return cfg.get(key) if hasattr(cfg, "get") else getattr(cfg, key, None)


def build_reward(name: str, kwargs: Mapping | None = None) -> Callable:
    """One reward by registry name; classes are instantiated with ``kwargs``.

    Example:
        >>> build_reward("soft_overlong", {"max_completion_length": 64, "soft_cache_length": 16}).__name__
        'soft_overlong'
    """
    if name not in REWARD_REGISTRY:
        raise ValueError(f"reward.funcs: unknown reward {name!r}; valid names: {', '.join(sorted(REWARD_REGISTRY))}.")
    entry = REWARD_REGISTRY[name]
    kwargs = dict(kwargs or {})
    if not isinstance(entry, type):
        if kwargs:
            raise ValueError(f"reward.kwargs.{name}: {name!r} takes no arguments, got {sorted(kwargs)}.")
        return entry
    try:
        return entry(**kwargs)
    except TypeError as e:  # unknown or missing constructor argument
        raise ValueError(f"reward.kwargs.{name}: {e}") from e


def get_reward_funcs(reward_cfg: Any) -> tuple[list[Callable], list[float]]:
    """(reward callables, weights) for TRL's ``reward_funcs`` and ``GRPOConfig.reward_weights``.

    Args:
        reward_cfg: the ``reward`` config group (or a dict) with ``funcs`` (names), ``weights`` (one
            per function, or null for all 1.0) and ``kwargs`` (``{name: {constructor argument: value}}``).

    Example:
        >>> funcs, weights = get_reward_funcs({"funcs": ["last_number", "boxed_format"], "weights": [1.0, 0.2]})
        >>> [f.__name__ for f in funcs], weights
        (['last_number', 'boxed_format'], [1.0, 0.2])
    """
    funcs = _get(reward_cfg, "funcs")
    if isinstance(funcs, str):
        funcs = [funcs]
    funcs = list(funcs or [])
    if not funcs:
        raise ValueError(f"reward.funcs is empty; choose from: {', '.join(sorted(REWARD_REGISTRY))}.")
    unknown = [name for name in funcs if name not in REWARD_REGISTRY]
    if unknown:
        raise ValueError(
            f"reward.funcs: unknown reward(s) {unknown}; valid names: {', '.join(sorted(REWARD_REGISTRY))}."
        )
    weights = _get(reward_cfg, "weights")
    weights = [1.0] * len(funcs) if weights is None else [float(w) for w in weights]
    if len(weights) != len(funcs):
        raise ValueError(
            f"reward.weights has {len(weights)} entries but reward.funcs has {len(funcs)} ({funcs}): give one weight "
            "per function, or null for all 1.0."
        )
    all_kwargs = _as_dict(_get(reward_cfg, "kwargs"))
    stray = sorted(set(all_kwargs) - set(funcs))
    if stray:
        raise ValueError(f"reward.kwargs has arguments for {stray}, which are not in reward.funcs {funcs}.")
    return [build_reward(name, _as_dict(all_kwargs.get(name))) for name in funcs], weights
