"""rlvr-vocab: GRPO on verifiable math rewards, with an optional reasoning vocabulary.

from rlvr_vocab import load_checkpoint
model, tokenizer = load_checkpoint("outputs/reasoning/<run>/checkpoint-100")
"""

__all__ = ["ReasoningVocab", "load_checkpoint"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so that `import rlvr_vocab.<module>` (CLIs, Slurm helpers) does not pay for torch + transformers.
    if name in __all__:
        from rlvr_vocab import reasoning_vocab

        return getattr(reasoning_vocab, name)
    raise AttributeError(f"module 'rlvr_vocab' has no attribute {name!r}")
