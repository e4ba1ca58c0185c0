"""The logits processors and stopping rule of one ``generate`` call, translated into graph-safe typed steps.

transformers builds the processors of a call from its ``GenerationConfig``; ``build_plan`` maps each onto one
step below, in transformers' order, or says why it cannot (then the sampler runs transformers' own loop):

* ``RepetitionPenalty``: seen ids through a per-row ``seen`` mask instead of a gather over the history;
* ``BlockBefore`` / ``BlockAt``: min-length, min-new-tokens, suppressed and begin-suppressed ids, as column
  masks gated by a device step counter; the step thresholds live in a device tensor, so a captured graph
  serves calls with other prompt lengths;
* ``ReasoningSpan``: the reasoning-vocabulary mask, from an O(1) per-row span state;
* ``Warper``: temperature / top-k / top-p / min-p / ... are transformers' own objects, called as they are.

Each step's ``apply(scores, inputs, index)`` is a pure tensor function of the [n, V] fp32 scores and the
per-row state in ``inputs`` (``StepInputs``), so it can be compiled and captured.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypedDict

import torch as th

NEVER = 1 << 62  # a step threshold that is never reached


class StepInputs(TypedDict):
    """The state a step reads (all [n, ...] over the live rows, except ``step``, ``thresholds``, ``columns``)."""

    step: th.Tensor  # int64 [1]: index of the token being sampled
    thresholds: th.Tensor  # int64 [len(steps)]: per-step thresholds of this call
    columns: list  # per step: a bool [V] column mask, or None
    seen: th.Tensor | None  # bool [n, V + 1]: ids seen so far (repetition penalty); last column is spare
    inside: th.Tensor  # bool [n]: inside the reasoning span


@dataclass(frozen=True)
class RepetitionPenalty:
    """``RepetitionPenaltyLogitsProcessor``: the logit of a seen id is divided by ``penalty`` (multiplied if < 0)."""

    penalty: float

    def key(self) -> tuple:
        return ("repetition", self.penalty)

    def apply(self, scores: th.Tensor, inputs: StepInputs, index: int) -> th.Tensor:
        penalised = th.where(scores < 0, scores * self.penalty, scores / self.penalty)
        return th.where(inputs["seen"][:, :-1], penalised, scores)


@dataclass(frozen=True)
class BlockBefore:
    """Ids at -inf while fewer than ``until`` tokens were sampled (min length, min new tokens, suppressed ids)."""

    until: int  # per call (a device threshold), not part of ``key``
    ids: tuple[int, ...]

    def key(self) -> tuple:
        return ("block_before", self.ids)

    def threshold(self) -> int:
        return self.until

    def blocked(self, inputs: StepInputs, index: int) -> th.Tensor:
        """bool [V]: the columns this step puts at -inf now (``index``: the step's place in the plan)."""
        return inputs["columns"][index] & (inputs["step"] < inputs["thresholds"][index])

    def apply(self, scores: th.Tensor, inputs: StepInputs, index: int) -> th.Tensor:
        return scores.masked_fill(self.blocked(inputs, index), float("-inf"))


@dataclass(frozen=True)
class BlockAt:
    """Ids at -inf for the token of index ``at`` only (``SuppressTokensAtBeginLogitsProcessor``)."""

    at: int  # per call (a device threshold), not part of ``key``
    ids: tuple[int, ...]

    def key(self) -> tuple:
        return ("block_at", self.ids)

    def threshold(self) -> int:
        return self.at

    def blocked(self, inputs: StepInputs, index: int) -> th.Tensor:
        """bool [V]: the columns this step puts at -inf now (``index``: the step's place in the plan)."""
        return inputs["columns"][index] & (inputs["step"] == inputs["thresholds"][index])

    def apply(self, scores: th.Tensor, inputs: StepInputs, index: int) -> th.Tensor:
        return scores.masked_fill(self.blocked(inputs, index), float("-inf"))


@dataclass(frozen=True, eq=False)
class ReasoningSpan:
    """``ReasoningMaskProcessor``: reasoning ids at -inf for rows outside the thinking span."""

    vocab: object  # rlvr_vocab.reasoning_vocab.ReasoningVocab

    def key(self) -> tuple:
        return ("reasoning", self.vocab.standard_size, self.vocab.open_id, self.vocab.close_id)

    def apply(self, scores: th.Tensor, inputs: StepInputs, index: int) -> th.Tensor:
        outside = ~inputs["inside"][:, None]
        reasoning = th.arange(scores.shape[-1], device=scores.device) >= self.vocab.standard_size
        return scores.masked_fill(outside & reasoning, float("-inf"))


@dataclass(frozen=True, eq=False)
class Warper:
    """A stateless processor of transformers (temperature, top-k, top-p, min-p, ...), called as generate calls it."""

    name: str
    call: Callable

    def key(self) -> tuple:
        consts = tuple(sorted((k, v) for k, v in vars(self.call).items() if isinstance(v, (bool, int, float, str))))
        return ("warper", self.name, consts)

    def apply(self, scores: th.Tensor, inputs: StepInputs, index: int) -> th.Tensor:
        return self.call(None, scores)


Step = RepetitionPenalty | BlockBefore | BlockAt | ReasoningSpan | Warper


@dataclass
class Plan:
    """The processing and stopping rule of one ``generate`` call, as typed graph-safe steps."""

    steps: list[Step] = field(default_factory=list)  # in transformers' order
    greedy: bool = False
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0
    max_length: int = 0  # prompt + completion tokens
    repetition_skip: int | th.Tensor | None = None  # prompt tokens the penalty ignores, per row (None: no penalty)

    def signature(self) -> tuple:
        """What a compiled or captured step bakes in (per-call thresholds live in a device tensor instead)."""
        keys = tuple(s.key() for s in self.steps)
        return (keys, self.greedy, self.eos_ids, self.pad_id, self.repetition_skip is not None)

    def thresholds(self) -> list[int]:
        """One device threshold per step (0 for the steps that have none)."""
        return [s.threshold() if isinstance(s, (BlockBefore, BlockAt)) else 0 for s in self.steps]

    def reasoning(self) -> ReasoningSpan | None:
        return next((s for s in self.steps if isinstance(s, ReasoningSpan)), None)

    def process(self, scores: th.Tensor, inputs: StepInputs) -> th.Tensor:
        """Apply every step in order to the fp32 scores [n, V]."""
        for i, step in enumerate(self.steps):
            scores = step.apply(scores, inputs, i)
        return scores


def _ids(t) -> tuple[int, ...]:
    """Token ids as a tuple of ints, from a tensor, a list or None.

    Example:
        >>> _ids(th.tensor([[3], [5]])), _ids([7]), _ids(None)
        ((3, 5), (7,), ())
    """
    if t is None:
        return ()
    return tuple(int(i) for i in (t.flatten().tolist() if isinstance(t, th.Tensor) else list(t)))


def build_plan(
    logits_processor, stopping_criteria, generation_config, input_length: int, vocab=None
) -> tuple[Plan | None, str | None]:
    """Map transformers' prepared processors and criteria onto typed steps: (plan, None) or (None, reason).

    Args:
        input_length: prompt tokens (the padded width), to turn absolute lengths into token indices.
        vocab: a ReasoningVocab whose mask applies even if ``model.generate`` did not add the processor.
    """
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
    try:
        for p in logits_processor:
            if isinstance(p, lp.RepetitionPenaltyLogitsProcessor):
                # prompt tokens left out of the penalty: an int, or one count per row (the left padding)
                plan.repetition_skip = p.prompt_ignore_length if p.prompt_ignore_length is not None else 0
                plan.steps.append(RepetitionPenalty(float(p.penalty)))
            elif isinstance(p, lp.MinNewTokensLengthLogitsProcessor):
                # EOS blocked while (input_length + t) - prompt_length_to_skip < min_new_tokens, t = tokens so far
                until = int(p.prompt_length_to_skip) + int(p.min_new_tokens) - input_length
                plan.steps.append(BlockBefore(until, _ids(p.eos_token_id)))
            elif isinstance(p, lp.MinLengthLogitsProcessor):
                plan.steps.append(BlockBefore(int(p.min_length) - input_length, _ids(p.eos_token_id)))
            elif isinstance(p, lp.SuppressTokensAtBeginLogitsProcessor):
                plan.steps.append(BlockAt(int(p.begin_index) - input_length, _ids(p.begin_suppress_tokens)))
            elif isinstance(p, lp.SuppressTokensLogitsProcessor):
                plan.steps.append(BlockBefore(NEVER, _ids(p.suppress_tokens)))
            elif isinstance(p, ReasoningMaskProcessor):
                plan.steps.append(ReasoningSpan(p.vocab))
            elif isinstance(p, stateless):
                plan.steps.append(Warper(type(p).__name__, p))
            else:
                return None, f"logits processor {type(p).__name__}"
    except AttributeError as err:  # a transformers version with other attribute names
        return None, f"unexpected processor layout ({err})"
    if vocab is not None and plan.reasoning() is None:  # model.generate was not patched: apply the mask anyway,
        first_warper = next((i for i, s in enumerate(plan.steps) if isinstance(s, Warper)), len(plan.steps))
        plan.steps.insert(first_warper, ReasoningSpan(vocab))  # where transformers puts custom processors
    for c in stopping_criteria:
        if isinstance(c, sc.MaxLengthCriteria):
            plan.max_length = int(c.max_length)
        elif isinstance(c, sc.EosTokenCriteria):
            plan.eos_ids = _ids(c.eos_token_id)
        else:
            return None, f"stopping criterion {type(c).__name__}"
    if plan.max_length <= input_length:
        return None, "no max_length"
    return plan, None
