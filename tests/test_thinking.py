"""The thinking span: tags as tokens, the prompt that opens it, the answer after it, and the two guards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch as th
from conftest import CACHE_DIR, compose_config, tiny_llama
from loguru import logger

from rlvr_vocab.models import build_tiny_tokenizer, prepare_tokenizer
from rlvr_vocab.rewards.registry import AnswerAfterSpan, build_reward, for_span
from rlvr_vocab.thinking import (
    CompletionSpan,
    add_tag_tokens,
    apply_think_mode,
    find_tags,
    prompt_ends_inside,
    setup_span,
    split_completion,
)
from rlvr_vocab.train import train

QUESTION = [{"role": "user", "content": "What is 2 + 3?"}]
# A Qwen3-like template: it reads enable_thinking and writes an empty, closed span when it is false.
QWEN3_LIKE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


@pytest.fixture
def messages():
    captured: list[str] = []
    handle = logger.add(lambda m: captured.append(str(m)), level="WARNING")
    yield captured
    logger.remove(handle)


def char_tokenizer():
    """The tiny character tokenizer without span tags (so they must be added)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789 +=?<>/\n"))
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + chars)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<|pad|>", eos_token="<|im_end|>", unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"],
    )  # fmt: skip
    return prepare_tokenizer(tok, compose_config("model=tiny").model)


@pytest.mark.parametrize("tied", [True, False])
def test_added_tags_start_as_their_first_piece_and_survive_every_decode(tied):
    tok = char_tokenizer()
    model = tiny_llama(tok, tied=tied)
    pieces = {t: tok(t, add_special_tokens=False).input_ids for t in ("<think>", "</think>")}
    assert all(len(p) > 1 for p in pieces.values())  # not tokens yet
    tags = add_tag_tokens(tok, model, "<think>", "</think>")
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    for tag, tag_id in (("<think>", tags.open_id), ("</think>", tags.close_id)):
        first = pieces[tag][0]
        assert th.equal(embed[tag_id], embed[first]) and th.equal(head[tag_id], head[first])
        # about as likely as starting to write the tag's text: the same logit as its first piece
        logits = model(th.tensor([tok("ab", add_special_tokens=False).input_ids])).logits[0, -1]
        assert th.isclose(logits[tag_id], logits[first])
    ids = tok("<think>1+1=2</think>2", add_special_tokens=False).input_ids
    assert tags.open_id in ids and tags.close_id in ids
    assert tok.decode(ids, skip_special_tokens=True) == "<think>1+1=2</think>2"  # added, not special
    rows = model.get_input_embeddings().weight.size(0)
    assert add_tag_tokens(tok, model, "<think>", "</think>") == tags  # a second call changes nothing
    assert model.get_input_embeddings().weight.size(0) == rows


def test_think_true_ends_the_generation_prompt_inside_the_span():
    tok = char_tokenizer()
    tags = add_tag_tokens(tok, tiny_llama(tok), "<think>", "</think>")
    assert not prompt_ends_inside(tok, tags, QUESTION)
    apply_think_mode(tok, True, "<think>")
    text = tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    assert text.endswith("assistant\n<think>\n")
    assert prompt_ends_inside(tok, tags, QUESTION)
    apply_think_mode(tok, True, "<think>")  # a saved run's template is not wrapped twice
    assert tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True) == text
    assert not tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=False).endswith("<think>\n")


def test_think_false_turns_a_templates_thinking_off_and_auto_changes_nothing():
    tok = build_tiny_tokenizer()
    tok.chat_template = QWEN3_LIKE
    tags = find_tags(tok, "<think>", "</think>")
    apply_think_mode(tok, "auto", "<think>")
    assert tok.chat_template == QWEN3_LIKE
    apply_think_mode(tok, False, "<think>")
    text = tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<think>\n\n</think>\n\n") and not prompt_ends_inside(tok, tags, QUESTION)


def test_the_answer_is_what_follows_the_close_token_not_a_spelled_tag():
    tok = build_tiny_tokenizer()
    tags = find_tags(tok, "<think>", "</think>")
    spelled = tok("</", add_special_tokens=False).input_ids + tok("think>7", add_special_tokens=False).input_ids
    ids = tok("3+4=7", add_special_tokens=False).input_ids + spelled  # the tag in text pieces: still inside
    assert tags.close_id not in ids
    span = split_completion(ids, tags, prompt_inside=True)
    assert span.used and not span.closed and span.answer_start is None
    closed = tok("3+4=7</think>7", add_special_tokens=False).input_ids
    span = split_completion(closed, tags, prompt_inside=True)
    assert span.closed and tok.decode(closed[span.answer_start :]) == "7"


def test_correctness_counts_only_the_answer_after_the_span():
    [judge] = for_span([build_reward("last_number")], "<think>", "</think>", starts_inside=True)
    assert isinstance(judge, AnswerAfterSpan) and judge.__name__ == "last_number"
    texts = ["3+4=7</think>\\boxed{7}", "3+4=7 so 7", "3+4=7</think>8", "7</think>ok<think>7"]
    assert judge(texts, answer=["7"] * 4) == [1.0, 0.0, 0.0, 0.0]
    # from token ids (what the trainer and the evaluation pass): an unclosed span has no answer
    assert judge(["7", "7"], answer=["7", "7"], completion_answer=[None, "7"]) == [0.0, 1.0]
    [fmt] = for_span([build_reward("boxed_format")], "<think>", "</think>", starts_inside=True)
    assert fmt(["\\boxed{7}</think>7", "7</think>\\boxed{7}"]) == [0.0, 1.0]  # the box must follow the span
    [think] = for_span([build_reward("think_format")], "<think>", "</think>", starts_inside=True)
    assert think(["2+2=4</think> 4", "<think>2+2=4</think> 4"]) == [1.0, 0.0]  # the prompt already opened it
    # from token ids: one closed span, then an answer free of tags. More close tags after the span are not an
    # answer (SmolLM2 learned to spam them for this bonus on 2026-12-02, RESULTS.md)
    spans = [CompletionSpan(think_tokens=5, used=True, closed=True, answer_start=5)] * 3
    answers = [" 4", "</think></</think></think>", "\n4 <think>"]
    assert think(["x"] * 3, completion_span=spans, completion_answer=answers) == [1.0, 0.0, 0.0]
    # nor is punctuation: `</think>>` then EOS is what 6 of 10 runs settled on in the 2026-12-02 rerun (RESULTS.md);
    # an answer holds a box or a number
    answers = [">", " .\n", " so \\boxed{x}", " It is 12."]
    spans = [CompletionSpan(think_tokens=5, used=True, closed=True, answer_start=5)] * 4
    assert think(["x"] * 4, completion_span=spans, completion_answer=answers) == [0.0, 0.0, 1.0, 1.0]
    assert think(["2+2=4</think>>", "2+2=4</think> The sum: 4"]) == [0.0, 1.0]  # the text path agrees


def test_guard_warns_before_training_when_no_prompt_opens_the_span(messages):
    tok = build_tiny_tokenizer()
    model = tiny_llama(tok)
    cfg = compose_config("model=tiny")
    setup = setup_span(model, tok, cfg.model, "auto", 8, QUESTION)
    assert not setup.prompt_opens
    warning = "\n".join(messages)
    assert "model.reasoning_vocab_size=8" in warning and "dataset.think=true" in warning
    messages.clear()
    setup = setup_span(model, tok, cfg.model, True, 8, QUESTION)
    assert setup.prompt_opens and not messages
    setup_span(tiny_llama(tok), build_tiny_tokenizer(), cfg.model, "auto", 0, QUESTION)  # the baseline: no warning
    assert not messages


TINY = ["experiment=debug", "training.max_steps=2", "training.max_completion_length=8", f"paths.cache_dir={CACHE_DIR}"]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_guard_warns_loudly_when_no_completion_entered_a_span(tmp_path, messages):
    cfg = compose_config(
        *TINY, f"output_dir={tmp_path}", "model.reasoning_vocab_size=8", "dataset.think=false",
        "model.reasoning.span_check_steps=1", "+model.generation_kwargs.suppress_tokens=[3]",  # <think> never sampled
    )  # fmt: skip
    train(cfg)
    assert all(r.get("reasoning/inside_span_fraction", 0) == 0 for r in _records(tmp_path))
    loud = [m for m in messages if "no sampled completion has spent a single token inside" in m]
    assert len(loud) == 1 and "dataset.think=true" in loud[0]


def test_think_true_run_spends_tokens_in_spans_and_logs_span_metrics(tmp_path, messages):
    cfg = compose_config(*TINY, f"output_dir={tmp_path}", "model.reasoning_vocab_size=8", "dataset.think=true")
    train(cfg)
    steps = [r for r in _records(tmp_path) if "think/length" in r]
    assert len(steps) == 2 and all(r["think/length"] > 0 and r["think/used_fraction"] == 1.0 for r in steps)
    assert not [m for m in messages if "does not open" in m or "single token inside" in m]


def test_smollm2_reasoning_ids_are_sampled_inside_the_think_span(tmp_path):
    """The embedded real model, N>0 and dataset.think=true: one step spends tokens in spans, reasoning ids there."""
    cfg = compose_config(
        "experiment=think_arith", f"output_dir={tmp_path}", f"paths.cache_dir={CACHE_DIR}",
        "model.reasoning_vocab_size=64", "training.bf16=false", "training.max_steps=1", "training.num_generations=4",
        "training.per_device_train_batch_size=4", "training.gradient_accumulation_steps=2",
        "training.max_completion_length=16", "eval.every_steps=0",
        "training.save_steps=100", "model.reasoning.keep_initial_checkpoint=false",
    )  # fmt: skip
    train(cfg)
    [step] = [r for r in _records(tmp_path) if "think/length" in r]
    assert step["think/used_fraction"] == 1.0 and step["think/length"] > 0
    # ids 17..80 (digits, punctuation, letters) have twins: the policy samples them inside the span
    assert step["reasoning/span_token_fraction"] > 0 and step["reasoning/token_fraction"] > 0
    assert step["reasoning/token_fraction"] <= step["reasoning/inside_span_fraction"]
