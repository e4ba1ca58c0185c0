"""rlvr-vocab: GRPO on verifiable math rewards, with an optional reasoning vocabulary.

from rlvr_vocab import load_checkpoint
model, tokenizer = load_checkpoint("outputs/reasoning/<run>/checkpoint-100")
"""

from rlvr_vocab.reasoning_vocab import ReasoningVocab, load_checkpoint

__all__ = ["ReasoningVocab", "load_checkpoint"]
__version__ = "0.1.0"
