"""The reasoning vocabulary: N extra token rows that the policy may use only inside its thinking span.

Ids ``[standard_size, standard_size + N)`` are reasoning ids; reasoning id ``standard_size + i`` starts
as a copy of standard token ``source_ids[i]`` (embedding row and output-head row). RL decides what they
come to mean. Outside ``<think> ... </think>`` their logits are -inf, in sampling *and* in the
training log-prob pass, so the policy gradient is taken under the distribution that was sampled.

``standard_size`` is the number of embedding rows before extension (the model's vocabulary, which can
be larger than the tokenizer's), never ``tokenizer.vocab_size``: added tokens are not reasoning ids.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch as th
from loguru import logger
from transformers import LogitsProcessor

from rlvr_vocab.config import ConfigError
from rlvr_vocab.thinking import SpanTags, add_tag_tokens, span_state

MAP_FILE = "reasoning_vocab.json"


@dataclass
class ReasoningVocab:
    """The map saved with every checkpoint as ``reasoning_vocab.json``."""

    size: int  # N
    standard_size: int  # embedding rows before extension; reasoning ids start here
    source_ids: list[int]  # reasoning id standard_size + i started as a copy of source_ids[i]
    think_open: str
    think_close: str
    open_id: int
    close_id: int
    init: str = "first_n"

    # ---------------------------------------------------------------------------- persistence
    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / MAP_FILE
        path.write_text(json.dumps(asdict(self), indent=1))
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ReasoningVocab | None:
        path = Path(directory) / MAP_FILE
        return cls(**json.loads(path.read_text())) if path.is_file() else None

    # ---------------------------------------------------------------------------- ids
    def lookup(self, device: th.device | str = "cpu") -> th.Tensor:
        """A table mapping every id of the extended vocabulary to its standard source id."""
        table = th.arange(self.standard_size + self.size, device=device)
        table[self.standard_size :] = th.tensor(self.source_ids, device=device, dtype=th.long)
        return table

    def to_source(self, ids: th.Tensor | list[int]) -> th.Tensor | list[int]:
        """Replace every reasoning id by its source id (for decoding into text)."""
        if isinstance(ids, th.Tensor):
            return self.lookup(ids.device)[ids]
        v = self.standard_size
        return [self.source_ids[i - v] if i >= v else i for i in ids]

    def is_reasoning(self, ids: th.Tensor) -> th.Tensor:
        return ids >= self.standard_size

    def decode(self, tokenizer, ids, skip_special_tokens: bool = True) -> str:
        """Text of a completion, each reasoning id read as its source token."""
        ids = ids.tolist() if isinstance(ids, th.Tensor) else list(ids)
        return tokenizer.decode(self.to_source(ids), skip_special_tokens=skip_special_tokens)

    def render(self, tokenizer, ids, marker: tuple[str, str] = ("⟦", "⟧")) -> str:
        """Text with every reasoning token wrapped in markers, for inspection."""
        ids = ids.tolist() if isinstance(ids, th.Tensor) else list(ids)
        parts = []
        for i in ids:
            if i >= self.standard_size:
                parts.append(marker[0] + tokenizer.decode([self.source_ids[i - self.standard_size]]) + marker[1])
            else:
                parts.append(tokenizer.decode([i]))
        return "".join(parts)

    # ---------------------------------------------------------------------------- span
    @property
    def tags(self) -> SpanTags:
        """The span tags this map was built with."""
        return SpanTags(self.think_open, self.think_close, self.open_id, self.close_id)

    def span_state(self, ids: th.Tensor, initial: th.Tensor | None = None) -> th.Tensor:
        """``inside[b, t]``: after reading ``ids[b, :t+1]``, is the sequence inside a thinking span? (thinking.span_state)

        Example:
            >>> rv = ReasoningVocab(2, 10, [1, 2], "<think>", "</think>", open_id=8, close_id=9)
            >>> rv.span_state(th.tensor([[5, 8, 5, 9, 5, 8]])).int().tolist()
            [[0, 1, 1, 0, 0, 1]]
        """
        return span_state(ids, self.open_id, self.close_id, initial)

    def step_state(self, inside: th.Tensor, last_token: th.Tensor) -> th.Tensor:
        """O(1) update of the span state by one generated token per sequence."""
        return th.where(last_token == self.open_id, True, th.where(last_token == self.close_id, False, inside))

    def mask_logits_(self, logits: th.Tensor, inside: th.Tensor) -> th.Tensor:
        """In place: reasoning columns to -inf for sequences outside the span. ``logits``: [B, V+N]."""
        logits[:, self.standard_size :].masked_fill_(~inside.unsqueeze(-1), float("-inf"))
        return logits


class ReasoningMaskProcessor(LogitsProcessor):
    """Logits processor for ``generate``: reasoning ids only inside the thinking span.

    Stateful for one ``generate`` call: the first call scans the prompt once, every later call updates
    the state from the last sampled token (O(1) per sequence per step, on the device, no host sync).
    """

    def __init__(self, vocab: ReasoningVocab):
        self.vocab = vocab
        self.inside: th.Tensor | None = None

    def __call__(self, input_ids: th.LongTensor, scores: th.FloatTensor) -> th.FloatTensor:
        if self.inside is None or self.inside.size(0) != input_ids.size(0):
            self.inside = self.vocab.span_state(input_ids)[:, -1]
        else:
            self.inside = self.vocab.step_state(self.inside, input_ids[:, -1])
        return self.vocab.mask_logits_(scores, self.inside)


# ------------------------------------------------------------------------------------------ construction
def _excluded_ids(tokenizer, model, extra: list[int]) -> set[int]:
    """Ids that may never be copied: specials (EOS, end-of-turn, pad, BOS), the tags, added tokens."""
    excluded = set(tokenizer.all_special_ids) | set(extra)
    excluded |= set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    for source in (model.config, getattr(model, "generation_config", None)):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        excluded |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return excluded


def choose_source_ids(
    n: int,
    tokenizer,
    model,
    init: str = "first_n",
    repeat_policy: str | None = None,
    corpus_texts: list[str] | None = None,
    excluded: set[int] | None = None,
) -> list[int]:
    """The N standard ids the reasoning rows are copied from.

    ``first_n``: the lowest eligible ids (standard ids 0..N-1 apart from special tokens). ``frequent``:
    eligible ids ranked by their count in ``corpus_texts``, then by id. N larger than the number of
    eligible ids needs ``repeat_policy='cycle'``.
    """
    excluded = excluded if excluded is not None else _excluded_ids(tokenizer, model, [])
    limit = min(len(tokenizer), model.get_input_embeddings().weight.size(0))
    eligible = [i for i in range(limit) if i not in excluded]
    if init == "frequent":
        if not corpus_texts:
            raise ConfigError("model.reasoning.init=frequent needs a corpus: set model.reasoning.frequency_corpus.")
        counts = Counter(i for text in corpus_texts for i in tokenizer(text, add_special_tokens=False).input_ids)
        allowed = set(eligible)
        ranked = [i for i, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if i in allowed]
        seen = set(ranked)
        eligible = ranked + [i for i in eligible if i not in seen]
    if n > len(eligible):
        if repeat_policy != "cycle":
            raise ConfigError(
                f"model.reasoning_vocab_size={n} exceeds the {len(eligible)} standard tokens that can be copied. "
                "Lower it, or set model.reasoning.repeat_policy=cycle to repeat source tokens."
            )
        return [eligible[i % len(eligible)] for i in range(n)]
    return eligible[:n]


@th.no_grad()
def extend_model(
    model, tokenizer, n: int, reasoning_cfg, tags: SpanTags | None = None, corpus_texts: list[str] | None = None
) -> ReasoningVocab:
    """Append N reasoning rows to the input embeddings and the output head (tied or untied), in place.

    Works on a model loaded with ``from_pretrained`` (real tensors), for any causal LM exposing
    ``get_input_embeddings`` / ``get_output_embeddings``. ``tags``: the span tags, already tokens of the
    tokenizer and rows of the model (``thinking.add_tag_tokens``; None: ``<think>``/``</think>``, added if
    missing); they are never copied.
    """
    if tags is None:
        tags = add_tag_tokens(tokenizer, model, "<think>", "</think>")
    open_id, close_id = tags.open_id, tags.close_id
    standard = model.get_input_embeddings().weight.size(0)
    excluded = _excluded_ids(tokenizer, model, [open_id, close_id])
    source = choose_source_ids(
        n, tokenizer, model, reasoning_cfg.init, reasoning_cfg.repeat_policy, corpus_texts, excluded
    )
    in_rows = model.get_input_embeddings().weight[source].clone()
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is model.get_input_embeddings().weight
    out_rows = None if out is None or tied else out.weight[source].clone()
    out_bias = None if out is None or getattr(out, "bias", None) is None else out.bias[source].clone()
    model.resize_token_embeddings(standard + n, mean_resizing=False)
    model.get_input_embeddings().weight[standard:] = in_rows
    out = model.get_output_embeddings()
    if out_rows is not None:
        out.weight[standard:] = out_rows
    if out_bias is not None:
        out.bias[standard:] = out_bias
    vocab = ReasoningVocab(
        size=n,
        standard_size=standard,
        source_ids=list(source),
        think_open=tags.open_tag,
        think_close=tags.close_tag,
        open_id=open_id,
        close_id=close_id,
        init=reasoning_cfg.init,
    )
    model.config.reasoning_vocab = {"size": n, "standard_size": standard}
    attach_generation_mask(model, vocab)
    logger.info(f"Reasoning vocabulary: {n} rows after {standard} standard rows ({'tied' if tied else 'untied'} head)")
    return vocab


def attach_generation_mask(model, vocab: ReasoningVocab) -> None:
    """Make ``model.generate`` apply the span mask (adds a fresh ReasoningMaskProcessor to every call)."""
    from transformers import LogitsProcessorList

    if getattr(model, "_reasoning_vocab", None) is not None:
        model._reasoning_vocab = vocab
        return
    original = model.generate

    def generate(*args, logits_processor=None, **kwargs):
        processors = LogitsProcessorList(logits_processor or [])
        processors.insert(0, ReasoningMaskProcessor(model._reasoning_vocab))
        return original(*args, logits_processor=processors, **kwargs)

    model._reasoning_vocab = vocab
    model.generate = generate


def reasoning_ids_outside_span(
    vocab: ReasoningVocab, prompt_ids: list[list[int]], completion_ids: list[list[int]]
) -> list[tuple[int, int]]:
    """(sequence, completion position) of every reasoning id that was sampled outside the thinking span.

    Always empty when the sampler applied the mask; the trainer checks every generation batch with it.

    Example:
        >>> vocab = ReasoningVocab(2, 10, [3, 4], "<think>", "</think>", open_id=1, close_id=2)
        >>> reasoning_ids_outside_span(vocab, [[5], [5, 1]], [[10, 1, 11, 2], [11, 2, 3]])
        [(0, 0)]
    """
    bad = []
    for i, (p_ids, c_ids) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        if not c_ids:
            continue
        ids = th.tensor(list(p_ids) + list(c_ids))
        inside = vocab.span_state(ids.unsqueeze(0))[0, len(p_ids) - 1 : -1]
        outside = vocab.is_reasoning(ids[len(p_ids) :]) & ~inside
        bad += [(i, int(t)) for t in outside.nonzero().flatten()]
    return bad


def check_mask_held(vocab: ReasoningVocab, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> None:
    """Raise when a sampling path let a reasoning id through outside the span (its log-prob in training is -inf)."""
    bad = reasoning_ids_outside_span(vocab, prompt_ids, completion_ids)
    if bad:
        seq, pos = bad[0]
        raise RuntimeError(
            f"{len(bad)} reasoning id(s) were sampled outside the thinking span (first: completion {seq}, token {pos}, "
            f"id {completion_ids[seq][pos]}): this sampling path does not apply the reasoning-vocabulary mask. "
            "Use training.generation_backend=fast or trl without vLLM or continuous batching."
        )


def load_checkpoint(path: str | os.PathLike, **model_kwargs):
    """Load (model, tokenizer) from a run dir or checkpoint, restoring the reasoning vocabulary if present."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, **model_kwargs)
    vocab = ReasoningVocab.load(path)
    if vocab is not None:
        rows = model.get_input_embeddings().weight.size(0)
        if rows != vocab.standard_size + vocab.size:
            raise ValueError(f"{path}: model has {rows} rows, {MAP_FILE} says {vocab.standard_size}+{vocab.size}")
        attach_generation_mask(model, vocab)
    model.reasoning_vocab = vocab
    tokenizer.padding_side = "left"
    return model, tokenizer
