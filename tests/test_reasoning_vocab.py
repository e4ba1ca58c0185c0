"""The reasoning vocabulary: construction, span mask, sampling == training distribution, decoding, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch as th
from conftest import make_trainer, tiny_llama
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from rlvr_vocab.config import ConfigError, ReasoningVocabConfig
from rlvr_vocab.models import build_tiny_tokenizer, prepare_tokenizer
from rlvr_vocab.reasoning_vocab import (
    ReasoningMaskProcessor,
    ReasoningVocab,
    choose_source_ids,
    extend_model,
    load_checkpoint,
)
from rlvr_vocab.thinking import add_tag_tokens
from rlvr_vocab.trainer import masked_token_logprobs

RCFG = OmegaConf.structured(ReasoningVocabConfig())


@pytest.fixture
def tok():
    return build_tiny_tokenizer()


def reference_span(ids: list[int], open_id: int, close_id: int, initial: bool = False) -> list[bool]:
    state, out = initial, []
    for t in ids:
        state = True if t == open_id else False if t == close_id else state
        out.append(state)
    return out


# ------------------------------------------------------------------------------------------------- span
def test_span_state_matches_a_sequential_scan():
    vocab = ReasoningVocab(4, 20, [5, 6, 7, 8], "<think>", "</think>", open_id=3, close_id=4)
    g = th.Generator().manual_seed(0)
    ids = th.randint(0, 8, (16, 40), generator=g)
    initial = th.rand(16, generator=g) > 0.5
    inside = vocab.span_state(ids, initial)
    for b in range(16):
        assert inside[b].tolist() == reference_span(ids[b].tolist(), 3, 4, bool(initial[b]))


def test_processor_step_updates_equal_a_full_rescan():
    vocab = ReasoningVocab(4, 20, [5, 6, 7, 8], "<think>", "</think>", open_id=3, close_id=4)
    ids = th.randint(0, 8, (6, 30), generator=th.Generator().manual_seed(1))
    proc = ReasoningMaskProcessor(vocab)
    for t in range(10, 31):
        scores = proc(ids[:, :t], th.zeros(6, 24))
        expected_inside = vocab.span_state(ids[:, :t])[:, -1]
        assert th.equal(proc.inside, expected_inside)
        assert th.isinf(scores[~expected_inside, 20:]).all() and (scores[expected_inside, 20:] == 0).all()
        assert (scores[:, :20] == 0).all()


# ------------------------------------------------------------------------------------------ construction
@pytest.mark.parametrize("tied", [True, False])
def test_extend_copies_rows_and_keeps_standard_logits(tok, tied):
    model = tiny_llama(tok, tied)
    ids = th.tensor([tok("What is 2+3?").input_ids])
    before = model(ids).logits
    vocab = extend_model(model, tok, 10, RCFG)
    v = vocab.standard_size
    assert v == len(tok) and model.get_input_embeddings().weight.shape[0] == v + 10
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert th.equal(emb[v:], emb[vocab.source_ids]) and th.equal(head[v:], head[vocab.source_ids])
    assert (head is emb) == tied
    after = model(ids).logits
    th.testing.assert_close(after[..., :v], before)
    th.testing.assert_close(after[..., v:], before[..., vocab.source_ids])  # copies score like their sources


def test_sources_skip_specials_and_tags(tok):
    model = tiny_llama(tok, True)
    vocab = extend_model(model, tok, 30, RCFG)
    forbidden = set(tok.all_special_ids) | {vocab.open_id, vocab.close_id, tok.eos_token_id, tok.pad_token_id}
    assert not forbidden & set(vocab.source_ids)
    assert vocab.source_ids == sorted(vocab.source_ids) and len(set(vocab.source_ids)) == 30


def test_n_beyond_standard_vocab_needs_repeat_policy(tok):
    model = tiny_llama(tok, True)
    with pytest.raises(ConfigError, match="model.reasoning.repeat_policy"):
        choose_source_ids(len(tok) + 5, tok, model)
    ids = choose_source_ids(len(tok) + 5, tok, model, repeat_policy="cycle")
    assert len(ids) == len(tok) + 5 and ids[0] == ids[len(set(ids))]


def test_frequent_init_ranks_by_corpus_counts(tok):
    model = tiny_llama(tok, True)
    ids = choose_source_ids(5, tok, model, init="frequent", corpus_texts=["zzzz yyy x", "zz"])
    # z: 6, y: 3, space: 2, x: 1, then the lowest unseen eligible id
    assert ids[:4] == tok.convert_tokens_to_ids(["z", "y", " ", "x"])
    assert ids[4] == choose_source_ids(1, tok, model)[0]


def test_missing_tags_are_added_as_tokens_that_every_decode_keeps(tok):
    model = tiny_llama(tok, False)
    n_before = len(tok)
    tags = add_tag_tokens(tok, model, "<reason>", "</reason>")
    vocab = extend_model(model, tok, 4, RCFG, tags)
    assert len(tok) == n_before + 2 and vocab.standard_size == n_before + 2
    assert tok.convert_ids_to_tokens([vocab.open_id, vocab.close_id]) == ["<reason>", "</reason>"]
    assert tok.decode(tok("<reason>1</reason>").input_ids, skip_special_tokens=True) == "<reason>1</reason>"


def test_extend_after_real_from_pretrained(tok, tmp_path):
    """Upstream crashed here (resize on meta tensors): extend a model loaded with from_pretrained."""
    tiny_llama(tok, tied=False).save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    vocab = extend_model(model, tok, 8, RCFG)
    assert model.get_output_embeddings().weight.shape[0] == vocab.standard_size + 8
    assert not any(p.is_meta for p in model.parameters())


# ------------------------------------------------------------------------------------------ masked log-probs
def naive_masked_logprobs(hidden, weight, labels, inside, v, temperature):
    logits = (hidden @ weight.T).float() / temperature
    logits[:, v:] = th.where(inside[:, None], logits[:, v:], float("-inf"))
    logp = logits.log_softmax(-1)
    ent = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)
    return logp.gather(-1, labels[:, None]).squeeze(-1), ent


def test_chunked_masked_logprobs_match_naive_values_and_gradients():
    g = th.Generator().manual_seed(0)
    v, n, d, t = 30, 10, 8, 37
    hidden = th.randn(t, d, generator=g, dtype=th.float64, requires_grad=True)
    weight = th.randn(v + n, d, generator=g, dtype=th.float64, requires_grad=True)
    inside = th.rand(t, generator=g) > 0.5
    labels = th.where(inside, th.randint(0, v + n, (t,), generator=g), th.randint(0, v, (t,), generator=g))
    ours, ent = masked_token_logprobs(
        hidden, lambda h: h @ weight.T, labels, inside, v, 0.7, chunk_size=8, entropy=True
    )
    ref, ref_ent = naive_masked_logprobs(hidden, weight, labels, inside, v, 0.7)
    th.testing.assert_close(ours, ref.float(), rtol=1e-5, atol=1e-5)
    th.testing.assert_close(ent, ref_ent.float(), rtol=1e-4, atol=1e-4)  # ours runs in fp32
    g1 = th.autograd.grad(ours.sum() + ent.sum(), (hidden, weight))
    g2 = th.autograd.grad(ref.sum() + ref_ent.sum(), (hidden, weight))
    for a, b in zip(g1, g2, strict=True):
        th.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_head_equals_the_chunked_head(temperature):
    """A plain nn.Linear head takes TRL's fused kernel; any other head the checkpointed chunks: same numbers."""
    g = th.Generator().manual_seed(0)
    v, n, d, t = 50, 20, 16, 61
    hidden = th.randn(t, d, generator=g, requires_grad=True)
    head = th.nn.Linear(d, v + n, bias=True)
    inside = th.rand(t, generator=g) > 0.4
    labels = th.where(inside, th.randint(0, v + n, (t,), generator=g), th.randint(0, v, (t,), generator=g))
    fused, fused_ent = masked_token_logprobs(hidden, head, labels, inside, v, temperature, entropy=True)
    chunked, chunked_ent = masked_token_logprobs(hidden, lambda h: head(h), labels, inside, v, temperature, 16, True)
    th.testing.assert_close(fused, chunked, rtol=1e-5, atol=1e-5)
    th.testing.assert_close(fused_ent, chunked_ent, rtol=1e-4, atol=1e-4)
    g1 = th.autograd.grad(fused.sum(), (hidden, head.weight, head.bias))
    g2 = th.autograd.grad(chunked.sum(), (hidden, head.weight, head.bias))
    for a, b in zip(g1, g2, strict=True):
        th.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_fused_head_all_inside_and_all_outside():
    hidden, head = th.randn(4, 8), th.nn.Linear(8, 12, bias=False)
    labels = th.tensor([1, 11, 2, 3])
    all_in, _ = masked_token_logprobs(hidden, head, labels, th.ones(4, dtype=th.bool), 10)
    all_out, _ = masked_token_logprobs(hidden, head, labels, th.zeros(4, dtype=th.bool), 10)
    assert th.isfinite(all_in).all()
    assert th.isinf(all_out[1]) and th.isfinite(all_out[[0, 2, 3]]).all()


# ------------------------------------------------------------------------------------ sampling == training
def boost_reasoning_rows(model, vocab, scale=3.0):
    """Make reasoning ids likely wherever they are allowed (so the mask is what keeps them out)."""
    with th.no_grad():
        head = model.get_output_embeddings().weight
        head[vocab.standard_size :] *= scale
        head[vocab.standard_size :] += 0.5 * head[vocab.standard_size :].sign()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generation_logprobs_equal_training_logprobs(tok, tmp_path, temperature):
    model = tiny_llama(tok, tied=False, seed=3)
    vocab = extend_model(model, tok, 12, RCFG)
    trainer = make_trainer(
        model, tok, vocab, tmp_path, temperature=temperature, generation_backend="trl", max_completion_length=16
    )
    prompt = prepare_tokenizer(tok, OmegaConf.create({"chat_template": None}))(
        [
            "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n<think>",
            "<|im_start|>user\n2+2<|im_end|>\n<|im_start|>assistant\n",
        ],
        return_tensors="pt",
        padding=True,
    )
    th.manual_seed(0)
    out = model.generate(
        **prompt,
        do_sample=True,
        temperature=temperature,
        top_p=1.0,
        top_k=0,
        max_new_tokens=24,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=tok.pad_token_id,
    )
    completion = out.sequences[:, prompt.input_ids.shape[1] :]
    gen_logps = th.stack(
        [s.log_softmax(-1).gather(-1, completion[:, i : i + 1]).squeeze(-1) for i, s in enumerate(out.scores)], 1
    )
    # score up to and including the first EOS, as TRL does
    is_eos = completion == tok.eos_token_id
    after_eos = (is_eos.cumsum(1) - is_eos.int()) > 0
    completion_mask = (~after_eos).int()
    attention = th.cat([prompt.attention_mask, completion_mask], 1)
    train_logps, entropies, _ = trainer._get_per_token_logps_and_entropies(
        trainer.model, out.sequences, attention, completion.shape[1], compute_entropy=True
    )
    keep = completion_mask.bool()
    assert keep.sum() >= 10 and th.isfinite(gen_logps[keep]).all()
    th.testing.assert_close(train_logps[keep], gen_logps[keep], rtol=1e-4, atol=1e-4)
    # the first prompt starts inside the span: reasoning ids appear in the sample
    assert (completion >= vocab.standard_size).any()


def test_mask_holds_in_sampling_and_generation_terminates(tok):
    model = tiny_llama(tok, tied=True, seed=5)
    vocab = extend_model(model, tok, 40, RCFG)
    boost_reasoning_rows(model, vocab)
    prompts = tok(
        ["<|im_start|>assistant\n"] * 16 + ["<|im_start|>assistant\n<think>"] * 16, return_tensors="pt", padding=True
    )
    th.manual_seed(1)
    seqs = model.generate(**prompts, do_sample=True, max_new_tokens=40, pad_token_id=tok.pad_token_id)
    inside = vocab.span_state(seqs)[:, :-1]
    nxt = seqs[:, 1:]
    is_reasoning = nxt >= vocab.standard_size
    assert not (is_reasoning & ~inside).any(), "a reasoning id was sampled outside the thinking span"
    assert is_reasoning[16:].any(), "reasoning ids never sampled inside the span"
    assert tok.eos_token_id not in vocab.source_ids


# ----------------------------------------------------------------------------------------------- decoding
def test_decode_maps_reasoning_ids_to_sources_and_renders_them(tok):
    model = tiny_llama(tok, tied=True)
    vocab = extend_model(model, tok, 90, RCFG)
    text_ids = tok("<think>ab</think>\\boxed{7}", add_special_tokens=False).input_ids
    r = vocab.standard_size + vocab.source_ids.index(tok.convert_tokens_to_ids("a"))
    ids = [text_ids[0], r] + text_ids[2:]
    assert vocab.decode(tok, ids) == "<think>ab</think>\\boxed{7}"  # the tags are text, not special tokens
    assert "⟦a⟧" in vocab.render(tok, ids) and "⟦b⟧" not in vocab.render(tok, ids)


def test_added_tokens_are_not_reasoning_ids(tok):
    """The offset is the model's row count, not tokenizer.vocab_size (which excludes added tokens)."""
    model = tiny_llama(tok, tied=True)
    vocab = extend_model(model, tok, 4, RCFG, add_tag_tokens(tok, model, "<reason>", "</reason>"))
    assert vocab.open_id >= tok.vocab_size
    assert not vocab.is_reasoning(th.tensor([vocab.open_id, vocab.close_id])).any()
    assert vocab.decode(tok, [vocab.open_id], skip_special_tokens=False) == "<reason>"


# --------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_restores_n_and_logits(tok, tmp_path):
    model = tiny_llama(tok, tied=False, seed=7)
    vocab = extend_model(model, tok, 9, RCFG)
    trainer = make_trainer(model, tok, vocab, tmp_path, generation_backend="trl")
    trainer.save_model(str(tmp_path / "final"))
    saved = json.loads((tmp_path / "final" / "reasoning_vocab.json").read_text())
    assert saved["size"] == 9 and saved["standard_size"] == vocab.standard_size
    assert saved["source_ids"] == vocab.source_ids and saved["think_open"] == "<think>"

    from rlvr_vocab import load_checkpoint as top_level_load

    assert top_level_load is load_checkpoint
    loaded, loaded_tok = load_checkpoint(tmp_path / "final")
    assert loaded.reasoning_vocab == vocab and len(loaded_tok) == len(tok)
    ids = th.tensor([tok("<think>1+1").input_ids])
    th.testing.assert_close(loaded(ids).logits, model(ids).logits)
    # the loaded model's generate applies the mask too
    seqs = loaded.generate(ids, do_sample=True, max_new_tokens=10, pad_token_id=tok.pad_token_id)
    assert not ((seqs[:, 1:] >= vocab.standard_size) & ~vocab.span_state(seqs)[:, :-1]).any()
