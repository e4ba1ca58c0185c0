"""Reward functions for GRPO, by name (``registry.REWARD_REGISTRY``); ``conf/reward/*.yaml`` picks them.

All take TRL's call ``f(prompts=..., completions=..., completion_ids=..., **dataset_columns)`` and
return one ``float`` (or ``None``: does not apply) per completion. The gold answer is the ``answer``
column. Modules: ``accuracy`` (math-verify), ``graded`` (last_number, boxed_accuracy, binary_boxed), ``format``
(boxed_format, think_format, soft_overlong), ``cookbook`` (issue #5's four graded rewards).
"""

from rlvr_vocab.rewards.accuracy import Accuracy, gold_is_parseable, normalize_gold
from rlvr_vocab.rewards.registry import REWARD_REGISTRY, build_reward, get_reward_funcs

__all__ = ["REWARD_REGISTRY", "Accuracy", "build_reward", "get_reward_funcs", "gold_is_parseable", "normalize_gold"]
