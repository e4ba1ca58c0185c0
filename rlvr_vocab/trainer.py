"""The GRPOTrainer subclass: reasoning-vocabulary masking in sampling and log-probs, decoding, checkpoints.

With ``model.reasoning_vocab_size=0`` this is TRL's GRPOTrainer unchanged (plus the fast sampler of
``rlvr_vocab.sampling`` when ``training.generation_backend=fast``; its TRL glue, the padding, unwrapping and
EOS cut, lives here, the only file that touches TRL's private API). With N > 0:
  * sampling: ``model.generate`` carries a ReasoningMaskProcessor (reasoning_vocab.attach_generation_mask);
  * log-probs: a chunked LM head applies the same mask, from the same token ids, to the training forward;
  * rewards and logs see completions with every reasoning id decoded as its source token;
  * every checkpoint and the final model hold ``reasoning_vocab.json``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch as th
from loguru import logger
from omegaconf import DictConfig
from torch.utils.checkpoint import checkpoint
from transformers import TrainerCallback
from transformers.utils import ModelOutput
from trl import GRPOConfig, GRPOTrainer

from rlvr_vocab.checkpoints import checkpoint_name
from rlvr_vocab.config import UNMASKED_SAMPLING_FIELDS, ConfigError, suggest, training_kwargs
from rlvr_vocab.optim import FP32MasterWeights, low_precision_params
from rlvr_vocab.reasoning_vocab import ReasoningVocab, check_mask_held
from rlvr_vocab.redact import is_secret_key, scrub_secrets
from rlvr_vocab.sampling import FastSampler
from rlvr_vocab.thinking import CompletionSpan, SpanTags, ends_inside, split_completion

CUDNN_MIN_COMPLETION = 1024  # training.cudnn_attention=null turns cuDNN's attention on from this completion length


def cudnn_attention_on(setting: bool | None, max_completion_length: int) -> bool:
    """``training.cudnn_attention``: true/false as given; null (the default) on for completions of at least
    ``CUDNN_MIN_COMPLETION`` tokens.

    Why (one H200, torch 2.11, cuDNN 9.19, Qwen3-0.6B GRPO; BENCHMARKS.md): cuDNN's attention, torch's first choice
    on Hopper, JIT-compiles kernels the first time a sequence-length class appears. At 32 x 512 that made steps 2, 3
    and 6 of every run on a fresh machine take 3.7-4.7 s against a 1.47 s median, and its kernels were no faster
    there (median 1.42 s with cuDNN off, same call). At 256 x 1,024 its training side is faster (6.2 s against
    7.5 s per step, two calls), so there it repays the compiles, which cost a few early steps ~1.5 s each.

    Example:
        >>> cudnn_attention_on(None, 512), cudnn_attention_on(None, 1024), cudnn_attention_on(True, 512)
        (False, True, True)
    """
    return setting if setting is not None else max_completion_length >= CUDNN_MIN_COMPLETION


@contextlib.contextmanager
def sdpa_backends(cudnn: bool):
    """``scaled_dot_product_attention``'s backends inside the block: all of torch's (``cudnn``), or all but cuDNN's."""
    if cudnn:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        yield


@dataclass
class RLVRGRPOConfig(GRPOConfig):
    """GRPOConfig plus this project's switches (so every ``training.*`` key is a field of one config)."""

    generation_backend: str = field(
        default="fast", metadata={"help": "fast: static-cache sampler; trl: TRL's plain generate()."}
    )
    logprob_chunk_size: int = field(
        default=1024, metadata={"help": "Completion tokens per chunk in the reasoning-vocab log-prob pass."}
    )
    master_weights: bool = field(
        default=True, metadata={"help": "fp32 copies of bf16/fp16 weights for the optimizer step (optim.py)."}
    )
    cudnn_attention: bool | None = field(
        default=None,
        metadata={
            "help": "Let SDPA use cuDNN's attention (torch's first choice on Hopper). null: on for completions of "
            f"{CUDNN_MIN_COMPLETION}+ tokens; below, its per-length-class JIT compiles cost 2-3 s steps and its "
            "kernels were no faster (cudnn_attention_on, BENCHMARKS.md)."
        },
    )

    # Pickling is how the Trainer writes training_args.bin into every checkpoint and the final model, and
    # to_dict() is what trackers (wandb, tensorboard, trackio) record: neither carries a secret-looking value
    # (hub_token, ...). Copies in memory keep them (push_to_hub still works).
    def __getstate__(self) -> dict:
        return {
            k: None if isinstance(v, str) and v and is_secret_key(k) else scrub_secrets(v)
            for k, v in self.__dict__.items()
        }

    def __copy__(self):
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo):
        new = object.__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def to_dict(self) -> dict:
        return scrub_secrets(super().to_dict())


def checkpointing_field(config_class=None) -> str:
    """The name GRPOConfig takes ``training.gradient_checkpointing`` by: transformers >= 5.2x renamed it
    ``activation_checkpointing`` (the old name prints a FutureWarning on every run); older ones (e.g. 5.17)
    know only ``gradient_checkpointing``."""
    fields = {f.name for f in dataclasses.fields(config_class or RLVRGRPOConfig)}
    return "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"


def grpo_config_kwargs(cfg: DictConfig, config_class=None) -> dict[str, Any]:
    """Map ``training.*`` and ``model.generation_kwargs`` onto RLVRGRPOConfig fields (``config.training_kwargs``).

    Raises ConfigError naming the key, with the closest field, when a ``training`` key is not a field.
    """
    config_class = config_class or RLVRGRPOConfig
    valid = {f.name for f in dataclasses.fields(config_class)}
    extra = cfg.training.get("extra") or {}
    for key in extra:
        if key not in valid:
            raise ConfigError(f"training.extra.{key} is not a trl.GRPOConfig field.{suggest(key, valid)}")
    for key in cfg.training:  # the schema and GRPOConfig must agree (tests check this too)
        if key != "extra" and key not in valid:
            raise ConfigError(f"training.{key} is not a trl.GRPOConfig field.{suggest(key, valid)}")
    kwargs = training_kwargs(cfg)
    kwargs[checkpointing_field(config_class)] = kwargs.pop("gradient_checkpointing")
    return kwargs


# ---------------------------------------------------------------------------------- masked log-probs
def _masked_chunk(hidden, labels, inside, head, standard_size: int, temperature: float, entropy: bool):
    logits = head(hidden).float() / temperature
    std, rsn = logits[:, :standard_size], logits[:, standard_size:]
    lse_std, lse_rsn = std.logsumexp(-1), rsn.logsumexp(-1)
    lse = th.where(inside, th.logaddexp(lse_std, lse_rsn), lse_std)
    label_logit = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    # A reasoning label outside the span has probability 0 (it cannot have been sampled there).
    label_logit = th.where(inside | (labels < standard_size), label_logit, float("-inf"))
    logps = label_logit - lse
    if not entropy:
        return logps, None
    expected = ((std - lse[:, None]).exp() * std).sum(-1)
    expected = expected + th.where(inside, ((rsn - lse[:, None]).exp() * rsn).sum(-1), 0.0)
    return logps, lse - expected


def masked_token_logprobs(
    hidden: th.Tensor,
    head: Callable[[th.Tensor], th.Tensor],
    labels: th.Tensor,
    inside: th.Tensor,
    standard_size: int,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    entropy: bool = False,
) -> tuple[th.Tensor, th.Tensor | None]:
    """Log-prob (and entropy) of each label under the span-masked, temperature-scaled softmax.

    ``hidden``: [T, d] for the T scored positions; ``head``: the output layer (hidden -> V+N logits; the
    module itself, so PEFT wrappers of the head apply); ``inside``: [T] bool, may the next token be a reasoning
    id. A plain ``nn.Linear`` head goes to TRL's fused chunked kernel (``_fused_masked_token_logprobs``);
    any other head (e.g. PEFT-wrapped) is chunked over T with activation checkpointing, so at most
    ``chunk_size x V`` fp32 logits exist at once, in the forward and in the backward.
    """
    if type(head) is th.nn.Linear:
        return _fused_masked_token_logprobs(hidden, head, labels, inside, standard_size, temperature, entropy)
    outs, ents = [], []
    for s in range(0, hidden.size(0), chunk_size):
        args = (hidden[s : s + chunk_size], labels[s : s + chunk_size], inside[s : s + chunk_size])
        fn = functools.partial(
            _masked_chunk, head=head, standard_size=standard_size, temperature=temperature, entropy=entropy
        )
        if th.is_grad_enabled():
            logp, ent = checkpoint(fn, *args, use_reentrant=False)
        else:
            logp, ent = fn(*args)
        outs.append(logp)
        ents.append(ent)
    if not outs:
        empty = hidden.new_zeros(0, dtype=th.float32)
        return empty, (empty if entropy else None)
    return th.cat(outs), (th.cat(ents) if entropy else None)


def _fused_masked_token_logprobs(hidden, head, labels, inside, standard_size: int, temperature: float, entropy: bool):
    """Inside the span: log-softmax over all rows; outside: over the standard rows (a reasoning label there is -inf).

    Each part is TRL's ChunkedLogProbFunction (no materialised fp32 logits; Triton on CUDA), entropy from the
    same pass. Measured on an H100 (BENCHMARKS.md): the reasoning-vocab step overhead at 2,048 tokens drops from
    +15% (chunked head above) to +6%.
    """
    from trl.kernels import ChunkedLogProbFunction

    weight, bias = head.weight, head.bias
    outputs = ("entropy",) if entropy else ()
    logps = hidden.new_zeros(labels.shape, dtype=th.float32)
    ents = hidden.new_zeros(labels.shape, dtype=th.float32) if entropy else None

    def run(rows, w, b, targets):
        lp, ent, *_ = ChunkedLogProbFunction.apply(hidden[rows], w, b, targets, temperature, 32768, None, 1.0, outputs)
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
        b = None if bias is None else bias[:standard_size]
        lp, ent = run(outside, weight[:standard_size], b, th.where(standard, out_labels, 0))
        logps = logps.masked_scatter(outside, th.where(standard, lp, float("-inf")))
        if entropy:
            ents = ents.masked_scatter(outside, ent)
    return logps, ents


@dataclass
class ReasoningHeadOutput(ModelOutput):
    log_probs: th.Tensor | None = None
    entropy: th.Tensor | None = None


def add_reasoning_lm_head(model, vocab: ReasoningVocab, temperature: float, chunk_size: int) -> None:
    """Patch ``model.forward``: called with ``reasoning_labels=...`` it returns masked per-token log-probs.

    The call still goes through the (possibly DDP/FSDP-wrapped) model, so gradient hooks fire as usual;
    without ``reasoning_labels`` the original forward runs (generation is unchanged).
    """
    original_forward = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, reasoning_labels=None, compute_entropy=False, **kwargs):
        if reasoning_labels is None:
            return original_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        input_ids = kwargs["input_ids"]
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        labels = reasoning_labels[:, 1:]
        inside = vocab.span_state(input_ids)[:, :-1]  # state after token t decides token t+1
        keep = labels != -100
        head = self.get_output_embeddings()
        logps, ent = masked_token_logprobs(
            hidden[keep],
            head,
            labels[keep],
            inside[keep],
            vocab.standard_size,
            temperature,
            chunk_size,
            compute_entropy,
        )
        full = hidden.new_zeros(keep.shape, dtype=th.float32)
        log_probs = full.masked_scatter(keep, logps)
        entropy = full.masked_scatter(keep, ent) if ent is not None else None
        return ReasoningHeadOutput(log_probs=log_probs, entropy=entropy)

    model.forward = types.MethodType(forward, model)


def _refuse_unmasked_sampling(args) -> None:
    """With a reasoning vocabulary, refuse the GRPOConfig switches whose sampler bypasses ``model.generate``."""
    for name, engine in UNMASKED_SAMPLING_FIELDS.items():
        if getattr(args, name, False):
            raise ValueError(
                f"{name}=True samples through {engine}, which does not apply the reasoning-vocabulary mask; "
                "use generation_backend='fast' or 'trl' with a reasoning vocabulary."
            )


# ------------------------------------------------------------------------------------------ trainer
class NonFiniteGradientError(RuntimeError):
    """Raised before an optimizer step whose gradients are not finite; the weights were not updated."""


def _non_finite_grads(model) -> tuple[list[str], int]:
    """The names of the parameters whose gradient holds a NaN or an inf, and how many have a gradient."""
    params = [(name, p.grad) for name, p in model.named_parameters() if p.grad is not None]
    if not params:
        return [], 0
    finite = th.isfinite(th.stack([n.float() for n in th._foreach_norm([g for _, g in params])]))
    if bool(finite.all()):
        return [], len(params)
    return [name for (name, _), ok in zip(params, finite.tolist(), strict=True) if not ok], len(params)


class NonFiniteGradientGuard(TrainerCallback):
    """Stop training at the first step whose gradients hold a NaN or an inf, before the optimizer applies them.

    Without it, one bad step turns every weight into NaN (gradient clipping multiplies every gradient by the NaN
    norm), and the run goes on sampling garbage and logging ``loss 0`` (transformers' ``logging_nan_inf_filter``)
    until ``max_steps``. The trainer calls :meth:`note` after each micro-batch's backward: it checks the loss there
    (a scalar transformers reads anyway) and, after the step's last micro-batch, the accumulated gradients once,
    before clipping spreads a NaN to all of them, so the error names where it started. The error is raised before
    the optimizer step, where every rank holds the same reduced gradients (all ranks stop together).
    """

    def __init__(self):
        self.origin: str | None = None  # where this step first went non-finite
        self.checked = False  # this step's gradients were checked by note()

    def note(self, model, loss, micro_batch: int, last: bool) -> None:
        """Check one micro-batch's loss, and after the step's last micro-batch (``last``) its gradients."""
        if self.origin is not None:
            return
        loss_value = float(loss.detach().float().mean()) if isinstance(loss, th.Tensor) else float("nan")
        bad, total = _non_finite_grads(model) if last else ([], 0)
        self.checked = last
        if bad or not math.isfinite(loss_value):
            names = ", ".join(bad[:4]) + (", ..." if len(bad) > 4 else "")
            grads = (
                f"{len(bad)} of {total} gradients non-finite ({names or 'none'})" if last else "gradients unchecked"
            )
            self.origin = f"first seen in micro-batch {micro_batch} (loss {loss_value:.4g}): {grads}"

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        origin, self.origin = self.origin, None
        if origin is None and not self.checked:  # note() did not see this step's gradients: check them here
            bad, total = _non_finite_grads(model)
            origin = f"{len(bad)} of {total} gradients non-finite" if bad else None
        self.checked = False
        if origin is None:
            return
        raise NonFiniteGradientError(
            f"step {state.global_step + 1}: non-finite gradients, {origin}. The optimizer step was not taken, so "
            "the weights are still finite and the last checkpoint is intact. Lower training.learning_rate or "
            "training.max_grad_norm, or set training.bf16=false, and resume or restart the run."
        )


class RLVRGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer with the reasoning vocabulary wired through sampling, log-probs and checkpoints."""

    def __init__(
        self,
        *args,
        reasoning_vocab: ReasoningVocab | None = None,
        ref_model=None,
        span_tags: SpanTags | None = None,
        span_check_steps: int = 0,
        **kwargs,
    ):
        """Args (beyond GRPOTrainer's):
        reasoning_vocab: the N reasoning rows (None: the baseline).
        ref_model: the frozen KL reference (peft_utils.build_reference_model), or None.
        span_tags: the thinking-span tags (thinking.py); None: no span is possible with this tokenizer.
        span_check_steps: with a reasoning vocabulary, warn loudly when no completion has spent a token inside
            a span by this step (0: off).
        """
        from rlvr_vocab.peft_utils import trl_reference_model

        if reasoning_vocab is not None:
            _refuse_unmasked_sampling(kwargs.get("args", args[2] if len(args) > 2 else None))
        with trl_reference_model(ref_model):  # TRL would reload config._name_or_path (fails for tiny/GGUF/rows)
            super().__init__(*args, **kwargs)
        self.reasoning_vocab = reasoning_vocab
        self.span_tags = span_tags if span_tags is not None or reasoning_vocab is None else reasoning_vocab.tags
        self.span_check_steps = span_check_steps
        self._span_tokens_seen = 0  # tokens sampled inside a span so far (the guard's count)
        self._span_warned = False
        self._completion_spans: list[CompletionSpan] = []  # of the last generation batch, for the rewards
        self._completion_answers: list[str | None] = []
        # the rollout sampler of generation_backend=fast (kept across steps: its cache and CUDA graphs)
        self.fast_sampler = FastSampler(reasoning_vocab=reasoning_vocab)
        self._logged_fallback = False
        self.grad_guard = NonFiniteGradientGuard()  # a NaN gradient stops the run before it reaches the weights
        self.add_callback(self.grad_guard)
        self._micro_batches = 0  # micro-batches trained (the guard names which one of a step went bad)
        if reasoning_vocab is not None:
            for target in (self.model, self.ref_model):
                if target is None:
                    continue
                base = target.get_base_model() if hasattr(target, "get_base_model") else target
                add_reasoning_lm_head(base, reasoning_vocab, self.temperature, self.args.logprob_chunk_size)

    def train(self, *args, **kwargs):
        """The Trainer's loop, with SDPA's backends as ``training.cudnn_attention`` says (``sdpa_backends``)."""
        with sdpa_backends(cudnn_attention_on(self.args.cudnn_attention, self.args.max_completion_length)):
            return super().train(*args, **kwargs)

    def create_optimizer(self, *args, **kwargs):
        """The Trainer's optimizer, stepping fp32 copies of the bf16/fp16 weights (``training.master_weights``):
        updated in place in bf16, most AdamW updates round away (optim.py). DeepSpeed and FSDP keep their own."""
        optimizer = super().create_optimizer(*args, **kwargs)  # (model=None) in transformers 5.23
        plain = not isinstance(optimizer, FP32MasterWeights) and not self.is_deepspeed_enabled
        # fp16 with a GradScaler would unscale the copies' (empty) gradients, not the model's: left as it is
        if self.args.master_weights and plain and not self.is_fsdp_enabled and not self.args.fp16:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            low = low_precision_params(params)
            if low:
                self.optimizer = FP32MasterWeights(optimizer)
                logger.info(
                    f"fp32 master weights for {sum(p.numel() for p in low) / 1e6:.1f}M bf16/fp16 parameters "
                    "(training.master_weights)"
                )
        return self.optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        """TRL's step, then the NaN guard's note on this micro-batch (before clipping mixes the gradients)."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        accumulation = self.args.gradient_accumulation_steps
        index = self._micro_batches % accumulation + 1  # 1-based, within the step
        self._micro_batches += 1
        self.grad_guard.note(model, loss, index, last=index == accumulation)
        return loss

    # ------------------------------------------------------------------ log-probs
    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **multimodal,
    ):
        if self.reasoning_vocab is None:
            return super()._get_per_token_logps_and_entropies(
                model,
                input_ids,
                attention_mask,
                logits_to_keep,
                batch_size=batch_size,
                compute_entropy=compute_entropy,
                compute_aux_loss=compute_aux_loss,
                **multimodal,
            )
        if any(v is not None for v in multimodal.values()) or compute_aux_loss:
            raise NotImplementedError("The reasoning vocabulary supports text-only, dense causal LMs.")
        batch_size = batch_size or input_ids.size(0)
        all_logps, all_entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids = input_ids[start : start + batch_size]
            mask = attention_mask[start : start + batch_size]
            labels = ids.masked_fill(mask == 0, -100)
            labels[:, :-logits_to_keep] = -100
            with self.accelerator.autocast():
                out = model(
                    input_ids=ids, attention_mask=mask, reasoning_labels=labels, compute_entropy=compute_entropy
                )
            all_logps.append(out.log_probs[:, -logits_to_keep:])
            if compute_entropy:
                all_entropies.append(out.entropy[:, -logits_to_keep:])
        entropies = th.cat(all_entropies) if compute_entropy else None
        return th.cat(all_logps), entropies, None

    # ------------------------------------------------------------------ generation
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        fast = (
            self.args.generation_backend == "fast"
            and not self.use_vllm
            and not self.use_transformers_continuous_batching
            and images is None
            and not multimodal_fields
        )
        if not fast:
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images=has_tool_images
            )
        return self._fast_generate_single_turn(prompt_ids)

    def _fast_generate_single_turn(self, prompt_ids: list[list[int]]) -> tuple[list[list[int]], None]:
        """What ``GRPOTrainer._generate_single_turn`` returns (completion ids cut after the first EOS, no
        log-probs), sampled by ``self.fast_sampler`` through ``model.generate`` with TRL's padding, unwrapping
        and generation config, so transformers builds the same logits processors as on TRL's path."""
        from transformers import Trainer
        from trl.extras.profiling import profiling_context
        from trl.models.utils import unwrap_model_for_generation
        from trl.trainer.utils import pad

        if getattr(self, "is_deepspeed_enabled", False) and not self.args.ds3_gather_for_generation:
            if not self._logged_fallback:
                self._logged_fallback = True
                logger.info("generation_backend=fast: DeepSpeed ZeRO-3 without gathering the weights; TRL's generate")
            return super()._generate_single_turn(prompt_ids, None, {}, self.num_generations)

        # Left-pad exactly as TRL's regular path does.
        prompt_tensors = [th.tensor(ids) for ids in prompt_ids]
        pad_multiple = getattr(self, "pad_to_multiple_of", None)
        padded_ids = pad(
            prompt_tensors,
            padding_value=self._tokenizer.pad_token_id,
            padding_side="left",
            pad_to_multiple_of=pad_multiple,
        )
        attention_mask = pad(
            [th.ones_like(t) for t in prompt_tensors],
            padding_value=0,
            padding_side="left",
            pad_to_multiple_of=pad_multiple,
        )
        inputs = Trainer._prepare_inputs(self, {"input_ids": padded_ids, "attention_mask": attention_mask})
        with (
            profiling_context(self, "fast_generate"),
            unwrap_model_for_generation(
                self.model_wrapped,
                self.accelerator,
                gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                generation_kwargs=self.generation_kwargs,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as unwrapped_model,
            th.no_grad(),
            self._dist.summon_full_params(self.model_wrapped, recurse=False),
        ):
            was_training = unwrapped_model.training
            unwrapped_model.eval()
            try:
                sequences = unwrapped_model.generate(
                    **inputs, generation_config=self.generation_config, custom_generate=self.fast_sampler
                )
            finally:
                unwrapped_model.train(was_training)

        # Cut after the first EOS, exactly as TRL's regular path does.
        device = sequences.device
        completion_ids = sequences[:, inputs["input_ids"].size(1) :]
        is_eos = th.isin(completion_ids, th.tensor(self.eos_token_ids, device=device))
        eos_idx = th.full((is_eos.size(0),), is_eos.size(1), dtype=th.long, device=device)
        eos_idx[is_eos.any(dim=1)] = is_eos.int().argmax(dim=1)[is_eos.any(dim=1)]
        sequence_indices = th.arange(is_eos.size(1), device=device).expand(is_eos.size(0), -1)
        completion_mask = (sequence_indices <= eos_idx.unsqueeze(1)).int()
        completion_ids = [
            c[m].tolist() for c, m in zip(completion_ids.cpu(), completion_mask.bool().cpu(), strict=True)
        ]
        return completion_ids, None

    # ------------------------------------------------------------------ decoding + metrics
    def _generate(self, prompts: list):
        result = super()._generate(prompts)
        prompt_ids, completion_ids, tool_mask, completions, *rest = result
        vocab, tags = self.reasoning_vocab, self.span_tags
        if vocab is not None:
            check_mask_held(vocab, prompt_ids, completion_ids)  # whatever path sampled them (rollout_func included)
        mode = "train" if self.model.training else "eval"
        spans, answers = [], []
        n_tokens = n_think = n_reasoning = n_reasoning_inside = 0
        for i, (p_ids, c_ids) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
            c_ids = list(c_ids)
            inside0 = tags is not None and ends_inside(p_ids, tags.open_id, tags.close_id)
            span = split_completion(c_ids, tags, inside0)
            spans.append(span)
            n_tokens += len(c_ids)
            n_think += span.think_tokens
            if vocab is not None and c_ids:
                ids = th.tensor(list(p_ids) + c_ids)
                is_rsn = vocab.is_reasoning(ids[len(p_ids) :])
                n_here = int(is_rsn.sum())
                n_reasoning += n_here
                if n_here:
                    inside = vocab.span_state(ids.unsqueeze(0))[0, len(p_ids) - 1 : -1]
                    n_reasoning_inside += int((is_rsn & inside).sum())
                    # re-decode: each reasoning id as its source token (plain decode drops them)
                    text = vocab.decode(self.processing_class, c_ids)
                    completions[i] = (
                        [{"role": "assistant", "content": text}] if isinstance(completions[i], list) else text
                    )
            answers.append(None if span.answer_start is None else self._decode_ids(c_ids[span.answer_start :]))
        self._completion_spans, self._completion_answers = spans, answers
        n = max(len(completion_ids), 1)
        if tags is not None:
            used = [s for s in spans if s.used]
            self._metrics[mode]["think/used_fraction"].append(len(used) / n)
            self._metrics[mode]["think/closed_fraction"].append(sum(s.closed for s in spans) / n)
            self._metrics[mode]["think/closed_answered_fraction"].append(
                sum(s.closed and bool((a or "").strip()) for s, a in zip(spans, answers, strict=True)) / n
            )
            self._metrics[mode]["think/length"].append(n_think / n)
        if vocab is not None:
            self._metrics[mode]["reasoning/token_fraction"].append(n_reasoning / max(n_tokens, 1))
            self._metrics[mode]["reasoning/inside_span_fraction"].append(n_think / max(n_tokens, 1))
            self._metrics[mode]["reasoning/inside_span_length"].append(n_think / n)
            self._metrics[mode]["reasoning/span_token_fraction"].append(n_reasoning_inside / max(n_think, 1))
            self._check_span_used(n_think)
        return (prompt_ids, completion_ids, tool_mask, completions, *rest)

    def _decode_ids(self, ids: list[int]) -> str:
        if self.reasoning_vocab is not None:
            return self.reasoning_vocab.decode(self.processing_class, ids)
        return self.processing_class.decode(ids, skip_special_tokens=True)

    def _check_span_used(self, n_inside: int) -> None:
        """The guard: with a reasoning vocabulary, a run whose completions never enter a span compares nothing."""
        self._span_tokens_seen += n_inside
        steps = self.span_check_steps
        if self._span_warned or not steps or self.state.global_step < steps or self._span_tokens_seen:
            return
        self._span_warned = True
        tags = self.span_tags
        logger.warning(
            "\n" + "!" * 100 + f"\n!!! model.reasoning_vocab_size={self.reasoning_vocab.size}, but after "
            f"{self.state.global_step} steps no sampled completion has spent a single token inside a "
            f"{tags.open_tag} ... {tags.close_tag} span.\n!!! Reasoning ids are allowed only there, so this run is "
            "the baseline under another name. Set dataset.think=true (the prompt then opens the span).\n" + "!" * 100
        )

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # The answer after each completion's span (from its ids) for the span-aware rewards (rewards.registry).
        if self.span_tags is not None and len(self._completion_answers) == len(inputs):
            inputs = [
                {**row, "completion_answer": answer, "completion_span": span}
                for row, answer, span in zip(inputs, self._completion_answers, self._completion_spans, strict=True)
            ]
        return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)

    # ------------------------------------------------------------------ checkpoints
    INITIAL_CHECKPOINT = checkpoint_name(0)

    def save_initial_checkpoint(self) -> Path:
        """Save the untrained policy as checkpoint-0 (a baseline for evals and drift plots; never rotated)."""
        folder = Path(self.args.output_dir) / self.INITIAL_CHECKPOINT
        self.save_model(str(folder))
        return folder

    def _save_checkpoint(self, model, trial):
        # Rotation is done here rather than by transformers, so that checkpoint-0 never counts or goes.
        limit = self.args.save_total_limit
        self.args.save_total_limit = None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        # (save_model, called by the checkpoint, already wrote reasoning_vocab.json into it)
        if self.args.should_save and limit:
            self._rotate_checkpoints_keeping_initial(Path(self._get_output_dir(trial=trial)), limit)

    def _rotate_checkpoints_keeping_initial(self, run_dir: Path, limit: int) -> None:
        import shutil

        from transformers.trainer_utils import sort_checkpoints

        rotating = [c for c in sort_checkpoints(str(run_dir)) if Path(c).name != self.INITIAL_CHECKPOINT]
        protected = {rotating[-1]} if rotating else set()
        if self.state.best_model_checkpoint:
            protected.add(str(Path(self.state.best_model_checkpoint)))
        excess = len(rotating) - max(limit, len(protected))
        for folder in rotating:
            if excess <= 0:
                break
            if folder not in protected:
                shutil.rmtree(folder, ignore_errors=True)
                excess -= 1

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        if self.reasoning_vocab is not None and self.args.should_save:
            self.reasoning_vocab.save(output_dir or self.args.output_dir)
