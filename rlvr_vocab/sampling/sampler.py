"""FastSampler: one prefill, then a decode loop over a static KV cache, CUDA-graph captured and compiled.

Where the time of a decode step goes, and what this does about it (BENCHMARKS.md has the measurements):

* reading the weights once per step (~1.2 GB for Qwen3-0.6B) and the KV cache up to the current length:
  the floor. The attention is the Triton flash-decoding kernel of ``triton_decode`` (split over the context,
  GQA fused, the K/V write fused, exit at the device-side length), or, on the CPU and as the fallback, two
  batched matmuls over the first ``window`` slots (``attention.eager_decode_attention``);
* launching kernels (~165 per 28-layer step at 32 rows: 12-06 G's profile counted 192 before ``gated`` took one
  per layer out, ~280 before the folded norms; BENCHMARKS.md's profiles):
  the decode layers use ``fused``'s concatenated projections (four GEMMs per layer instead of seven; the q/k norm
  and RoPE inside the attention kernel) where they are plain ``nn.Linear``s; at up to 64 rows the o and down
  projections are ``triton_linear``'s (residual add inside), the two RMSNorms are folded into the projections
  after them (``norm_fold``), and gate/up and SiLU x up are one kernel (``triton_linear.gated``): five kernels per
  layer (qkv, attention, o, gated, down); on CUDA the decode forward and the logits processing are
  ``torch.compile``d (batch and cache length dynamic, so one compilation serves every batch size and length)
  and each step is one captured CUDA graph. With the Triton kernel one graph per live-batch size serves every
  length; the eager attention needs one per ``window`` (128 slots);
* the token pick: ``triton_pick``'s one pass over the [n, V] logits with the noise drawn in the kernel, where
  the plan is temperature, repetition penalty and masks (TRL's defaults), else the plan's PyTorch ops over an
  Exp(1) draw (``state.pick``);
* host syncs: none inside the loop except a stop check every ``stop_check_every`` steps;
* the prefill: on CUDA the fused layers' prefill (``prefill``: 15 kernel launches per layer, the norms, RoPE, the
  cache write and SiLU x up each one Triton kernel: 17.9 ms for 32 x 83 tokens on an H100) where they are fused, else
  transformers' eager layers (~54 kernels per layer, whose launches bound a 32-row prefill: ~30 ms); or, with
  ``prefill="compiled"``, transformers' layers under one ``torch.compile`` with dynamic shapes (slow to compile);
* finished rows: at each stop check, when the live rows fit in half the current batch (power-of-two
  buckets, at least ``min_rows``), they are compacted to the front of every buffer and the loop continues
  on the smaller batch, so the cost follows the live sequences. The noise is drawn per original row, so
  compaction changes no sampled token.

The cache, fused weights and graphs are kept for the next call when the KV cache and the fused weights are at
most ``keep_bytes`` and freed otherwise, so long completions leave the memory to the training step.
"""

from __future__ import annotations

import contextlib
import math

import torch as th
from loguru import logger

from rlvr_vocab.sampling import attention as attn
from rlvr_vocab.sampling import fused as fusion
from rlvr_vocab.sampling import norm_fold, triton_env, triton_linear, triton_pick
from rlvr_vocab.sampling import prefill as fused_prefill
from rlvr_vocab.sampling.cache import StaticKVCache
from rlvr_vocab.sampling.plan import Plan, build_plan
from rlvr_vocab.sampling.state import DecodeState, pick

WINDOW = 128  # cache slots per window of the eager attention
CACHE_ROUND = 256  # the cache length is rounded up to a multiple of this many slots
CACHE_SLACK = 512  # a kept session serves a call that needs up to this many slots fewer than it holds
STOP_CHECK_EVERY = 16  # decode steps between host-side stop checks (and compactions)
MIN_ROWS = 8  # compaction never goes below this many rows
KEEP_BYTES = 4 * 2**30  # keep cache + graphs between calls when KV cache + fused weights are at most this large
COMPILE = True  # torch.compile the decode step on CUDA (FastSampler(compile=...) overrides it)
SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama")  # plain softmax attention, no sliding window / sinks / softcap
ATTENTION_CHOICES = ("auto", "triton", "eager")
PICK_CHOICES = ("auto", "triton", "torch")
LINEAR_SETS = {  # FastSampler(linear=...) -> the fused layers' projections run by triton_linear at a few rows
    "torch": (),
    "o": ("o",),
    "o+down": ("o", "down"),
    "o+down+qkv": ("o", "down", "qkv"),
    "o+down+gated": ("o", "down", "gated"),  # gated: the gate/up GEMM with SiLU x up in one kernel
    "o+down+qkv+gated": ("o", "down", "qkv", "gated"),
    "all": ("qkv", "o", "gate_up", "down"),
}
LINEAR_CHOICES = ("auto", *LINEAR_SETS)
# what auto runs where triton_linear passes its check on CUDA: o, down, and gate/up with SiLU x up (gated): 1.41 against
# 1.43 ms (o+down) per 32 x 512 decode step on an H200 (12-06 J, BENCHMARKS.md)
AUTO_LINEAR = "o+down+gated"
FOLD_CHOICES = ("auto", "on", "off")
KERNELS = {  # the Triton kernels that auto checks before use: what the log calls each, and the fallback
    "attention": ("Triton decode attention", "eager"),
    "pick": ("Triton token pick", "PyTorch"),
    "linear": ("Triton projections", "torch"),
    "fold": ("folded SiLU x up kernel", "torch"),
    "prefill": ("Triton prefill kernels", "transformers' layers for the prefill"),
}
PDL_CHOICES = ("auto", "on", "off")
PREFILL_CHOICES = ("auto", "fused", "eager", "compiled")
# auto launches the step's Triton kernels with programmatic dependent launch (Hopper+)? Mixed on an H200 (12-06 F):
# 1.47 against 1.45 ms per 32 x 512 step, 2.89 against 2.91 at 32 x 4,096; so not
AUTO_PDL = False
# auto folds the RMSNorms (norm_fold) in sessions of at most triton_linear.MAX_ROWS rows on CUDA: 1.45 against 1.57 ms
# per 32 x 512 step and 2.91 against 2.96 at 32 x 4,096 on an H200 (12-06 F), 1.66 against 1.74 and 3.68 against
# 3.76 on an H100 (12-06 E), side by side (BENCHMARKS.md)
AUTO_FOLD = True


def unsupported_model(model) -> str | None:
    """Why the fast path cannot reproduce transformers' sampling for this model (None: it can)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    if config.is_encoder_decoder:
        return "encoder-decoder model"
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {config.model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
    if config._attn_implementation not in ("sdpa", "eager"):
        return f"attn_implementation={config._attn_implementation!r} (sdpa or eager needed)"
    if any(t != "full_attention" for t in (getattr(config, "layer_types", None) or ["full_attention"])):
        return "sliding-window / hybrid attention layers"
    return None


def _require_triton(option: str, kernels, device: th.device, value: str = "triton") -> None:
    """``FastSampler(option=value)``: raise unless the kernel module ``kernels`` can run on ``device``."""
    if kernels.triton is None:
        raise RuntimeError(f"FastSampler({option}={value!r}): Triton is not installed")
    if device.type != "cuda" and not kernels.interpreted():
        raise RuntimeError(
            f"FastSampler({option}={value!r}) on CPU tensors needs TRITON_INTERPRET=1 set before Triton is imported "
            "(Triton's interpreter)"
        )


@contextlib.contextmanager
def _attention_implementation(config, name: str):
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


def _mark_dynamic(tensor: th.Tensor | None, *dims: int) -> None:
    if tensor is not None:
        for d in dims:
            if tensor.shape[d] > 1:
                th._dynamo.maybe_mark_dynamic(tensor, d)


class Session:
    """Everything one batch needs across decode steps (and across calls, when kept): cache, state, graphs."""

    def __init__(
        self,
        key: tuple,
        model,
        batch: int,
        cache_len: int,
        device: th.device,
        attention: str,
        fused,
        pick: str,
        linear: tuple[str, ...] = (),
        fold_impl: str | None = None,
        pdl: bool = False,
    ):
        self.key = key
        self.fused: fusion.FusedWeights | None = fused  # the decode layers' fused projections (None: HF's layers)
        self.cache_len = cache_len
        self.cache = StaticKVCache(model.config.num_hidden_layers, cache_len)
        self.state = DecodeState(batch, cache_len, device)
        self.attention = attention  # the decode attention in use: "triton" or "eager"
        self.pick = pick  # the token pick in use: "triton" (triton_pick) or "torch" (state.pick's PyTorch ops)
        self.linear = linear  # the fused layers' projections run by triton_linear at <= MAX_ROWS rows (LINEAR_SETS)
        self.fold_impl = fold_impl  # with fused.fold: norm_fold.silu_mul's implementation ("triton" or "torch")
        self.pdl = pdl  # the step's Triton kernels launched with programmatic dependent launch
        self.prefill = "eager"  # the last prefill's forward: "fused", "compiled" or "eager"
        self.prefill_impl: str | None = None  # the fused prefill's kernels ("triton" or "torch"); None: not fused
        self.linear_work = None  # triton_linear's split-K workspace (counters, partials), with linear
        if linear and fused is not None:
            self.linear_work = triton_linear.workspace(device, fused.max_columns())
        self.graphs: dict[tuple, th.cuda.CUDAGraph] = {}  # (live rows, window or None) -> captured step
        self.warmed: set[tuple] = set()  # keys whose step ran once uncaptured (compiles, Triton JIT)
        self.pool = None
        self.graphs_failed = False

    def nbytes(self) -> int:
        """What the session holds on the device beyond the graphs: the KV cache and the fused weights."""
        return self.cache.nbytes() + (self.fused.nbytes() if self.fused is not None else 0)


class FastSampler:
    """``custom_generate`` for ``model.generate``: static cache, flash-decoding, CUDA graphs, compaction.

    Use: ``model.generate(**inputs, generation_config=gc, custom_generate=FastSampler(...))``. After a call,
    ``last_used_fast_path`` says whether it ran (else transformers' ``_sample`` did), ``last_logprobs`` holds
    the processed log-probs of the sampled tokens [B, n], ``last_paths`` what it ran (attention, pick, projections,
    folded norms), ``stats`` counts ``captures`` (CUDA graphs),
    ``compiles`` (torch.compile wrappers created), ``compactions``, ``fallbacks`` (calls given to
    transformers' loop), ``failures`` (Triton / compile / capture failures, each followed by the eager
    way), ``replays`` (graph replays), ``steps`` (decode steps) and ``row_steps`` (rows computed, summed over
    decode steps: what compaction saves).

    Args:
        reasoning_vocab: apply its span mask even where ``model.generate`` does not add the processor.
        compile: ``torch.compile`` the decode forward and the logits processing (None: on CUDA only). Falls
            back to eager, with one log line, if compilation fails.
        attention: ``auto`` (the Triton kernel on CUDA when it compiles and passes a check against the
            eager maths, else eager), ``triton`` or ``eager`` (forced; a forced Triton failure raises).
        compaction: drop finished rows from the batch (see the module docstring).
        fuse: decode with ``fused``'s layer (one GEMM for Q/K/V, one for gate/up) where the layers allow it.
        pick: the token pick: ``auto`` (``triton_pick``'s one-pass kernel on CUDA when the plan is temperature,
            repetition penalty and masks only and the kernel passes a check against the PyTorch pick, else
            PyTorch ops), ``triton`` (forced; CPU tensors need Triton's interpreter) or ``torch``.
        min_rows: compaction never goes below this batch size.
        window: slots per window of the eager attention.
        stop_check_every: decode steps between host-side stop checks (and compactions).
        force_eos_at: BENCH ONLY. int64 [B]: for row b, token number ``force_eos_at[b]`` of each call is EOS
            (-1: never). Lets a benchmark spread completion lengths on random weights. Changes the
            distribution; never set it in training.
        keep_bytes: keep the cache, fused weights and graphs between calls when together they are at most this
            large.
        linear: the fused layers' projections run by ``triton_linear`` (split over K in one kernel, the residual
            add inside) at up to ``triton_linear.MAX_ROWS`` live rows: a ``LINEAR_SETS`` name (``o``, ``o+down``,
            ``o+down+qkv``, ``o+down+gated`` (gate/up and SiLU x up in one kernel: ``triton_linear.gated``),
            ``o+down+qkv+gated``, ``all``;
            ``torch``: none), or ``auto`` (``AUTO_LINEAR`` on CUDA when the kernel passes a
            check against the PyTorch maths, else none).
        fold: fold each decoder layer's two RMSNorms into the projections after them (``norm_fold``: two kernels
            per layer fewer, in other roundings than transformers'): ``on``, ``off``, or ``auto`` (``AUTO_FOLD``,
            in sessions of at most ``triton_linear.MAX_ROWS`` rows on CUDA). Needs the fused layers.
        pdl: launch the decode step's Triton kernels (attention, projections, SiLU x up) with programmatic
            dependent launch, each waiting for the kernel before it and letting the next launch once its loop is
            done: ``on`` (CUDA, compute capability 9+), ``off``, or ``auto`` (``AUTO_PDL`` where it can run).
        prefill: the prompt's forward: ``fused`` (``prefill.layer_forward`` over the fused layers' buffers: 15
            kernel launches per layer, its norms, RoPE, cache write and SiLU x up in Triton kernels: 8-14 ms less per
            32-row call on an H100, BENCHMARKS.md 12-07 E; in a folded session with the decode step's roundings;
            on CPU tensors without Triton's interpreter the same maths in PyTorch ops; needs the fused layers),
            ``eager`` (transformers' layers: ~54 kernels per layer launched from Python, which a 32-row prefill
            waits on: ~30 ms of a 32 x 512 call on an H100), ``compiled`` (transformers' layers
            ``torch.compile``d with the batch and the prompt length dynamic, so one compilation serves every call
            of 2 rows or more after the model's first, which is eager: ~20 ms less per 32-row call on an H100, but
            ~110 s to compile on a cold Inductor cache; BENCHMARKS.md, 12-07 B; a failed compilation falls back to
            eager, with one log line), or ``auto`` (``fused`` on CUDA where the layers are fused and its kernels pass
            a check, else ``eager``).
    """

    def __init__(
        self,
        reasoning_vocab=None,
        compile: bool | None = None,
        attention: str = "auto",
        compaction: bool = True,
        min_rows: int = MIN_ROWS,
        window: int = WINDOW,
        stop_check_every: int = STOP_CHECK_EVERY,
        force_eos_at: th.Tensor | None = None,
        keep_bytes: int = KEEP_BYTES,
        fuse: bool = True,
        pick: str = "auto",
        linear: str = "auto",
        fold: str = "auto",
        pdl: str = "auto",
        prefill: str = "auto",
    ):
        if attention not in ATTENTION_CHOICES:
            raise ValueError(f"FastSampler(attention={attention!r}): choose one of {ATTENTION_CHOICES}")
        if pick not in PICK_CHOICES:
            raise ValueError(f"FastSampler(pick={pick!r}): choose one of {PICK_CHOICES}")
        if linear not in LINEAR_CHOICES:
            raise ValueError(f"FastSampler(linear={linear!r}): choose one of {LINEAR_CHOICES}")
        if fold not in FOLD_CHOICES:
            raise ValueError(f"FastSampler(fold={fold!r}): choose one of {FOLD_CHOICES}")
        if pdl not in PDL_CHOICES:
            raise ValueError(f"FastSampler(pdl={pdl!r}): choose one of {PDL_CHOICES}")
        if prefill not in PREFILL_CHOICES:
            raise ValueError(f"FastSampler(prefill={prefill!r}): choose one of {PREFILL_CHOICES}")
        if min_rows < 1 or window < 1 or stop_check_every < 1:
            raise ValueError("FastSampler: min_rows, window and stop_check_every must be >= 1")
        self.reasoning_vocab = reasoning_vocab
        self.compile = compile
        self.attention = attention
        self.compaction = compaction
        self.min_rows = min_rows
        self.window = window
        self.stop_check_every = stop_check_every
        self.force_eos_at = force_eos_at
        self.keep_bytes = keep_bytes
        self.fuse = fuse
        self.pick = pick
        self.linear = linear
        self.fold = fold
        self.pdl = pdl
        self.prefill = prefill
        self.session: Session | None = None
        self.last_logprobs: th.Tensor | None = None  # [B, n] processed log-probs of the last call's tokens
        self.last_used_fast_path = False
        self.last_paths: dict = {}  # what the last fast call ran: attention, pick, linear, fold (norm_fold's impl)
        self.stats = dict(
            captures=0, compiles=0, compactions=0, fallbacks=0, failures=0, replays=0, steps=0, row_steps=0
        )
        self._compiled: dict[int, object] = {}  # id(model) -> compiled forward
        self._compiled_prefill: dict[int, object] = {}  # id(model) -> compiled prefill forward (prefill=)
        self._prefill_compile_failed = False
        self._kv_layouts: dict[int, tuple] = {}  # id(model) -> its KV cache's layout, from an eager prefill
        self._pickers: dict[tuple, object] = {}  # plan signature -> compiled pick
        self._compile_failed = False
        # per Triton kernel ("attention", "pick", "linear", "fold"): the keys (dtype, shapes, device) its check ran
        # for, and why it is not used (auto), once its check or a run failed
        self._checked: dict[str, set] = {kind: set() for kind in KERNELS}
        self._failure: dict[str, str | None] = dict.fromkeys(KERNELS)
        self._logged: set[str] = set()
        attn.register()

    def _log_once(self, message: str) -> None:
        if message not in self._logged:
            self._logged.add(message)
            logger.info(message)

    # transformers calls decoding_method(model, input_ids, logits_processor=..., stopping_criteria=...,
    # generation_config=..., **model_kwargs)
    def __call__(self, model, input_ids, logits_processor, stopping_criteria, generation_config, **model_kwargs):
        reason = unsupported_model(model)
        plan = None
        if reason is None:
            plan, reason = build_plan(
                logits_processor, stopping_criteria, generation_config, input_ids.shape[1], self.reasoning_vocab
            )
        if plan is None:
            from transformers.generation.utils import GenerationMixin

            self._log_once(f"generation_backend=fast: {reason}; using transformers' sampling loop for it")
            self.last_used_fast_path = False
            self.stats["fallbacks"] += 1
            return GenerationMixin._sample(
                model,
                input_ids,
                logits_processor=logits_processor,
                stopping_criteria=stopping_criteria,
                generation_config=generation_config,
                synced_gpus=False,
                streamer=None,
                **model_kwargs,
            )
        self.last_used_fast_path = True
        attention_mask = model_kwargs.get("attention_mask")
        if attention_mask is None:
            attention_mask = th.ones_like(input_ids)
        position_ids = model_kwargs.get("position_ids")
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill_(attention_mask == 0, 1)
        return self.generate(model, input_ids, attention_mask, position_ids, plan)

    # ------------------------------------------------------------------------------------ one batch
    @th.no_grad()
    def generate(self, model, input_ids, attention_mask, position_ids, plan: Plan) -> th.Tensor:
        """Prompt + sampled tokens [B, p + n] (n: tokens until every row finished, at most max_length - p)."""
        batch, prompt_len = input_ids.shape
        new_tokens = plan.max_length - prompt_len
        if self.force_eos_at is not None and self.force_eos_at.numel() != batch:
            raise ValueError(f"FastSampler(force_eos_at=...) has {self.force_eos_at.numel()} rows, the batch {batch}")
        s = self._session(model, batch, prompt_len + new_tokens, input_ids.device, plan)
        try:
            if s.fused is not None:
                s.fused.refresh()  # this call's weights (training changed them since the last call); the prefill's too
            logits = self._prefill(model, s, input_ids, attention_mask, position_ids)
            st = s.state
            st.start(plan, input_ids, attention_mask, position_ids, logits.shape[-1], self.force_eos_at, s.pick)
            self._pick_first(plan, logits, s)
            n = self._decode(model, s, plan, prompt_len, new_tokens)
            self.last_logprobs = st.logp[:, :n].clone()
            return th.cat([input_ids, st.out[:, :n]], dim=1)
        finally:
            self.last_paths = {
                "attention": s.attention, "pick": s.pick, "linear": s.linear, "fold": s.fold_impl, "pdl": s.pdl,
                "prefill": s.prefill,
            }  # fmt: skip
            if s.nbytes() > self.keep_bytes:
                self.session = None  # leave the memory to the training step

    def _session(self, model, batch: int, needed: int, device, plan: Plan) -> Session:
        params = tuple(t.data_ptr() for t in model.parameters()) + tuple(t.data_ptr() for t in model.buffers())
        # what captured graphs bake in: the model's weights, the batch, the plan, whether EOS is forced
        key = (id(model), batch, str(device), plan.signature(), hash(params), self.force_eos_at is not None)
        s = self.session
        if s is not None and s.key == key and needed <= s.cache_len <= needed + CACHE_SLACK:
            return s
        self.session = None  # free the old one first
        cache_len = math.ceil(needed / CACHE_ROUND) * CACHE_ROUND
        fused = None
        fold = self.fold == "on" or (
            self.fold == "auto" and AUTO_FOLD and device.type == "cuda" and batch <= triton_linear.MAX_ROWS
        )
        if self.fuse:
            fused, reason = fusion.FusedWeights.build(model, fold=fold)
            if reason is not None:
                self._log_once(f"generation_backend=fast: decode layers not fused ({reason}); transformers' layers")
        if self.fold == "on" and fused is None:
            raise ValueError(
                "FastSampler(fold='on') folds the RMSNorms into the fused decode layers: "
                + ("fuse=False" if not self.fuse else "the layers cannot be fused (see the log)")
            )
        if self.fold == "on" and not fused.fold:
            raise ValueError(
                "FastSampler(fold='on'): the folded SiLU x up needs every decoder layer's MLP activation SiLU"
            )
        attention = self._resolve_attention(model, device)
        linear = self._resolve_linear(fused, model.dtype, device)
        fold_impl = self._resolve_fold_impl(model.dtype, device) if fused is not None and fused.fold else None
        pick = self._resolve_pick(plan, device)
        pdl = self._resolve_pdl(device)
        self.session = Session(key, model, batch, cache_len, device, attention, fused, pick, linear, fold_impl, pdl)
        self.session.prefill_impl = self._resolve_prefill(fused, model.dtype, device)
        return self.session

    def _usable(self, kind: str, key, check) -> bool:
        """Whether the Triton kernel ``kind`` (``KERNELS``) may run: ``check()`` (None or why not) runs once per
        ``key``; after a failure of its check or of a run, never again (said once)."""
        if self._failure[kind] is None and key not in self._checked[kind]:
            self._checked[kind].add(key)
            self._failure[kind] = check()
            self.stats["failures"] += self._failure[kind] is not None
        if self._failure[kind] is not None:
            name, fallback = KERNELS[kind]
            self._log_once(f"generation_backend=fast: {name} unusable ({self._failure[kind]}); {fallback}")
            return False
        return True

    def _failed(self, kind: str, what: str) -> None:
        """A run of the Triton kernel ``kind`` failed with ``what``: its fallback from now on, said once."""
        self._failure[kind] = what
        name, fallback = KERNELS[kind]
        self._log_once(f"generation_backend=fast: {name} failed ({what}); {fallback}")

    def _resolve_pdl(self, device: th.device) -> bool:
        """Whether a new session launches its Triton kernels with programmatic dependent launch."""
        runs = device.type == "cuda" and th.cuda.get_device_capability(device)[0] >= 9
        if self.pdl == "on" and not runs:
            raise ValueError("FastSampler(pdl='on') needs a CUDA device of compute capability 9 (Hopper) or newer")
        return runs and (self.pdl == "on" or (self.pdl == "auto" and AUTO_PDL))

    def _resolve_fold_impl(self, dtype: th.dtype, device: th.device) -> str:
        """``norm_fold.silu_mul``'s implementation in a folded session: its Triton kernel where it runs and passes
        its check (CUDA, or CPU tensors under Triton's interpreter), else PyTorch ops."""
        runs = norm_fold.triton is not None and (device.type == "cuda" or norm_fold.interpreted())
        usable = runs and self._usable("fold", (dtype, str(device)), lambda: norm_fold.check(dtype, device))
        return "triton" if usable else "torch"

    def _prefill(self, model, s: Session, input_ids, attention_mask, position_ids) -> th.Tensor:
        p = input_ids.shape[1]
        real = attention_mask.bool()
        eye = th.eye(p, dtype=th.bool, device=input_ids.device)
        causal = th.ones(p, p, dtype=th.bool, device=input_ids.device).tril()
        # padding rows attend to themselves only (no all-masked rows, so no NaN reaches the cache)
        mask = (causal & (real[:, None, :] | eye))[:, None]
        if model.config._attn_implementation == "eager":
            bias = th.zeros(mask.shape, dtype=model.dtype, device=mask.device)
            mask = bias.masked_fill_(~mask, th.finfo(model.dtype).min)
        inputs = dict(
            input_ids=input_ids,
            attention_mask=mask,  # 4-D: transformers uses it as it is
            position_ids=position_ids,
            past_key_values=s.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        if s.prefill_impl is not None:
            try:
                return self._fused_prefill(model, s, inputs)
            except Exception as err:  # noqa: BLE001 - auto: transformers' layers (they rewrite every slot written)
                if self.prefill != "auto":
                    raise
                self._failed("prefill", triton_env.error_line(err))
                self.stats["failures"] += 1
                s.prefill_impl = None
        forward = self._prefill_forward(model, s, input_ids)
        s.prefill = "eager" if forward is model else "compiled"
        if forward is not model:
            try:
                return forward(**inputs).logits[:, -1].to(dtype=th.float32, copy=True)
            except Exception as err:  # noqa: BLE001 - the eager prefill (it rewrites every slot it wrote), said once
                self._prefill_compile_failed = True
                self.stats["failures"] += 1
                s.prefill = "eager"
                self._log_once(
                    f"generation_backend=fast: the compiled prefill failed ({triton_env.error_line(err)}); eager"
                )
        logits = model(**inputs).logits[:, -1].to(dtype=th.float32, copy=True)
        self._kv_layouts[id(model)] = s.cache.layout()
        return logits

    def _fused_prefill(self, model, s: Session, inputs: dict) -> th.Tensor:
        """The prefill through ``prefill.layer_forward`` (``s.prefill_impl``'s kernels): the last token's logits."""
        first = s.fused.layers[0]
        a = first.layer.self_attn
        kv_heads = a.k_proj.out_features // a.head_dim
        layout = (kv_heads, a.head_dim, kv_heads, a.head_dim, first.qkv.dtype)  # the K/V the qkv GEMM gives
        s.cache.allocate(inputs["input_ids"].shape[0], layout, inputs["input_ids"].device)  # kept: already there
        state = {"fused": s.fused.inputs(), "fold": s.fused.fold, "fold_impl": s.fold_impl or "torch"}
        state |= {"impl": s.prefill_impl, "keys": s.cache.keys, "values": s.cache.values, "silu": s.fused.silu}
        s.prefill = "fused"
        with fusion.installed(s.fused, for_prefill=True):
            logits = model(**inputs, rlvr_prefill=state).logits[:, -1].to(dtype=th.float32, copy=True)
        self._kv_layouts[id(model)] = s.cache.layout()
        return logits

    def _resolve_prefill(self, fused, dtype: th.dtype, device: th.device) -> str | None:
        """The fused prefill's kernels in a new session: "triton", "torch" (forced on CPU tensors without Triton's
        interpreter), or None (not fused: ``eager`` / ``compiled``, or auto where it cannot run)."""
        if self.prefill in ("eager", "compiled"):
            return None
        if fused is None:
            if self.prefill == "fused":
                raise ValueError(
                    "FastSampler(prefill='fused') runs the fused decoder layers: "
                    + ("fuse=False" if not self.fuse else "the layers cannot be fused (see the log)")
                )
            return None
        runs = fused_prefill.triton is not None and (device.type == "cuda" or fused_prefill.interpreted())
        if self.prefill == "fused":
            return "triton" if runs else "torch"
        if device.type != "cuda" or not runs:
            return None
        usable = self._usable("prefill", (dtype, str(device)), lambda: fused_prefill.check(dtype, device))
        return "triton" if usable else None

    def _prefill_forward(self, model, s: Session, input_ids: th.Tensor):
        """The prefill forward (``prefill=``): compiled with dynamic shapes (once per model) or the model itself.

        The compiled forward gets an allocated cache, so it traces no allocation branch: the model's first prefill
        is eager and allocates its cache (in the dtype the layers' K/V have); later caches are allocated in that
        layout here. A one-row batch stays eager: its dims of 1 would specialise."""
        layout = self._kv_layouts.get(id(model))
        if self.prefill != "compiled" or layout is None or input_ids.shape[0] < 2 or self._prefill_compile_failed:
            return model
        s.cache.allocate(input_ids.shape[0], layout, input_ids.device)  # a kept session's: already there
        return self._compiled_once(self._compiled_prefill, model, dynamic=True)

    # ------------------------------------------------------------------------------------ attention choice
    def _resolve_attention(self, model, device: th.device) -> str:
        """The decode attention of a new session: "triton" or "eager"."""
        if self.attention == "eager":
            return "eager"
        if self.attention == "triton":
            from rlvr_vocab.sampling import triton_decode

            _require_triton("attention", triton_decode, device)
            return "triton"
        if device.type != "cuda" or not attn.triton_importable():
            return "eager"
        config = model.config
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        shape = (model.dtype, heads, kv_heads, head_dim, str(device))
        check = lambda: attn.check_triton(model.dtype, heads, kv_heads, head_dim, device)  # noqa: E731
        return "triton" if self._usable("attention", shape, check) else "eager"

    # ------------------------------------------------------------------------------------ projections choice
    def _resolve_linear(self, fused, dtype: th.dtype, device: th.device) -> tuple[str, ...]:
        """The projections a new session runs with ``triton_linear`` (``LINEAR_SETS``'s names; () for none)."""
        if self.linear == "torch":
            return ()
        names = LINEAR_SETS[AUTO_LINEAR if self.linear == "auto" else self.linear]
        if self.linear == "auto" and fused is not None and fused.small_unfit(names) is not None:
            names = tuple(n for n in names if n != "gated")  # e.g. a GELU MLP: gate/up and its activation stay torch's
        reason = "the decode layers are not fused" if fused is None else fused.small_unfit(names)
        if self.linear != "auto":
            _require_triton("linear", triton_linear, device, self.linear)
            if reason is not None:
                raise ValueError(f"FastSampler(linear={self.linear!r}): {reason}")
            return names
        if reason is not None or device.type != "cuda" or triton_linear.triton is None:
            return ()
        usable = self._usable("linear", (dtype, str(device)), lambda: triton_linear.check(dtype, device))
        return names if usable else ()

    # ------------------------------------------------------------------------------------ pick choice
    def _resolve_pick(self, plan: Plan, device: th.device) -> str:
        """The token pick of a new session: "triton" or "torch"."""
        if self.pick == "torch":
            return "torch"
        reason = triton_pick.unfusable(plan)
        if self.pick == "triton":
            _require_triton("pick", triton_pick, device)
            if reason is not None:
                raise ValueError(f"FastSampler(pick='triton'): the Triton pick cannot process this call ({reason})")
            return "triton"
        if device.type != "cuda" or triton_pick.triton is None:
            return "torch"
        if reason is not None:
            self._log_once(f"generation_backend=fast: token pick in PyTorch ops ({reason})")
            return "torch"
        return "triton" if self._usable("pick", str(device), lambda: triton_pick.check(device)) else "torch"

    def _pick_failed(self, s: Session, what: str) -> bool:
        """After a failure of the Triton pick under ``auto``: the PyTorch pick from now on (True), or False."""
        if s.pick != "triton" or self.pick != "auto":
            return False
        self._failed("pick", what)
        s.pick = "torch"
        s.state.use_torch_pick()
        return True

    def _pick_first(self, plan: Plan, logits: th.Tensor, s: Session) -> None:
        """Token 0, from the prefill's logits (uncompiled)."""
        st = s.state
        while True:
            try:
                st.draw_noise()
                pick(plan, logits, st.tensors(), s.pick)
                return
            except triton_pick.TritonPickError as err:  # the PyTorch pick from now on (auto), said once
                if not self._pick_failed(s, str(err)):
                    raise
                self.stats["failures"] += 1

    # ------------------------------------------------------------------------------------ compile
    def _use_compile(self, model) -> bool:
        wanted = self.compile if self.compile is not None else (COMPILE and next(model.parameters()).is_cuda)
        return bool(wanted) and not self._compile_failed

    def _forward(self, model):
        """The decode forward: compiled (once per model; batch and cache length dynamic) or the model itself."""
        if not self._use_compile(model):
            return model
        return self._compiled_once(self._compiled, model, dynamic=False)

    def _compiled_once(self, store: dict, model, dynamic: bool):
        """``torch.compile(model, dynamic=dynamic)``, made once per model and kept in ``store``."""
        compiled = store.get(id(model))
        if compiled is None:
            compiled = store[id(model)] = th.compile(model, dynamic=dynamic)
            self.stats["compiles"] += 1
        return compiled

    def _picker(self, model, plan: Plan, impl: str):
        """``pick`` for this plan: compiled alongside a compiled forward (fuses the passes over [n, V])."""
        if not self._use_compile(model):
            return lambda logits, t: pick(plan, logits, t, impl)
        key = (plan.signature(), impl)
        picker = self._pickers.get(key)
        if picker is None:

            def run(logits, t, _plan=plan, _impl=impl):
                pick(_plan, logits, t, _impl)

            picker = self._pickers[key] = th.compile(run, dynamic=False)
            self.stats["compiles"] += 1
        return picker

    # ------------------------------------------------------------------------------------ decoding
    def _run_step(self, model, s: Session, plan: Plan) -> None:
        """One decode step on the live rows: forward (writes the fed token's K/V), then pick the next token."""
        st = s.state
        n = st.n
        forward, picker = self._forward(model), self._picker(model, plan, s.pick)
        keys, values = s.cache.views(n)
        ids, pos, mask, first = st.tok[:n, None], st.pos[:n, None], st.bias[:n], st.first[:n]
        if s.attention == "eager":  # one mask for every layer, W = st.window slots wide
            mask = attn.decode_mask(mask[:, 0, 0], st.length, st.window, keys[0].shape[1], keys[0].dtype)
        t = st.tensors()
        if forward is not model:  # batch and cache length dynamic: one compilation for every shape
            for x in (
                ids,
                pos,
                first,
                t["seen"],
                t["inside"],
                t["finished"],
                t["tok"],
                t["pos"],
                t["rows"],
                t["noise"],
            ):
                _mark_dynamic(x, 0)
            for x in (t["out"], t["logp"]):  # [B, cache length]
                _mark_dynamic(x, 0, 1)
            _mark_dynamic(mask, 0, 3)
            for x in keys + values:
                _mark_dynamic(x, 0, 2)
        decode = {"keys": keys, "values": values, "length": st.length, "start": first, "impl": s.attention}
        decode |= {"linear": s.linear, "linear_work": s.linear_work, "pdl": s.pdl}
        if s.fused is not None:
            decode |= {"fused": s.fused.inputs(), "fold": s.fused.fold, "fold_impl": s.fold_impl}
        out = forward(
            input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False, logits_to_keep=1, rlvr_decode=decode
        )
        logits = out.logits[:, -1]
        if forward is not model:
            _mark_dynamic(logits, 0)
        st.draw_noise()
        picker(logits, t)
        self.stats["steps"] += 1
        self.stats["row_steps"] += n

    def _run_safely(self, model, s: Session, plan: Plan) -> None:
        """``_run_step``; a failure of the Triton kernel (auto) or of torch.compile switches it off and retries.

        A retry is safe: the forward only rewrites the fed token's K/V slot, and ``pick`` runs after it.
        """
        while True:
            try:
                self._run_step(model, s, plan)
                return
            except Exception as err:  # noqa: BLE001 - any failure of the fast parts: the eager way, said once
                what = triton_env.error_line(err)
                if isinstance(err, triton_pick.TritonPickError) and self._pick_failed(s, what):
                    pass
                elif s.pdl and self.pdl == "auto":
                    s.pdl = False
                    self._log_once(f"generation_backend=fast: programmatic dependent launch failed ({what}); off")
                elif s.fold_impl == "triton":
                    self._failed("fold", what)
                    s.fold_impl = "torch"
                elif s.linear and self.linear == "auto":
                    self._failed("linear", what)
                    s.linear = ()
                elif s.attention == "triton" and self.attention == "auto":
                    self._failed("attention", what)
                    s.attention = "eager"
                elif self._use_compile(model):
                    self._compile_failed = True
                    self._log_once(f"generation_backend=fast: torch.compile failed ({what}); eager")
                else:
                    raise
                self.stats["failures"] += 1

    def _decode(self, model, s: Session, plan: Plan, prompt_len: int, new_tokens: int) -> int:
        """Tokens 1..new_tokens-1 (token 0 came from the prefill). Returns how many tokens were produced."""
        st = s.state
        cuda = st.tok.is_cuda
        produced = 1
        with _attention_implementation(model.config, attn.DECODE_ATTENTION), fusion.installed(s.fused):
            for t in range(1, new_tokens):
                if plan.eos_ids and t % self.stop_check_every == 0:
                    live = st.live_count()  # the loop's only host sync
                    if live == 0:
                        break
                    self._maybe_compact(s, live)
                length = prompt_len + t  # valid slots once this step's fed token is written
                st.window = min(s.cache_len, math.ceil(length / self.window) * self.window)
                if cuda and not s.graphs_failed:
                    self._graph_step(model, s, plan)
                else:
                    self._run_safely(model, s, plan)
                produced += 1
        return produced

    def _maybe_compact(self, s: Session, live: int) -> None:
        """Move the live rows to the front when they fit in half the batch (power-of-two buckets)."""
        st = s.state
        target = max(self.min_rows, 1 << max(live - 1, 0).bit_length())
        if not self.compaction or target > st.n // 2:
            return
        index = st.live_first(target)
        st.compact(index)
        s.cache.compact(index)
        self.stats["compactions"] += 1

    def _graph_step(self, model, s: Session, plan: Plan) -> None:
        """Replay the captured step of this (batch, window); the first time run it uncaptured, then capture."""
        st = s.state
        key = (st.n, st.window if s.attention == "eager" else None)
        graph = s.graphs.get(key)
        if graph is None and key in s.warmed:
            graph = self._capture(model, s, plan, key)
        if graph is not None:
            graph.replay()
            self.stats["replays"] += 1
            self.stats["steps"] += 1
            self.stats["row_steps"] += st.n
            return
        if key in s.warmed:  # capture failed: eager from now on (s.graphs_failed is set)
            self._run_safely(model, s, plan)
            return
        # warm-up on a side stream, as capture wants: compiles, autotunes and JITs the kernels of this key
        stream = th.cuda.Stream()
        stream.wait_stream(th.cuda.current_stream())
        with th.cuda.stream(stream):
            self._run_safely(model, s, plan)
        th.cuda.current_stream().wait_stream(stream)
        s.warmed.add((st.n, st.window if s.attention == "eager" else None))

    def _capture(self, model, s: Session, plan: Plan, key: tuple):
        try:
            if s.pool is None:
                s.pool = th.cuda.graph_pool_handle()
            graph = th.cuda.CUDAGraph()
            with th.cuda.graph(graph, pool=s.pool):
                self._run_step(model, s, plan)
            self.stats["steps"] -= 1  # captured, not run
            self.stats["row_steps"] -= s.state.n
        except Exception as err:  # noqa: BLE001 - any capture failure: run eagerly, correctly, and say so once
            s.graphs_failed = True
            self.stats["failures"] += 1
            self._log_once(f"generation_backend=fast: CUDA graph capture failed ({type(err).__name__}: {err}); eager")
            th.cuda.synchronize()
            return None
        s.graphs[key] = graph
        self.stats["captures"] += 1
        return graph
