"""Fast rollouts without vLLM: one prefill, then a decode loop over a static KV cache, CUDA-graph captured.

``generate_completions(trainer, prompt_ids)`` is what ``RLVRGRPOTrainer._generate_single_turn`` calls with
``training.generation_backend=fast``. It returns what TRL's regular path returns: one list of token ids per
prompt, cut after its first EOS (EOS included), and ``None`` for the log-probs.

Same distribution as TRL, by construction. The call still goes through ``model.generate`` with TRL's
``GenerationConfig``, passing :class:`FastSampler` as ``custom_generate``. So transformers resolves the config
exactly as on TRL's path (model defaults, TRL's kwargs, min/max lengths, special tokens, padding, position ids)
and builds the same logits processors in the same order, including the ``ReasoningMaskProcessor`` that
``reasoning_vocab.attach_generation_mask`` inserts. The sampler then replays each processor with graph-safe
tensor ops (repetition penalty through a ``seen`` mask, min-length through a device step counter, the
reasoning span through an O(1) per-token state; temperature / top-k / top-p / min-p are transformers' own
warper objects, called as they are). Anything it cannot replay exactly (an unknown processor, stop strings,
beam search, sliding-window layers, flash-attention...) goes to transformers' own ``_sample`` with the same
arguments, which *is* TRL's path, and says so once in the log.

Where the time goes, and what this does about it (see BENCHMARKS.md for measurements):
  * one prefill over the left-padded prompts, into a static cache sized to this batch
    (prompt + max_completion_length, rounded up to ``WINDOW`` tokens);
  * each decode step attends only to the first ``W`` cache slots, ``W`` the current length rounded up to
    ``WINDOW`` tokens, with grouped-query attention done as two batched matmuls that read K and V once
    (SDPA with a padding mask falls back to repeating K/V per query head, 3-5x the bytes);
  * on CUDA one decode step (forward, logits processors, sampling, state updates) is a captured CUDA graph,
    one per window; no host sync inside the loop except a stop check every ``STOP_CHECK_EVERY`` steps;
  * sampling is ``argmax(p / E)`` with ``E ~ Exp(1)`` (the exponential race: the same law as
    ``torch.multinomial``, graph-safe);
  * the cache and graphs are kept for the next call when they are small (``KEEP_BYTES``) and freed otherwise,
    so long completions leave the memory to the training step.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from loguru import logger

WINDOW = 128  # cache slots per attention window (and the rounding of the cache length)
STOP_CHECK_EVERY = 16  # decode steps between host-side "all sequences finished?" checks
KEEP_BYTES = 4 * 2**30  # keep cache + graphs between calls when the KV cache is at most this large
COMPILE = True  # torch.compile the decode forward on CUDA (FastSampler(compile=...) overrides it)
SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama")  # plain softmax attention, no sliding window / sinks / softcap
DECODE_ATTENTION = "rlvr_static_decode"  # name registered with transformers' AttentionInterface

_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.info(message)


# ------------------------------------------------------------------------------------------ entry point
def generate_completions(trainer, prompt_ids: list[list[int]]):
    """(completion_ids, logprobs) for each prompt, as GRPOTrainer._generate_single_turn returns them."""
    from transformers import Trainer
    from trl import GRPOTrainer
    from trl.extras.profiling import profiling_context
    from trl.models.utils import unwrap_model_for_generation
    from trl.trainer.utils import pad

    reason = unsupported_reason(trainer)
    if reason is not None:
        _log_once(f"generation_backend=fast: {reason}; using TRL's generate")
        return GRPOTrainer._generate_single_turn(trainer, prompt_ids, None, {}, trainer.num_generations)

    # Left-pad exactly as TRL's regular path does.
    prompt_tensors = [torch.tensor(ids) for ids in prompt_ids]
    pad_multiple = getattr(trainer, "pad_to_multiple_of", None)
    padded_ids = pad(
        prompt_tensors,
        padding_value=trainer._tokenizer.pad_token_id,
        padding_side="left",
        pad_to_multiple_of=pad_multiple,
    )
    attention_mask = pad(
        [torch.ones_like(t) for t in prompt_tensors],
        padding_value=0,
        padding_side="left",
        pad_to_multiple_of=pad_multiple,
    )
    inputs = Trainer._prepare_inputs(trainer, {"input_ids": padded_ids, "attention_mask": attention_mask})
    sampler = trainer.__dict__.get("_fast_sampler")
    if sampler is None:
        sampler = trainer._fast_sampler = FastSampler(reasoning_vocab=trainer.reasoning_vocab)

    with (
        profiling_context(trainer, "fast_generate"),
        unwrap_model_for_generation(
            trainer.model_wrapped,
            trainer.accelerator,
            gather_deepspeed3_params=trainer.args.ds3_gather_for_generation,
            generation_kwargs=trainer.generation_kwargs,
            gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs,
        ) as unwrapped_model,
        torch.no_grad(),
        trainer._dist.summon_full_params(trainer.model_wrapped, recurse=False),
    ):
        was_training = unwrapped_model.training
        unwrapped_model.eval()
        try:
            sequences = unwrapped_model.generate(
                **inputs, generation_config=trainer.generation_config, custom_generate=sampler
            )
        finally:
            unwrapped_model.train(was_training)

    # Cut after the first EOS, exactly as TRL's regular path does.
    device = sequences.device
    completion_ids = sequences[:, inputs["input_ids"].size(1) :]
    is_eos = torch.isin(completion_ids, torch.tensor(trainer.eos_token_ids, device=device))
    eos_idx = torch.full((is_eos.size(0),), is_eos.size(1), dtype=torch.long, device=device)
    eos_idx[is_eos.any(dim=1)] = is_eos.int().argmax(dim=1)[is_eos.any(dim=1)]
    sequence_indices = torch.arange(is_eos.size(1), device=device).expand(is_eos.size(0), -1)
    completion_mask = (sequence_indices <= eos_idx.unsqueeze(1)).int()
    completion_ids = [c[m].tolist() for c, m in zip(completion_ids.cpu(), completion_mask.bool().cpu(), strict=True)]
    return completion_ids, None


def unsupported_reason(trainer) -> str | None:
    """Why the fast path cannot reproduce TRL's sampling for this trainer (None: it can)."""
    model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    gc = trainer.generation_config
    if config.is_encoder_decoder:
        return "encoder-decoder model"
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {config.model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
    if config._attn_implementation not in ("sdpa", "eager"):
        return f"attn_implementation={config._attn_implementation!r} (sdpa or eager needed)"
    if any(t != "full_attention" for t in (getattr(config, "layer_types", None) or ["full_attention"])):
        return "sliding-window / hybrid attention layers"
    if (gc.num_beams or 1) != 1 or (gc.num_return_sequences or 1) != 1:
        return "beam search / several return sequences"
    if getattr(trainer, "is_deepspeed_enabled", False) and not trainer.args.ds3_gather_for_generation:
        return "DeepSpeed ZeRO-3 without gathering the weights for generation"
    return None


# ------------------------------------------------------------------------------------------- KV cache
class StaticKVCache:
    """A fixed-size KV cache written in place at ``write_index``.

    Duck-types the part of transformers' ``Cache`` that decoder layers use (``update``). Positions and masks
    are always passed explicitly, so nothing asks it for its length. ``update`` returns the first ``window``
    slots (the prefill), or, with ``window=None`` (decode), the whole buffers: the decode attention op then
    reads only the current window (``_WINDOW``), so one compiled/captured forward serves every window.
    """

    is_compileable = False

    def __init__(self, num_layers: int, max_len: int):
        self.max_len = max_len
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.write_index: torch.Tensor | None = None  # cache slots written by the next forward
        self.window: int | None = max_len

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if keys is None:  # allocated by the first (prefill) forward, with its dtype, device and head shapes
            b, h, _, d = key_states.shape
            keys = self.keys[layer_idx] = key_states.new_zeros(b, h, self.max_len, d)
            shape = (b, value_states.shape[1], self.max_len, value_states.shape[-1])
            values = self.values[layer_idx] = value_states.new_zeros(shape)
        keys.index_copy_(2, self.write_index, key_states)
        values.index_copy_(2, self.write_index, value_states)
        if self.window is None:
            return keys, values
        return keys[:, :, : self.window], values[:, :, : self.window]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)


_WINDOW = [0]  # cache slots the decode attention reads in the current step (set before each step / capture)


@torch.library.custom_op("rlvr_vocab::decode_attention", mutates_args=())
def _decode_attention_op(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Opaque to torch.compile, so the window is read when the op runs (or is captured), not traced."""
    w = _WINDOW[0] or key.shape[2]
    b, h, q, d = query.shape
    hkv = key.shape[1]
    g = h // hkv
    scores = torch.baddbmm(  # bias + scaling * q @ k^T in one kernel: [B*Hkv, g*q, W]
        bias.reshape(b * hkv, 1, -1)[:, :, :w],
        query.reshape(b * hkv, g * q, d),
        key[:, :, :w].transpose(-1, -2).reshape(b * hkv, d, w),
        alpha=scaling,
    )
    probs = scores.softmax(-1, dtype=torch.float32).to(value.dtype)
    out = torch.bmm(probs, value[:, :, :w].reshape(b * hkv, w, d))  # [B*Hkv, g*q, D]
    return out.reshape(b, h, q, d).transpose(1, 2).contiguous()


@_decode_attention_op.register_fake
def _(query, key, value, bias, scaling):
    b, h, q, d = query.shape
    return query.new_empty(b, q, h, d)


def decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention for the decode step: GQA as two batched matmuls that read K and V once (eager maths).

    ``query``: [B, H, 1, D]; ``key``/``value``: [B, Hkv, L, D], of which the first ``_WINDOW[0]`` slots are
    read; ``attention_mask``: an additive bias [B, Hkv, 1, L] in the model's dtype (0 where a query may
    attend, -inf elsewhere), kept up to date by the sampler. Returns ([B, 1, H, D], None) like transformers'
    attention functions. The query heads of one KV head are the rows of one matmul (query head h uses KV
    head h // (H / Hkv), as transformers' ``repeat_kv``).
    """
    scaling = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    return _decode_attention_op(query, key, value, attention_mask, scaling), None


def _register_decode_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(DECODE_ATTENTION, decode_attention)


@contextlib.contextmanager
def _attention_implementation(config, name: str):
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


# ------------------------------------------------------------------------------------------- the plan
@dataclass
class Plan:
    """The logits processors and stopping rule of one ``generate`` call, as graph-safe ops."""

    ops: list[tuple] = field(default_factory=list)  # in transformers' order
    greedy: bool = False
    eos_ids: list[int] = field(default_factory=list)
    pad_id: int = 0
    max_length: int = 0  # prompt + completion tokens
    repetition_skip: int | torch.Tensor | None = None  # prompt tokens the penalty ignores, per row (None: no penalty)

    def signature(self) -> tuple:
        """What a captured graph bakes in (per-call thresholds live in a device tensor and are not part of it)."""
        ops = []
        for op in self.ops:
            if op[0] in ("block_before", "block_at"):
                ops.append((op[0], op[2]))
            elif op[0] == "reasoning":
                ops.append((op[0], op[1].standard_size, op[1].open_id, op[1].close_id))
            elif op[0] == "call":
                consts = tuple(
                    sorted((k, v) for k, v in vars(op[2]).items() if isinstance(v, (bool, int, float, str)))
                )
                ops.append((op[0], op[1], consts))
            else:
                ops.append(op)
        return (tuple(ops), self.greedy, tuple(self.eos_ids), self.pad_id, self.repetition_skip is not None)


def _ids(t) -> tuple[int, ...]:
    if t is None:
        return ()
    return tuple(int(i) for i in (t.flatten().tolist() if isinstance(t, torch.Tensor) else list(t)))


def build_plan(logits_processor, stopping_criteria, generation_config, input_length: int, vocab=None):
    """Map transformers' prepared processors/criteria onto graph-safe ops; (None, reason) when not possible."""
    from transformers.generation import logits_process as lp
    from transformers.generation import stopping_criteria as sc

    from rlvr_vocab.reasoning_vocab import ReasoningMaskProcessor

    stateless = tuple(
        getattr(lp, name)
        for name in (
            "TemperatureLogitsWarper",
            "TopKLogitsWarper",
            "TopPLogitsWarper",
            "MinPLogitsWarper",
            "TypicalLogitsWarper",
            "EpsilonLogitsWarper",
            "EtaLogitsWarper",
            "InfNanRemoveLogitsProcessor",
            "LogitNormalization",
        )
        if hasattr(lp, name)
    )
    gc = generation_config
    if gc.return_dict_in_generate:
        return None, "return_dict_in_generate"
    if gc.get_generation_mode().value not in ("sample", "greedy_search"):
        return None, f"generation mode {gc.get_generation_mode().value}"
    plan = Plan(greedy=not gc.do_sample)
    plan.pad_id = int(_ids(gc._pad_token_tensor)[0]) if gc._pad_token_tensor is not None else 0
    has_reasoning = False
    try:
        for p in logits_processor:
            if isinstance(p, lp.RepetitionPenaltyLogitsProcessor):
                # prompt tokens left out of the penalty: an int, or one count per row (the left padding)
                plan.repetition_skip = p.prompt_ignore_length if p.prompt_ignore_length is not None else 0
                plan.ops.append(("repetition", float(p.penalty)))
            elif isinstance(p, lp.MinNewTokensLengthLogitsProcessor):
                # EOS blocked while (input_length + t) - prompt_length_to_skip < min_new_tokens, t = tokens so far
                until = int(p.prompt_length_to_skip) + int(p.min_new_tokens) - input_length
                plan.ops.append(("block_before", until, _ids(p.eos_token_id)))
            elif isinstance(p, lp.MinLengthLogitsProcessor):
                plan.ops.append(("block_before", int(p.min_length) - input_length, _ids(p.eos_token_id)))
            elif isinstance(p, lp.SuppressTokensAtBeginLogitsProcessor):
                plan.ops.append(("block_at", int(p.begin_index) - input_length, _ids(p.begin_suppress_tokens)))
            elif isinstance(p, lp.SuppressTokensLogitsProcessor):
                plan.ops.append(("block_before", 1 << 62, _ids(p.suppress_tokens)))
            elif isinstance(p, ReasoningMaskProcessor):
                plan.ops.append(("reasoning", p.vocab))
                has_reasoning = True
            elif isinstance(p, stateless):
                plan.ops.append(("call", type(p).__name__, p))
            else:
                return None, f"logits processor {type(p).__name__}"
    except AttributeError as err:  # a transformers version with other attribute names
        return None, f"unexpected processor layout ({err})"
    if vocab is not None and not has_reasoning:  # the model's generate was not patched: apply the mask anyway,
        first_warper = next((i for i, op in enumerate(plan.ops) if op[0] == "call"), len(plan.ops))
        plan.ops.insert(first_warper, ("reasoning", vocab))  # where transformers puts custom processors
    for c in stopping_criteria:
        if isinstance(c, sc.MaxLengthCriteria):
            plan.max_length = int(c.max_length)
        elif isinstance(c, sc.EosTokenCriteria):
            plan.eos_ids = list(_ids(c.eos_token_id))
        else:
            return None, f"stopping criterion {type(c).__name__}"
    if plan.max_length <= input_length:
        return None, "no max_length"
    return plan, None


# ---------------------------------------------------------------------------------------- the sampler
def _pick(s: _Session, plan: Plan, logits: torch.Tensor, noise: torch.Tensor | None) -> None:
    """Process the logits in transformers' order, pick the token (argmax, or argmax of p / noise), update state."""
    scores = logits.float()
    for i, op in enumerate(plan.ops):
        kind = op[0]
        if kind == "repetition":
            penalty = op[1]
            penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
            scores = torch.where(s.seen[:, :-1], penalised, scores)
        elif kind == "block_before":
            scores = scores.masked_fill(s.masks[i] & (s.step < s.thresholds[i]), float("-inf"))
        elif kind == "block_at":
            scores = scores.masked_fill(s.masks[i] & (s.step == s.thresholds[i]), float("-inf"))
        elif kind == "reasoning":
            scores = op[1].mask_logits_(scores.clone() if scores is logits else scores, s.inside)
        else:  # a stateless warper of transformers, called as generate() calls it
            scores = op[2](None, scores)
    if noise is None:
        nxt = scores.argmax(-1)
    else:
        probs = scores.softmax(-1)
        nxt = (probs / noise).argmax(-1)
    logp = scores.gather(1, nxt[:, None]).squeeze(1) - scores.logsumexp(-1)
    nxt = torch.where(s.finished, plan.pad_id, nxt)
    s.out.index_copy_(1, s.step, nxt[:, None])
    s.logp.index_copy_(1, s.step, logp[:, None])
    if plan.eos_ids:
        s.finished |= (nxt[:, None] == s.masks["eos"]).any(-1)
    for op in plan.ops:
        if op[0] == "reasoning":
            s.inside.copy_(op[1].step_state(s.inside, nxt))
    if s.seen is not None and plan.repetition_skip is not None:
        s.seen.scatter_(1, nxt[:, None], True)
    s.tok.copy_(nxt)
    s.step += 1


class _Session:
    """Everything one batch shape needs across decode steps (and across calls, when kept)."""

    def __init__(self, key, model, batch: int, cache_len: int, device):
        config = model.config
        self.key = key
        self.cache = StaticKVCache(config.num_hidden_layers, cache_len)
        self.cache_len = cache_len
        long = dict(dtype=torch.long, device=device)
        self.tok = torch.zeros(batch, **long)  # last sampled token, fed to the next decode step
        self.pos = torch.zeros(batch, **long)  # its position id
        self.write = torch.zeros(1, **long)  # its cache slot
        self.step = torch.zeros(1, **long)  # index of the token being sampled
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        # additive attention bias per slot: 0 where the decode query may attend, -inf elsewhere
        self.bias = torch.full((batch, kv_heads, 1, cache_len), float("-inf"), dtype=model.dtype, device=device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.inside = torch.zeros(batch, dtype=torch.bool, device=device)  # reasoning span state
        self.out = torch.zeros(batch, cache_len, **long)  # sampled tokens
        self.logp = torch.zeros(batch, cache_len, dtype=torch.float32, device=device)  # their processed log-probs
        self.thresholds: torch.Tensor | None = None  # per-op step thresholds of this call
        self.seen: torch.Tensor | None = None  # [B, V+1] ids seen so far (repetition penalty)
        self.masks: dict = {}  # per-op constant column masks
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None
        self.graphs_failed = False


class FastSampler:
    """``custom_generate`` for ``model.generate``: static cache, windowed attention, CUDA-graph decode steps.

    Args:
        reasoning_vocab: apply its span mask even where ``model.generate`` does not add the processor.
        compile: ``torch.compile`` the decode forward (CUDA only; fuses the many small kernels of a step;
            None: on where CUDA graphs are used). Compiled once per model and cache shape; falls back to
            the eager forward, with one log line, if compilation fails.
    """

    def __init__(self, reasoning_vocab=None, compile: bool | None = None):
        self.reasoning_vocab = reasoning_vocab
        self.compile = compile
        self.session: _Session | None = None
        self.last_logprobs: torch.Tensor | None = None  # [B, n] processed log-probs of the last call's tokens
        self.last_used_fast_path = False
        self._compiled: dict[int, object] = {}  # id(model) -> compiled forward
        self._compile_failed = False
        self._compiled_pick = None
        _register_decode_attention()

    # transformers calls decoding_method(model, input_ids, logits_processor=..., stopping_criteria=...,
    # generation_config=..., **model_kwargs)
    def __call__(self, model, input_ids, logits_processor, stopping_criteria, generation_config, **model_kwargs):
        plan, reason = build_plan(
            logits_processor, stopping_criteria, generation_config, input_ids.shape[1], self.reasoning_vocab
        )
        if plan is None:
            from transformers.generation.utils import GenerationMixin

            _log_once(f"generation_backend=fast: {reason}; using transformers' sampling loop for it")
            self.last_used_fast_path = False
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
            attention_mask = torch.ones_like(input_ids)
        position_ids = model_kwargs.get("position_ids")
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill_(attention_mask == 0, 1)
        return self.generate(model, input_ids, attention_mask, position_ids, plan)

    # ------------------------------------------------------------------------------------ one batch
    @torch.no_grad()
    def generate(self, model, input_ids, attention_mask, position_ids, plan: Plan) -> torch.Tensor:
        batch, prompt_len = input_ids.shape
        new_tokens = plan.max_length - prompt_len
        cache_len = math.ceil((prompt_len + new_tokens) / WINDOW) * WINDOW
        s = self._session(model, batch, cache_len, input_ids.device, plan)
        try:
            logits = self._prefill(model, s, input_ids, attention_mask, position_ids)
            self._start(s, plan, input_ids, position_ids, logits)
            n = self._decode(model, s, plan, prompt_len, new_tokens)
            self.last_logprobs = s.logp[:, :n].clone()
            return torch.cat([input_ids, s.out[:, :n]], dim=1)
        finally:
            if s.cache.nbytes() > KEEP_BYTES:
                self.session = None  # leave the memory to the training step

    def _session(self, model, batch, cache_len, device, plan) -> _Session:
        params = tuple(t.data_ptr() for t in model.parameters()) + tuple(t.data_ptr() for t in model.buffers())
        key = (id(model), batch, cache_len, str(device), plan.signature(), hash(params))
        if self.session is None or self.session.key != key:
            self.session = None  # free the old one first
            self.session = _Session(key, model, batch, cache_len, device)
        return self.session

    def _prefill(self, model, s: _Session, input_ids, attention_mask, position_ids) -> torch.Tensor:
        batch, p = input_ids.shape
        real = attention_mask.bool()
        eye = torch.eye(p, dtype=torch.bool, device=input_ids.device)
        causal = torch.ones(p, p, dtype=torch.bool, device=input_ids.device).tril()
        # padding rows attend to themselves only (no all-masked rows, so no NaN reaches the cache)
        mask = (causal & (real[:, None, :] | eye))[:, None]
        if model.config._attn_implementation == "eager":
            bias = torch.zeros(mask.shape, dtype=model.dtype, device=mask.device)
            mask = bias.masked_fill_(~mask, torch.finfo(model.dtype).min)
        s.cache.write_index = torch.arange(p, device=input_ids.device)
        s.cache.window = p
        out = model(
            input_ids=input_ids,
            attention_mask=mask,  # 4-D: transformers uses it as it is
            position_ids=position_ids,
            past_key_values=s.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        s.bias.fill_(float("-inf"))
        s.bias[:, :, 0, :p] = torch.zeros((), dtype=s.bias.dtype, device=s.bias.device).masked_fill(
            ~real[:, None, :], float("-inf")
        )
        return out.logits[:, -1].to(dtype=torch.float32, copy=True)

    def _start(self, s: _Session, plan: Plan, input_ids, position_ids, logits) -> None:
        """Per-call state: counters, span state, seen ids, thresholds; then sample the first token."""
        batch, p = input_ids.shape
        vocab_size = logits.shape[-1]
        device = input_ids.device
        s.step.zero_()
        s.write.fill_(p)
        s.pos.copy_(position_ids[:, -1] + 1)
        s.finished.zero_()
        s.out.fill_(plan.pad_id)
        if plan.repetition_skip is not None:
            if s.seen is None:  # one spare column receives the ignored prompt tokens
                s.seen = torch.zeros(batch, vocab_size + 1, dtype=torch.bool, device=device)
            skip = torch.as_tensor(plan.repetition_skip, device=device).reshape(-1, 1)
            counted = torch.arange(p, device=device)[None, :] >= skip
            s.seen.zero_()
            s.seen.scatter_(1, input_ids.masked_fill(~counted, vocab_size), True)
        thresholds = []
        for i, op in enumerate(plan.ops):
            if op[0] in ("block_before", "block_at"):
                thresholds.append(op[1])
                if i not in s.masks:
                    cols = torch.zeros(vocab_size, dtype=torch.bool, device=device)
                    ids = [t for t in op[2] if 0 <= t < vocab_size]
                    cols[ids] = True
                    s.masks[i] = cols
            elif op[0] == "reasoning":
                s.inside.copy_(op[1].span_state(input_ids)[:, -1])
            else:
                thresholds.append(0)
        thresholds = torch.tensor(thresholds or [0], dtype=torch.long)
        if s.thresholds is None:
            s.thresholds = torch.zeros(thresholds.shape, dtype=torch.long, device=device)
        s.thresholds.copy_(thresholds)  # in place: captured graphs read this tensor
        if plan.eos_ids and "eos" not in s.masks:
            s.masks["eos"] = torch.tensor(plan.eos_ids, dtype=torch.long, device=device)
        self._sample(s, plan, logits)

    def _sample(self, s: _Session, plan: Plan, logits: torch.Tensor, pick=None) -> None:
        """Draw the next token from the processed logits and update the state. Graph-safe.

        The exponential noise is drawn here, eagerly (torch's CUDA ``exponential_`` never returns 0, so
        ``p / E`` is the exponential race exactly); ``pick`` (``_pick``, possibly compiled) does the rest.
        """
        noise = None if plan.greedy else torch.empty_like(logits, dtype=torch.float32).exponential_()
        (pick or _pick)(s, plan, logits, noise)

    # ------------------------------------------------------------------------------------ decoding
    def _forward(self, model):
        """The decode forward: compiled (CUDA, once per model) or the model itself."""
        if not self._use_compile(model):
            return model
        compiled = self._compiled.get(id(model))
        if compiled is None:
            compiled = self._compiled[id(model)] = torch.compile(model, dynamic=False)
        return compiled

    def _picker(self, forward):
        """``_pick`` compiled alongside a compiled forward (fuses the ~15 passes over the [B, V] logits)."""
        if forward is None or isinstance(forward, torch.nn.Module) and not hasattr(forward, "_orig_mod"):
            return None
        if self._compiled_pick is None:
            self._compiled_pick = torch.compile(_pick, dynamic=False)
        return self._compiled_pick

    def _use_compile(self, model) -> bool:
        wanted = self.compile if self.compile is not None else COMPILE
        return wanted and not self._compile_failed and next(model.parameters()).is_cuda

    def _decode_step(self, model, s: _Session, plan: Plan, window: int, forward=None) -> None:
        s.bias.index_fill_(3, s.write, 0.0)  # the token fed now may be attended to (by itself and later ones)
        s.cache.write_index = s.write
        s.cache.window = None  # whole buffers; the attention op reads the first _WINDOW[0] slots
        _WINDOW[0] = window
        out = (forward if forward is not None else model)(
            input_ids=s.tok[:, None],
            attention_mask=s.bias,
            position_ids=s.pos[:, None],
            past_key_values=s.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self._sample(s, plan, out.logits[:, -1], self._picker(forward))
        s.pos += 1
        s.write += 1

    def _decode(self, model, s: _Session, plan: Plan, prompt_len: int, new_tokens: int) -> int:
        """Tokens 1..new_tokens-1 (token 0 came from the prefill). Returns how many tokens were produced."""
        cuda = s.tok.is_cuda
        use_graphs = cuda and not s.graphs_failed
        produced = 1
        with _attention_implementation(model.config, DECODE_ATTENTION):
            for t in range(1, new_tokens):
                if plan.eos_ids and t % STOP_CHECK_EVERY == 0 and bool(s.finished.all()):
                    break
                slot = prompt_len + t - 1  # cache slot of the token fed in this step
                window = min(s.cache_len, (slot // WINDOW + 1) * WINDOW)
                if use_graphs and t > 1:  # step 1 runs eagerly: it compiles / warms up kernels before capture
                    graph = s.graphs.get(window) or self._capture(model, s, plan, window)
                    if graph is not None:
                        graph.replay()
                        produced += 1
                        continue
                    use_graphs = False
                if cuda and t == 1:
                    self._warm_step(model, s, plan, window)
                else:
                    self._decode_step(model, s, plan, window, self._forward(model))
                produced += 1
        return produced

    def _warm_step(self, model, s: _Session, plan: Plan, window: int) -> None:
        """The first decode step, on a side stream (as CUDA-graph capture wants); compiles the forward."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            forward = self._forward(model)
            if forward is not model:
                try:
                    self._decode_step(model, s, plan, window, forward)
                except Exception as err:  # noqa: BLE001 - any compile failure: eager forward, and say so once
                    self._compile_failed = True
                    _log_once(f"generation_backend=fast: torch.compile failed ({type(err).__name__}: {err}); eager")
                    self._decode_step(model, s, plan, window)  # nothing was sampled yet: redo the step
            else:
                self._decode_step(model, s, plan, window)
        torch.cuda.current_stream().wait_stream(stream)

    def _capture(self, model, s: _Session, plan: Plan, window: int):
        try:
            if s.pool is None:
                s.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            forward = self._forward(model)
            with torch.cuda.graph(graph, pool=s.pool):
                self._decode_step(model, s, plan, window, forward)
        except Exception as err:  # noqa: BLE001 - any capture failure: run eagerly, correctly, and say so once
            s.graphs_failed = True
            _log_once(f"generation_backend=fast: CUDA graph capture failed ({type(err).__name__}: {err}); eager")
            torch.cuda.synchronize()
            return None
        s.graphs[window] = graph
        return graph
