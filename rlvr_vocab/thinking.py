"""The thinking span: its tags as real tokens, the prompt that opens it, and the answer written after it.

One home for the span, whatever the arm: the baseline (``model.reasoning_vocab_size=0``) and the reasoning
vocabulary use the same tags, the same prompt and the same rule for what counts as the answer.

* **Tags as tokens.** ``<think>``/``</think>`` (``model.think_open``/``model.think_close``) must be single
  tokens the model can emit. Qwen3 has them. Other tokenizers get them as added (not special) tokens, so
  every decode keeps them in the text. Their rows start from the pieces of their own text
  (``model.tag_init=pieces``, see :func:`add_tag_tokens`), not near zero probability.
* **The prompt** (``dataset.think``): ``true`` ends the generation prompt with the open tag (R1-Zero
  style), whatever the template does; ``false`` opens no span (templates with a thinking switch, Qwen3's
  ``enable_thinking``, get it turned off); ``auto`` leaves the template and the model's own habits alone.
* **The answer** (:func:`split_completion`): a completion that spends a token inside a span is judged on
  what follows its last close tag; one that ends inside a span has no answer. Decided from token ids, so a
  tag spelled out in text pieces (``</`` ``think`` ``>``) closes nothing, here as in the sampling mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from loguru import logger

from rlvr_vocab.config import ConfigError, parse_think

TAG_INITS = ("pieces", "mean")
# Marks a chat template this module has already changed (so a saved tokenizer is not wrapped twice).
_MARK = "{{#- rlvr-vocab think={mode} -#}}"


@dataclass(frozen=True)
class SpanTags:
    """The two tags of the thinking span and their token ids."""

    open_tag: str
    close_tag: str
    open_id: int
    close_id: int


@dataclass(frozen=True)
class CompletionSpan:
    """Where one completion's thinking span is, in completion tokens."""

    think_tokens: int  # tokens generated while inside a span (its close tag included: it is sampled there)
    used: bool  # the completion spent at least one token inside a span
    closed: bool  # it used a span and ended outside every span
    answer_start: int | None  # first token of the answer: 0 without a span, after the last close tag, None if unclosed


# ------------------------------------------------------------------------------------------ span state
def span_state(ids, open_id: int, close_id: int, initial=None):
    """``inside[b, t]``: after reading ``ids[b, :t+1]``, is the sequence inside a thinking span?

    Vectorised over the sequence (two cumulative maxima) on the ids' device. ``initial`` (``[B]`` bool) is the
    state before ``ids[:, 0]`` (default: outside). Each open tag (re)opens the span, each close tag closes it.

    Example:
        >>> import torch as th
        >>> span_state(th.tensor([[5, 8, 5, 9, 5, 8]]), open_id=8, close_id=9).int().tolist()
        [[0, 1, 1, 0, 0, 1]]
    """
    import torch as th

    pos = th.arange(ids.size(-1), device=ids.device).expand_as(ids)
    last_open = th.where(ids == open_id, pos, -1).cummax(-1).values
    last_close = th.where(ids == close_id, pos, -1).cummax(-1).values
    inside = last_open > last_close
    if initial is not None:
        inside = inside | ((last_open < 0) & (last_close < 0) & initial.unsqueeze(-1))
    return inside


def ends_inside(ids: Sequence[int], open_id: int, close_id: int, initial: bool = False) -> bool:
    """Whether a token sequence ends inside a span (the last tag in it is an open tag).

    Example:
        >>> ends_inside([1, 8, 2], 8, 9), ends_inside([8, 2, 9], 8, 9), ends_inside([2, 3], 8, 9, initial=True)
        (True, False, True)
    """
    for token in reversed(ids):
        if token == open_id:
            return True
        if token == close_id:
            return False
    return initial


def split_completion(completion_ids: Sequence[int], tags: SpanTags | None, prompt_inside: bool) -> CompletionSpan:
    """The span of one completion: tokens spent thinking, whether it closed, where its answer starts.

    ``prompt_inside``: the prompt ends inside a span (``dataset.think=true``), so the completion starts there.

    Example:
        >>> tags = SpanTags("<think>", "</think>", open_id=8, close_id=9)
        >>> split_completion([5, 5, 9, 7, 7], tags, prompt_inside=True)
        CompletionSpan(think_tokens=3, used=True, closed=True, answer_start=3)
        >>> split_completion([5, 5, 5], tags, prompt_inside=True).answer_start is None  # never closed: no answer
        True
        >>> split_completion([7, 7], tags, prompt_inside=False)  # no span at all: the whole text is the answer
        CompletionSpan(think_tokens=0, used=False, closed=False, answer_start=0)
    """
    if tags is None:
        return CompletionSpan(0, False, False, 0)
    inside, used, think, last_close = prompt_inside, False, 0, None
    for i, token in enumerate(completion_ids):
        if inside:  # token i was generated inside the span
            think += 1
            used = True
        if token == tags.open_id:
            inside = True
        elif token == tags.close_id:
            if inside:
                last_close = i
            inside = False
    if not used and last_close is None:
        return CompletionSpan(think, False, False, 0)
    if inside:
        return CompletionSpan(think, True, False, None)
    return CompletionSpan(think, True, True, (last_close + 1) if last_close is not None else 0)


# ------------------------------------------------------------------------------------------ tags as tokens
def single_token_id(tokenizer, text: str) -> int | None:
    """The id of ``text`` when the tokenizer holds it as one token, else None."""
    token_id = tokenizer.convert_tokens_to_ids(text)
    if token_id is None or token_id == tokenizer.unk_token_id:
        return None
    return token_id if tokenizer.convert_ids_to_tokens(token_id) == text else None


def find_tags(tokenizer, open_tag: str, close_tag: str) -> SpanTags | None:
    """The span tags when both are single tokens of ``tokenizer``, else None (no span is possible)."""
    open_id, close_id = single_token_id(tokenizer, open_tag), single_token_id(tokenizer, close_tag)
    if open_id is None or close_id is None:
        return None
    return SpanTags(open_tag, close_tag, open_id, close_id)


def add_tag_tokens(tokenizer, model, open_tag: str, close_tag: str, init: str = "pieces") -> SpanTags:
    """Make both tags single tokens (added, not special: every decode keeps them) and start their rows sensibly.

    A freshly added token starts near zero probability, so a policy would never sample a close tag to learn
    from. ``init`` sets where the new rows start:

    * ``pieces`` (default): both rows of a tag (input embedding and output head) are those of the first piece
      of its own text (``</`` for ``</think>``): the tag starts about as likely as starting to write its text,
      and reads like it. Measured with SmolLM2-135M-Instruct (tied embeddings), prompts ending in ``<think>\n``
      with a system prompt naming the tags, T=1, 64 samples of 128 tokens: the close tag was sampled in 6 of
      64 with these rows, 0 of 64 with rows from the mean of the pieces, 0 of 64 with ``mean``.
    * ``mean``: transformers' ``mean_resizing`` (the mean of all rows plus noise): near zero probability.

    Tags already in the vocabulary (Qwen3) are left as they are. Returns the tags with their ids.
    """
    import torch as th

    if init not in TAG_INITS:
        raise ConfigError(f"model.tag_init={init!r}: choose one of {', '.join(TAG_INITS)}.")
    missing = [t for t in (open_tag, close_tag) if single_token_id(tokenizer, t) is None]
    if missing:
        pieces = {t: tokenizer(t, add_special_tokens=False).input_ids for t in missing}  # before they exist
        tokenizer.add_tokens(missing, special_tokens=False)
        rows = model.get_input_embeddings().weight.size(0)
        if len(tokenizer) > rows:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=init == "mean")
        if init == "pieces":
            embed, head = model.get_input_embeddings().weight, model.get_output_embeddings()
            with th.no_grad():
                for tag, ids in pieces.items():
                    new, first = tokenizer.convert_tokens_to_ids(tag), ids[0]
                    embed[new] = embed[first]
                    if head is not None and head.weight is not embed:
                        head.weight[new] = head.weight[first]
                        if getattr(head, "bias", None) is not None:
                            head.bias[new] = head.bias[first]
        logger.info(f"Added the span tags {missing} as tokens (rows from {init})")
    tags = find_tags(tokenizer, open_tag, close_tag)
    if tags is None:  # pragma: no cover - the tokenizer normalises the tag text
        raise ConfigError(f"model.think_open/think_close: {open_tag!r}/{close_tag!r} do not become single tokens.")
    return tags


# ------------------------------------------------------------------------------------------ the prompt
def apply_think_mode(tokenizer, think, open_tag: str) -> None:
    """Change the chat template's generation prompt for ``dataset.think`` (in place; saved with the tokenizer).

    ``true`` appends the open tag and a newline after the template's generation prompt; ``false`` sets
    ``enable_thinking = false`` for templates that read it (Qwen3 then writes an empty, closed span); ``auto``
    changes nothing. A template already changed (a saved run's tokenizer) is left as it is.
    """
    think = parse_think(think)
    template = tokenizer.chat_template
    if think == "auto" or not isinstance(template, str) or "{#- rlvr-vocab think=" in template:
        return
    mark = _MARK.format(mode=str(think).lower())
    if think is True:
        literal = (open_tag + "\n").replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
        tokenizer.chat_template = (
            template + mark + "{%- if add_generation_prompt %}{{- '" + literal + "' }}{%- endif %}"
        )
    else:
        tokenizer.chat_template = mark + "{%- set enable_thinking = false %}" + template


def prompt_ends_inside(tokenizer, tags: SpanTags | None, prompt_messages) -> bool:
    """Whether ``prompt_messages`` through the chat template (with the generation prompt) end inside a span."""
    if tags is None:
        return False
    text = tokenizer.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True)
    return ends_inside(tokenizer(text, add_special_tokens=False).input_ids, tags.open_id, tags.close_id)


def template_mentions(tokenizer, tag: str) -> bool:
    """The chat template knows the tag (Qwen3's does: such a model writes the open tag itself)."""
    return isinstance(tokenizer.chat_template, str) and tag in tokenizer.chat_template


# ------------------------------------------------------------------------------------------ one call for train()
@dataclass(frozen=True)
class SpanSetup:
    """What a run's thinking span is: its tags (None: no span possible) and whether the prompt opens it."""

    tags: SpanTags | None
    prompt_opens: bool  # the generation prompt ends inside a span (dataset.think=true, or the template's own)


def setup_span(model, tokenizer, model_cfg, think, reasoning_vocab_size: int, example_prompt) -> SpanSetup:
    """Tags as tokens and the prompt for ``dataset.think``, the same for both arms; warn when N > 0 would be inert.

    The tags are added when the prompt opens the span (``think=true``) or the reasoning vocabulary needs them,
    so with ``think=true`` the baseline and the reasoning arm have the same tokens, rows and prompt.
    ``example_prompt``: one training prompt (chat messages), rendered to see where the generation prompt ends.
    """
    think = parse_think(think)
    if think is True or reasoning_vocab_size > 0:
        tags = add_tag_tokens(tokenizer, model, model_cfg.think_open, model_cfg.think_close, model_cfg.tag_init)
    else:
        tags = find_tags(tokenizer, model_cfg.think_open, model_cfg.think_close)
    apply_think_mode(tokenizer, think, model_cfg.think_open)
    opens = prompt_ends_inside(tokenizer, tags, example_prompt) if isinstance(example_prompt, list) else False
    if reasoning_vocab_size > 0 and not opens:
        habit = (
            f"its chat template knows {model_cfg.think_open}, so the model may write it itself (Qwen3 does)"
            if template_mentions(tokenizer, model_cfg.think_open)
            else f"nothing in its chat template suggests the model ever writes {model_cfg.think_open}"
        )
        logger.warning(
            f"model.reasoning_vocab_size={reasoning_vocab_size}, but the prompt does not open a thinking span "
            f"(dataset.think={think}): reasoning ids are allowed only inside {model_cfg.think_open} ... "
            f"{model_cfg.think_close}, so only the model writing {model_cfg.think_open} itself could use them, and "
            f"{habit}. Set dataset.think=true to end the prompt with {model_cfg.think_open} in both arms."
        )
    return SpanSetup(tags, opens)
