"""Fast GRPO rollouts without vLLM: a ``custom_generate`` for ``model.generate`` over a static KV cache.

``model.generate(**inputs, generation_config=gc, custom_generate=FastSampler(...))`` samples what
transformers' own loop would, by construction: transformers resolves the config (model defaults, min/max
lengths, special tokens, padding, position ids) and builds the logits processors as on TRL's path,
including the ``ReasoningMaskProcessor`` that ``reasoning_vocab.attach_generation_mask`` inserts; the
sampler replays them as typed graph-safe steps. Anything it cannot replay exactly (an unknown processor,
stop strings, beam search, sliding-window layers, flash-attention...) goes to transformers' own ``_sample``
with the same arguments, which *is* TRL's path, and says so once in the log. ``RLVRGRPOTrainer`` (trainer.py)
holds the TRL side: padding, unwrapping, the EOS cut.

One job per module:
  * ``plan``: transformers' processors and stopping criteria -> a typed ``Plan`` of steps;
  * ``cache``: the static KV cache (prefill writes, live-row views, compaction);
  * ``attention``: the decode attention op (eager maths or the Triton kernel) and transformers' hook;
  * ``fused``: the decode step's decoder layer with concatenated Q/K/V and gate/up projections;
  * ``prefill``: the prompt's forward through those fused layers (its norms, RoPE, cache write and SiLU x up as
    Triton kernels: 15 kernel launches per layer instead of transformers' ~54);
  * ``triton_decode``: the flash-decoding Triton kernels (optional: Triton need not be installed);
  * ``triton_pick``: the token pick in one Triton pass over the logits (noise drawn in the kernel);
  * ``triton_linear``: the fused layers' o and down projections at a few rows (split over K in one kernel), and
    their gate/up GEMM with SiLU x up in one kernel (``gated``);
  * ``state``: per-row decode state, the graph-safe token pick (PyTorch ops or ``triton_pick``), compaction;
  * ``sampler``: ``FastSampler``: prefill, the decode loop, CUDA graphs, torch.compile, fallbacks.
"""

from rlvr_vocab.sampling.cache import StaticKVCache
from rlvr_vocab.sampling.plan import (
    BlockAt,
    BlockBefore,
    Plan,
    ReasoningSpan,
    RepetitionPenalty,
    Step,
    Warper,
    build_plan,
)
from rlvr_vocab.sampling.sampler import FastSampler, unsupported_model

__all__ = [
    "BlockAt",
    "BlockBefore",
    "FastSampler",
    "Plan",
    "ReasoningSpan",
    "RepetitionPenalty",
    "StaticKVCache",
    "Step",
    "Warper",
    "build_plan",
    "unsupported_model",
]
