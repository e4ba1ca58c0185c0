"""The GRPOTrainer subclass: reasoning-vocabulary masking in sampling and log-probs, decoding, checkpoints.

With ``model.reasoning_vocab_size=0`` this is TRL's GRPOTrainer unchanged (plus the fast sampler when
``training.generation_backend=fast``). With N > 0:
  * sampling: ``model.generate`` carries a ReasoningMaskProcessor (reasoning_vocab.attach_generation_mask);
  * log-probs: a chunked LM head applies the same mask, from the same token ids, to the training forward;
  * rewards and logs see completions with every reasoning id decoded as its source token;
  * every checkpoint and the final model hold ``reasoning_vocab.json``.
"""

from __future__ import annotations

import copy
import functools
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint
from transformers.utils import ModelOutput
from trl import GRPOConfig, GRPOTrainer

from rlvr_vocab.config import UNMASKED_SAMPLING_FIELDS
from rlvr_vocab.reasoning_vocab import ReasoningVocab, check_mask_held
from rlvr_vocab.redact import is_secret_key, scrub_secrets


@dataclass
class RLVRGRPOConfig(GRPOConfig):
    """GRPOConfig plus this project's switches (so every ``training.*`` key is a field of one config)."""

    generation_backend: str = field(
        default="fast", metadata={"help": "fast: static-cache sampler; trl: TRL's plain generate()."}
    )
    logprob_chunk_size: int = field(
        default=1024, metadata={"help": "Completion tokens per chunk in the reasoning-vocab log-prob pass."}
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


# ---------------------------------------------------------------------------------- masked log-probs
def _masked_chunk(hidden, labels, inside, head, standard_size: int, temperature: float, entropy: bool):
    logits = head(hidden).float() / temperature
    std, rsn = logits[:, :standard_size], logits[:, standard_size:]
    lse_std, lse_rsn = std.logsumexp(-1), rsn.logsumexp(-1)
    lse = torch.where(inside, torch.logaddexp(lse_std, lse_rsn), lse_std)
    label_logit = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    # A reasoning label outside the span has probability 0 (it cannot have been sampled there).
    label_logit = torch.where(inside | (labels < standard_size), label_logit, float("-inf"))
    logps = label_logit - lse
    if not entropy:
        return logps, None
    expected = ((std - lse[:, None]).exp() * std).sum(-1)
    expected = expected + torch.where(inside, ((rsn - lse[:, None]).exp() * rsn).sum(-1), 0.0)
    return logps, lse - expected


def masked_token_logprobs(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    inside: torch.Tensor,
    standard_size: int,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob (and entropy) of each label under the span-masked, temperature-scaled softmax.

    ``hidden``: [T, d] for the T scored positions; ``head``: the output layer (hidden -> V+N logits; the
    module itself, so PEFT wrappers of the head apply); ``inside``: [T] bool, may the next token be a reasoning
    id. A plain ``nn.Linear`` head goes to TRL's fused chunked kernel (``_fused_masked_token_logprobs``);
    any other head (e.g. PEFT-wrapped) is chunked over T with activation checkpointing, so at most
    ``chunk_size x V`` fp32 logits exist at once, in the forward and in the backward.
    """
    if type(head) is torch.nn.Linear:
        return _fused_masked_token_logprobs(hidden, head, labels, inside, standard_size, temperature, entropy)
    outs, ents = [], []
    for s in range(0, hidden.size(0), chunk_size):
        args = (hidden[s : s + chunk_size], labels[s : s + chunk_size], inside[s : s + chunk_size])
        fn = functools.partial(
            _masked_chunk, head=head, standard_size=standard_size, temperature=temperature, entropy=entropy
        )
        if torch.is_grad_enabled():
            logp, ent = checkpoint(fn, *args, use_reentrant=False)
        else:
            logp, ent = fn(*args)
        outs.append(logp)
        ents.append(ent)
    if not outs:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, (empty if entropy else None)
    return torch.cat(outs), (torch.cat(ents) if entropy else None)


def _fused_masked_token_logprobs(hidden, head, labels, inside, standard_size: int, temperature: float, entropy: bool):
    """Inside the span: log-softmax over all rows; outside: over the standard rows (a reasoning label there is -inf).

    Each part is TRL's ChunkedLogProbFunction (no materialised fp32 logits; Triton on CUDA), entropy from the
    same pass. Measured on an H100 (BENCHMARKS.md): the reasoning-vocab step overhead at 2,048 tokens drops from
    +15% (chunked head above) to +6%.
    """
    from trl.kernels import ChunkedLogProbFunction

    weight, bias = head.weight, head.bias
    outputs = ("entropy",) if entropy else ()
    logps = hidden.new_zeros(labels.shape, dtype=torch.float32)
    ents = hidden.new_zeros(labels.shape, dtype=torch.float32) if entropy else None

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
        lp, ent = run(outside, weight[:standard_size], b, torch.where(standard, out_labels, 0))
        logps = logps.masked_scatter(outside, torch.where(standard, lp, float("-inf")))
        if entropy:
            ents = ents.masked_scatter(outside, ent)
    return logps, ents


@dataclass
class ReasoningHeadOutput(ModelOutput):
    log_probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


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
        full = hidden.new_zeros(keep.shape, dtype=torch.float32)
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
class RLVRGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer with the reasoning vocabulary wired through sampling, log-probs and checkpoints."""

    def __init__(self, *args, reasoning_vocab: ReasoningVocab | None = None, ref_model=None, **kwargs):
        from rlvr_vocab.peft_utils import trl_reference_model

        if reasoning_vocab is not None:
            _refuse_unmasked_sampling(kwargs.get("args", args[2] if len(args) > 2 else None))
        with trl_reference_model(ref_model):  # TRL would reload config._name_or_path (fails for tiny/GGUF/rows)
            super().__init__(*args, **kwargs)
        self.reasoning_vocab = reasoning_vocab
        if reasoning_vocab is not None:
            for target in (self.model, self.ref_model):
                if target is None:
                    continue
                base = target.get_base_model() if hasattr(target, "get_base_model") else target
                add_reasoning_lm_head(base, reasoning_vocab, self.temperature, self.args.logprob_chunk_size)

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
        entropies = torch.cat(all_entropies) if compute_entropy else None
        return torch.cat(all_logps), entropies, None

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
        from rlvr_vocab.sampling import generate_completions

        return generate_completions(self, prompt_ids)

    # ------------------------------------------------------------------ decoding + metrics
    def _generate(self, prompts: list):
        result = super()._generate(prompts)
        vocab = self.reasoning_vocab
        if vocab is None:
            return result
        prompt_ids, completion_ids, tool_mask, completions, *rest = result
        check_mask_held(vocab, prompt_ids, completion_ids)  # whatever path sampled them (rollout_func included)
        mode = "train" if self.model.training else "eval"
        n_tokens = sum(len(c) for c in completion_ids)
        n_reasoning, n_inside = 0, 0
        for i, (p_ids, c_ids) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
            if not c_ids:
                continue
            ids = torch.tensor(p_ids + list(c_ids))
            n_inside += int(vocab.span_state(ids.unsqueeze(0))[0, len(p_ids) - 1 : -1].sum())
            n_here = int(vocab.is_reasoning(ids[len(p_ids) :]).sum())
            n_reasoning += n_here
            if n_here:  # re-decode: each reasoning id as its source token (plain decode drops them)
                text = vocab.decode(self.processing_class, c_ids)
                completions[i] = [{"role": "assistant", "content": text}] if isinstance(completions[i], list) else text
        self._metrics[mode]["reasoning/token_fraction"].append(n_reasoning / max(n_tokens, 1))
        self._metrics[mode]["reasoning/inside_span_fraction"].append(n_inside / max(n_tokens, 1))
        self._metrics[mode]["reasoning/inside_span_length"].append(n_inside / max(len(completion_ids), 1))
        return (prompt_ids, completion_ids, tool_mask, completions, *rest)

    # ------------------------------------------------------------------ checkpoints
    INITIAL_CHECKPOINT = "checkpoint-0"

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
