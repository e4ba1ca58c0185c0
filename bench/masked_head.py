"""A faster ``masked_token_logprobs`` for the reasoning vocabulary, on TRL's fused chunked log-prob kernel.

Same signature and values as ``rlvr_vocab.trainer.masked_token_logprobs``. The span mask only decides which
rows of the output head a position's softmax runs over, so the masked log-prob is a plain log-softmax over
    * the whole head (standard + reasoning rows) at positions inside the thinking span, and
    * the standard rows alone at positions outside it (a reasoning label there has probability 0: -inf),
and each of the two is exactly what TRL's ``ChunkedLogProbFunction`` computes (Triton on CUDA: one pass of
online-logsumexp statistics per vocabulary tile, backward recomputes each tile; torch ops on the CPU), with
entropy from the same pass. No fp32 ``[T, V]`` logits, no activation-checkpoint recompute of a chain of
elementwise ops, and the reasoning rows cost FLOPs only at positions inside the span.

``bench_grpo.py --fused-head`` swaps it in for the trainer's version (``rlvr_vocab.trainer`` looks the name
up at call time); BENCHMARKS.md has both measurements.
"""

from __future__ import annotations

import torch

TRL_VOCAB_CHUNK = 32768  # vocabulary tile of TRL's kernel (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE)


_FALLBACK = None  # the trainer's own version, for output heads that are not a plain nn.Linear (PEFT wrappers)


def masked_token_logprobs(
    hidden: torch.Tensor,
    head,
    labels: torch.Tensor,
    inside: torch.Tensor,
    standard_size: int,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob (and entropy) of each label under the span-masked, temperature-scaled softmax.

    ``hidden``: [T, d]; ``head``: the output layer; ``labels``: [T]; ``inside``: [T] bool (may the next token
    be a reasoning id). A head that is not a plain ``nn.Linear`` (a PEFT wrapper with trainable rows) goes to
    the trainer's chunked version. ``chunk_size`` only matters there (TRL's kernel tiles tokens itself).
    """
    if type(head) is not torch.nn.Linear:
        from rlvr_vocab import trainer

        fallback = _FALLBACK or trainer.masked_token_logprobs
        return fallback(hidden, head, labels, inside, standard_size, temperature, chunk_size, entropy)
    from trl.kernels import ChunkedLogProbFunction

    weight, bias = head.weight, head.bias
    outputs = ("entropy",) if entropy else ()
    logps = hidden.new_zeros(labels.shape, dtype=torch.float32)
    ents = hidden.new_zeros(labels.shape, dtype=torch.float32) if entropy else None

    def run(rows, w, b, targets):
        lp, ent, *_ = ChunkedLogProbFunction.apply(
            hidden[rows], w, b, targets, temperature, TRL_VOCAB_CHUNK, None, 1.0, outputs
        )
        return lp, ent

    if inside.any():
        lp, ent = run(inside, weight, bias, labels[inside])
        logps = logps.masked_scatter(inside, lp)
        if entropy:
            ents = ents.masked_scatter(inside, ent)
    outside = ~inside
    if outside.any():
        out_labels = labels[outside]
        standard = out_labels < standard_size
        lp, ent = run(
            outside,
            weight[:standard_size],
            None if bias is None else bias[:standard_size],
            torch.where(standard, out_labels, 0),
        )
        lp = torch.where(standard, lp, float("-inf"))  # a reasoning id outside the span cannot have been sampled
        logps = logps.masked_scatter(outside, lp)
        if entropy:
            ents = ents.masked_scatter(outside, ent)
    return logps, ents


def install() -> None:
    """Make ``rlvr_vocab.trainer`` use this version (its reasoning head looks the function up at call time)."""
    global _FALLBACK
    import rlvr_vocab.trainer

    if rlvr_vocab.trainer.masked_token_logprobs is not masked_token_logprobs:
        _FALLBACK = rlvr_vocab.trainer.masked_token_logprobs
    rlvr_vocab.trainer.masked_token_logprobs = masked_token_logprobs
