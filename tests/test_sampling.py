"""The fast sampler: same tokens as transformers when greedy, same distribution as TRL when sampling, TRL's EOS
cut, the reasoning mask, compaction of finished rows, the typed plan, the Triton decode kernel against the eager
maths, an end-to-end GRPO run. Runs on the CPU (eager decode; the Triton kernel under Triton's interpreter where
Triton is installed); the same tests run on CUDA (CUDA-graph decode) where a GPU is present."""

from __future__ import annotations

import math

import pytest
import torch as th
from conftest import make_trainer, tiny_llama
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, GenerationConfig, LogitsProcessorList

from rlvr_vocab.config import ReasoningVocabConfig
from rlvr_vocab.models import build_tiny_model, build_tiny_tokenizer
from rlvr_vocab.reasoning_vocab import ReasoningMaskProcessor, extend_model
from rlvr_vocab.sampling import (
    BlockAt,
    BlockBefore,
    FastSampler,
    ReasoningSpan,
    RepetitionPenalty,
    Warper,
    build_plan,
)
from rlvr_vocab.sampling import sampler as sampler_module
from rlvr_vocab.sampling.attention import decode_mask, eager_decode_attention

TINY = OmegaConf.create(
    {
        "tiny": dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            tie_word_embeddings=True,
        )
    }
)
DEVICES = ["cpu"] + (["cuda"] if th.cuda.is_available() else [])
PROMPTS = [
    "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n",
    "hi",
    "<|im_start|>user\nWhat is 12*3?<|im_end|>\n<|im_start|>assistant\n<think>",
    "abc def",
]


@pytest.fixture(autouse=True)
def no_compile(monkeypatch):
    """CUDA runs of these tests use CUDA graphs without torch.compile (seconds, not minutes); one test compiles."""
    monkeypatch.setattr(sampler_module, "COMPILE", False)


@pytest.fixture
def tok():
    t = build_tiny_tokenizer()
    t.padding_side = "left"
    return t


def tiny_qwen3(tok, device="cpu", seed=0):
    return build_tiny_model(TINY, tok, th.float32, seed).to(device).eval()


def boost(model, ids, scale=4.0):
    """Make the given output rows likely (so masks and EOS are exercised by a random model)."""
    with th.no_grad():
        head = model.get_output_embeddings().weight
        head[ids] = head[ids] * scale + 0.5 * head[ids].sign()


def batch(tok, prompts, device):
    return tok(prompts, return_tensors="pt", padding=True).to(device)


class Recorder:
    """custom_generate that records what transformers prepared, then runs the fast sampler."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.processors = None

    def __call__(self, model, input_ids, logits_processor, stopping_criteria, generation_config, **model_kwargs):
        self.processors = logits_processor
        return self.sampler(model, input_ids, logits_processor, stopping_criteria, generation_config, **model_kwargs)


# ----------------------------------------------------------------------------------------------- greedy
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", [4, 128])
@pytest.mark.parametrize(
    "extra",
    [{}, {"repetition_penalty": 1.3, "min_new_tokens": 12, "suppress_tokens": [20, 21]}],
    ids=["plain", "processors"],
)
def test_greedy_matches_transformers_generate(tok, device, window, extra):
    model = tiny_qwen3(tok, device)
    boost(model, [tok.eos_token_id], 2.0)
    inputs = batch(tok, PROMPTS, device)
    kwargs = dict(do_sample=False, max_new_tokens=40, pad_token_id=tok.pad_token_id, **extra)
    ref = model.generate(**inputs, **kwargs)
    sampler = FastSampler(window=window)  # small windows: many window switches in 40 tokens
    out = model.generate(**inputs, **kwargs, custom_generate=sampler)
    assert sampler.last_used_fast_path
    n = min(ref.shape[1], out.shape[1])
    assert th.equal(out[:, :n], ref[:, :n])
    assert (out[:, n:] == tok.pad_token_id).all() and (ref[:, n:] == tok.pad_token_id).all()


def test_temperature_near_zero_is_greedy(tok):
    model = tiny_qwen3(tok)
    inputs = batch(tok, PROMPTS, "cpu")
    common = dict(max_new_tokens=24, pad_token_id=tok.pad_token_id, custom_generate=FastSampler())
    greedy = model.generate(**inputs, do_sample=False, **common)
    cold = model.generate(**inputs, do_sample=True, temperature=1e-4, top_k=0, **common)
    assert th.equal(greedy, cold)


def test_unsupported_processor_falls_back_to_transformers(tok):
    model = tiny_qwen3(tok)
    inputs = batch(tok, PROMPTS, "cpu")
    kwargs = dict(do_sample=False, max_new_tokens=24, pad_token_id=tok.pad_token_id, no_repeat_ngram_size=2)
    ref = model.generate(**inputs, **kwargs)
    sampler = FastSampler()
    out = model.generate(**inputs, **kwargs, custom_generate=sampler)
    assert not sampler.last_used_fast_path and sampler.stats["fallbacks"] == 1
    assert th.equal(out, ref)


def test_unsupported_model_falls_back_to_transformers(tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    th.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    model = GPT2LMHeadModel(config).eval()
    inputs = batch(tok, PROMPTS, "cpu")
    kwargs = dict(do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id)
    ref = model.generate(**inputs, **kwargs)
    sampler = FastSampler()
    out = model.generate(**inputs, **kwargs, custom_generate=sampler)
    assert "gpt2" in sampler_module.unsupported_model(model)
    assert not sampler.last_used_fast_path and sampler.stats["fallbacks"] == 1
    assert th.equal(out, ref)


def test_bad_sampler_settings_are_refused():
    with pytest.raises(ValueError, match="attention='flash'"):
        FastSampler(attention="flash")
    with pytest.raises(ValueError, match="min_rows"):
        FastSampler(min_rows=0)
    with pytest.raises(ValueError, match="prefill='graphed'.*compiled"):
        FastSampler(prefill="graphed")


def test_the_compiled_prefill_samples_the_same_and_compiles_once(tok):
    """``prefill="compiled"`` (CPU inductor here): the eager prefill's greedy tokens, and one compilation for every
    batch size and prompt length (both dynamic); the model's first call (it allocates the cache, and later sessions'
    caches are made in its layout) and a one-row batch stay eager."""
    from torch._dynamo.utils import counters

    model = tiny_qwen3(tok, seed=1)
    kwargs = dict(do_sample=False, max_new_tokens=4, pad_token_id=tok.pad_token_id, repetition_penalty=1.3)
    calls = [PROMPTS, [p + " x y z" for p in PROMPTS[:3]], PROMPTS[1:3]]  # 4, 3, 2 rows; three prompt lengths
    eager, compiled = FastSampler(), FastSampler(prefill="compiled")  # the default: eager
    frames = None
    for prompts in calls:
        inputs = batch(tok, prompts, "cpu")
        ref = model.generate(**inputs, **kwargs, custom_generate=eager)
        assert eager.last_paths["prefill"] == "eager"
        for expected in ("eager", "compiled") if prompts is PROMPTS else ("compiled",) * 2:  # a new session each batch
            out = model.generate(**inputs, **kwargs, custom_generate=compiled)
            assert compiled.last_paths["prefill"] == expected
            assert th.equal(out, ref) and compiled.stats["failures"] == 0
        frames = counters["frames"]["ok"] if frames is None else frames
        assert counters["frames"]["ok"] == frames, "the prefill compiled again for a new batch size or length"
    assert compiled.stats["compiles"] == 1
    for _ in range(2):
        model.generate(**batch(tok, PROMPTS[:1], "cpu"), **kwargs, custom_generate=compiled)
        assert compiled.last_paths["prefill"] == "eager"


# ------------------------------------------------------------------------------------ same distribution
@pytest.mark.parametrize("device", DEVICES)
def test_processed_logprobs_equal_transformers_processors(tok, device):
    """Per token, the sampler's processed log-prob equals transformers' processors replayed on the sequence."""
    model = tiny_qwen3(tok, device, seed=1)
    vocab = extend_model(model, tok, 16, OmegaConf.structured(ReasoningVocabConfig()))
    inputs = batch(tok, PROMPTS, device)
    rec = Recorder(FastSampler(reasoning_vocab=vocab))
    # On CUDA the reference forward (SDPA) and the sampler's decode attention round differently (~1e-6), which
    # can move a token across a top-p / min-p threshold: the threshold warpers are checked on the CPU only.
    cutoffs = dict(top_k=30, top_p=0.95, min_p=0.02) if device == "cpu" else {}
    th.manual_seed(0)
    out = model.generate(
        **inputs,
        do_sample=True,
        temperature=0.7,
        **cutoffs,
        repetition_penalty=1.2,
        min_new_tokens=6,
        max_new_tokens=20,
        pad_token_id=tok.pad_token_id,
        custom_generate=rec,
    )
    assert rec.sampler.last_used_fast_path
    names = [type(p).__name__ for p in rec.processors]
    assert "ReasoningMaskProcessor" in names and "RepetitionPenaltyLogitsProcessor" in names
    assert device != "cpu" or {"TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper"} <= set(names)
    p = inputs.input_ids.shape[1]
    got = rec.sampler.last_logprobs
    mask = inputs.attention_mask
    eos = out[:, p:] == tok.eos_token_id
    alive = (eos.cumsum(1) - eos.int()) == 0  # up to and including the first EOS (later tokens are padding)
    for t in range(out.shape[1] - p):
        ids = out[:, : p + t]
        attn = th.cat([mask, th.ones(len(ids), t, dtype=mask.dtype, device=device)], 1)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        with th.no_grad():
            logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, -1].float()
        scores = rec.processors(ids, logits)
        want = scores.log_softmax(-1).gather(1, out[:, p + t, None]).squeeze(1)
        bad = ~th.isfinite(want) & alive[:, t]
        assert not bad.any(), (
            f"step {t}: rows {bad.nonzero().flatten().tolist()} drew {out[bad, p + t].tolist()} "
            f"(reasoning ids from {vocab.standard_size}, open {vocab.open_id}, close {vocab.close_id}); "
            f"span state {vocab.span_state(ids)[bad, -1].tolist()}, raw logit {logits[bad].gather(1, out[bad, p + t, None]).tolist()}, "
            f"processed {scores[bad].gather(1, out[bad, p + t, None]).tolist()}"
        )
        th.testing.assert_close(got[alive[:, t], t], want[alive[:, t]], rtol=1e-4, atol=1e-4)


def test_first_token_frequencies_follow_the_processed_softmax(tok):
    """Chi-square test of 6,000 draws of the first token against softmax(processed logits)."""
    model = tiny_qwen3(tok, seed=2)
    prompt = "<|im_start|>user\n7-2?<|im_end|>\n<|im_start|>assistant\n"
    n = 6000
    inputs = batch(tok, [prompt] * n, "cpu")
    rec = Recorder(FastSampler())
    th.manual_seed(0)
    kwargs = dict(do_sample=True, temperature=0.8, top_k=12, max_new_tokens=1, pad_token_id=tok.pad_token_id)
    out = model.generate(**inputs, **kwargs, custom_generate=rec)
    with th.no_grad():
        logits = model(**batch(tok, [prompt], "cpu")).logits[:, -1].float()
    probs = rec.processors(inputs.input_ids[:1], logits).softmax(-1)[0]
    counts = th.bincount(out[:, -1], minlength=probs.numel()).double()
    support = probs > 0
    assert counts[~support].sum() == 0, "a token outside top-k was drawn"
    expected = probs[support].double() * n
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    dof = int(support.sum()) - 1
    assert chi2 < dof + 6 * math.sqrt(2 * dof), f"chi2={chi2:.1f} with {dof} degrees of freedom"


# ----------------------------------------------------------------------------------- through the trainer
def prompt_ids(tok, k=8):
    texts = [PROMPTS[i % len(PROMPTS)] + "x" * (i % 3) for i in range(k)]
    return [tok(t).input_ids for t in texts]


def test_eos_cut_and_padding_identical_to_trl(tok, tmp_path):
    from trl import GRPOTrainer

    model = tiny_llama(tok, seed=5)  # greedy: two of the eight prompts end early (EOS), six run to the limit
    trainer = make_trainer(model, tok, None, tmp_path, generation_kwargs={"do_sample": False})
    ids = prompt_ids(tok)
    ours, logps = trainer._generate_single_turn(ids, None, {}, trainer.num_generations)
    theirs, _ = GRPOTrainer._generate_single_turn(trainer, ids, None, {}, trainer.num_generations)
    assert trainer.fast_sampler.last_used_fast_path and logps is None
    assert ours == theirs
    ended = [c for c in ours if c and c[-1] == tok.eos_token_id]
    assert 0 < len(ended) < len(ours), "want some completions that stop early and some that run to the limit"


def test_sampled_completions_stop_at_first_eos(tok, tmp_path):
    model = tiny_llama(tok, seed=4)
    boost(model, [tok.eos_token_id], 2.5)
    trainer = make_trainer(model, tok, None, tmp_path)
    th.manual_seed(0)
    completions, _ = trainer._generate_single_turn(prompt_ids(tok, 16), None, {}, trainer.num_generations)
    eos = tok.eos_token_id
    for c in completions:
        assert eos not in c[:-1]
        assert c[-1] == eos or len(c) == 24
    assert any(c[-1] == eos for c in completions)


@pytest.mark.parametrize("n_reasoning", [0, 12])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_equal_training_logprobs(tok, tmp_path, n_reasoning, temperature):
    model = tiny_llama(tok, seed=3)
    vocab = (
        extend_model(model, tok, n_reasoning, OmegaConf.structured(ReasoningVocabConfig())) if n_reasoning else None
    )
    trainer = make_trainer(model, tok, vocab, tmp_path, temperature=temperature)
    ids = prompt_ids(tok, 6)
    th.manual_seed(0)
    completions, _ = trainer._generate_single_turn(ids, None, {}, trainer.num_generations)
    gen_logps = trainer.fast_sampler.last_logprobs
    # rebuild TRL's batch: left-padded prompts, right-padded completions with a mask up to the first EOS
    p = max(len(x) for x in ids)
    c = max(len(x) for x in completions)
    seqs = th.full((len(ids), p + c), tok.pad_token_id)
    attn = th.zeros_like(seqs)
    for i, (pi, ci) in enumerate(zip(ids, completions, strict=True)):
        seqs[i, p - len(pi) : p + len(ci)] = th.tensor(pi + ci)
        attn[i, p - len(pi) : p + len(ci)] = 1
    train_logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, seqs, attn, c)
    keep = attn[:, p:].bool()
    assert keep.sum() >= 20
    th.testing.assert_close(train_logps[keep], gen_logps[:, :c][keep], rtol=1e-4, atol=1e-4)
    if vocab is not None:
        assert any(t >= vocab.standard_size for x in completions for t in x), (
            "prompts open <think>: want reasoning ids"
        )


# ------------------------------------------------------------------------------------------ reasoning mask
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("patched_generate", [True, False])
def test_reasoning_mask_holds(tok, device, patched_generate):
    model = tiny_llama(tok, seed=5, tied=True)
    vocab = extend_model(model, tok, 40, OmegaConf.structured(ReasoningVocabConfig()))
    boost(model, list(range(vocab.standard_size, vocab.standard_size + vocab.size)), 3.0)
    boost(model, [vocab.open_id, vocab.close_id], 2.0)  # tags appear mid-completion: the state must follow them
    model = model.to(device)
    if not patched_generate:  # the sampler must apply the mask itself
        del model.generate
    prompts = ["<|im_start|>assistant\n"] * 24 + ["<|im_start|>assistant\n<think>"] * 24
    inputs = batch(tok, prompts, device)
    sampler = FastSampler(reasoning_vocab=vocab)
    th.manual_seed(1)
    seqs = model.generate(
        **inputs, do_sample=True, max_new_tokens=48, pad_token_id=tok.pad_token_id, custom_generate=sampler
    )
    assert sampler.last_used_fast_path
    p = inputs.input_ids.shape[1]
    inside = vocab.span_state(seqs)[:, p - 1 : -1]
    nxt = seqs[:, p:]
    is_reasoning = nxt >= vocab.standard_size
    assert not (is_reasoning & ~inside).any(), "a reasoning id was sampled outside the thinking span"
    assert is_reasoning[24:].any(), "reasoning ids never sampled inside the span"
    assert (nxt == vocab.close_id).any() and (nxt == vocab.open_id).any()


def test_reasoning_mask_holds_on_the_compacted_path(tok):
    """Rows end at spread lengths (the bench hook), the batch is compacted three times, the mask still holds."""
    model = tiny_llama(tok, seed=5, tied=True)
    vocab = extend_model(model, tok, 40, OmegaConf.structured(ReasoningVocabConfig()))
    boost(model, list(range(vocab.standard_size, vocab.standard_size + vocab.size)), 3.0)
    boost(model, [vocab.open_id, vocab.close_id], 2.0)
    prompts = ["<|im_start|>assistant\n"] * 16 + ["<|im_start|>assistant\n<think>"] * 16
    inputs = batch(tok, prompts, "cpu")
    ends = th.tensor([3 + (7 * i) % 29 for i in range(32)])  # token index of each row's EOS: 3..31
    sampler = FastSampler(reasoning_vocab=vocab, min_rows=1, stop_check_every=4, force_eos_at=ends)
    th.manual_seed(1)
    seqs = model.generate(
        **inputs, do_sample=True, max_new_tokens=40, pad_token_id=tok.pad_token_id, custom_generate=sampler
    )
    assert sampler.last_used_fast_path and sampler.stats["compactions"] >= 3
    p = inputs.input_ids.shape[1]
    nxt = seqs[:, p:]
    alive = (nxt == tok.eos_token_id).cumsum(1) - (nxt == tok.eos_token_id).int() == 0
    inside = vocab.span_state(seqs)[:, p - 1 : -1]
    is_reasoning = nxt >= vocab.standard_size
    assert not (is_reasoning & ~inside & alive).any(), "a reasoning id was sampled outside the thinking span"
    assert is_reasoning[16:].any(), "reasoning ids never sampled inside the span"
    first_eos = th.where(nxt == tok.eos_token_id, th.arange(nxt.shape[1]), 10**6).min(1).values
    assert (first_eos <= ends).all() and (first_eos == ends).sum() >= 24, "EOS not forced at the given lengths"


# ------------------------------------------------------------------------------------------ compaction
def sample_with(model, inputs, tok, **sampler_kwargs):
    sampler = FastSampler(**sampler_kwargs)
    th.manual_seed(3)
    out = model.generate(
        **inputs,
        do_sample=True,
        temperature=0.9,
        top_k=40,
        repetition_penalty=1.2,
        max_new_tokens=36,
        pad_token_id=tok.pad_token_id,
        custom_generate=sampler,
    )
    return out, sampler


def test_compaction_samples_the_same_tokens(tok):
    """Compaction on and off, same seed: the same tokens (the noise is drawn per original row) and log-probs (to
    rounding: a matmul over fewer rows may round differently)."""
    model = tiny_qwen3(tok, seed=1)
    boost(model, [tok.eos_token_id], 0.5)  # completions end at lengths from 1 to 25 by themselves
    inputs = batch(tok, [PROMPTS[i % 4] + " x" * (i % 5) for i in range(24)], "cpu")
    plain, off = sample_with(model, inputs, tok, compaction=False, stop_check_every=2)
    compacted, on = sample_with(model, inputs, tok, compaction=True, min_rows=1, stop_check_every=2)
    assert off.stats["compactions"] == 0 and on.stats["compactions"] >= 3
    lengths = (plain[:, inputs.input_ids.shape[1] :] != tok.pad_token_id).sum(1)
    assert lengths.min() < 6 and lengths.max() > 20, "want completions that end early and late"
    assert th.equal(compacted, plain)
    th.testing.assert_close(on.last_logprobs, off.last_logprobs, rtol=1e-5, atol=1e-5)
    assert on.stats["steps"] == off.stats["steps"]
    assert on.stats["row_steps"] < 0.5 * off.stats["row_steps"], "finished rows kept costing"


def test_force_eos_hook_ends_rows_and_is_checked(tok):
    model = tiny_qwen3(tok)
    inputs = batch(tok, PROMPTS, "cpu")
    kwargs = dict(do_sample=False, max_new_tokens=20, pad_token_id=tok.pad_token_id)
    ends = th.tensor([0, 5, 19, -1])
    sampler = FastSampler(force_eos_at=ends, min_rows=1, stop_check_every=2)
    out = model.generate(**inputs, **kwargs, custom_generate=sampler)[:, inputs.input_ids.shape[1] :]
    free = model.generate(**inputs, **kwargs)[:, inputs.input_ids.shape[1] :]
    for row, end in enumerate(ends.tolist()):
        if end < 0:
            assert th.equal(out[row], free[row][: out.shape[1]])
        else:
            assert out[row, end] == tok.eos_token_id and th.equal(out[row, :end], free[row, :end])
            assert (out[row, end + 1 :] == tok.pad_token_id).all()
    sampler.force_eos_at = th.tensor([1, 2])
    with pytest.raises(ValueError, match="force_eos_at"):
        model.generate(**inputs, **kwargs, custom_generate=sampler)


@pytest.mark.slow
def test_compiled_decode_serves_every_batch_size_and_window(tok):
    """torch.compile (CPU inductor here): the same tokens, and no recompilation per batch size or window."""
    from torch._dynamo.utils import counters

    model = tiny_qwen3(tok, seed=1)
    boost(model, [tok.eos_token_id], 0.5)
    inputs = batch(tok, [PROMPTS[i % 4] + " x" * (i % 5) for i in range(24)], "cpu")
    plain, _ = sample_with(model, inputs, tok, compaction=False, stop_check_every=2)
    frames = counters["frames"]["ok"]
    settings = dict(compile=True, min_rows=2, stop_check_every=2, window=4)  # sizes 24, 8, 4, 2; ~10 windows
    compacted, on = sample_with(model, inputs, tok, **settings)
    assert on.stats["compactions"] >= 2 and on.stats["failures"] == 0 and not on._compile_failed
    assert th.equal(compacted, plain)
    assert counters["frames"]["ok"] - frames == 2, "one compilation of the forward and one of the pick"
    again, _ = sample_with(model, batch(tok, PROMPTS * 4, "cpu"), tok, **settings)  # other batch and length
    assert counters["frames"]["ok"] - frames == 2


# ------------------------------------------------------------------------------------------ the plan
def prepared(model, inputs, **kwargs):
    """What transformers hands a custom_generate: (processors, criteria, config)."""
    seen = {}

    def capture(model, input_ids, logits_processor, stopping_criteria, generation_config, **model_kwargs):
        seen.update(lp=logits_processor, sc=stopping_criteria, gc=generation_config)
        return input_ids

    model.generate(**inputs, custom_generate=capture, **kwargs)
    return seen["lp"], seen["sc"], seen["gc"]


def test_build_plan_gives_typed_steps_in_transformers_order(tok):
    model = tiny_qwen3(tok)
    vocab = extend_model(model, tok, 8, OmegaConf.structured(ReasoningVocabConfig()))
    inputs = batch(tok, PROMPTS, "cpu")
    p = inputs.input_ids.shape[1]
    common = dict(
        do_sample=True,
        temperature=0.7,
        top_k=5,
        repetition_penalty=1.3,
        suppress_tokens=[20],
        begin_suppress_tokens=[21],
        max_new_tokens=9,
        pad_token_id=tok.pad_token_id,
    )
    lp, sc, gc = prepared(model, inputs, min_new_tokens=4, **common)
    plan, reason = build_plan(lp, sc, gc, p)
    assert reason is None
    kinds = {
        "RepetitionPenaltyLogitsProcessor": RepetitionPenalty,
        "MinLengthLogitsProcessor": BlockBefore,
        "MinNewTokensLengthLogitsProcessor": BlockBefore,
        "SuppressTokensLogitsProcessor": BlockBefore,
        "SuppressTokensAtBeginLogitsProcessor": BlockAt,
        "ReasoningMaskProcessor": ReasoningSpan,
        "TemperatureLogitsWarper": Warper,
        "TopKLogitsWarper": Warper,
    }
    assert [type(s) for s in plan.steps] == [kinds[type(x).__name__] for x in lp]
    by_type = {type(x).__name__: s for x, s in zip(lp, plan.steps, strict=True)}
    assert by_type["RepetitionPenaltyLogitsProcessor"].penalty == 1.3
    assert by_type["MinNewTokensLengthLogitsProcessor"] == BlockBefore(4, (tok.eos_token_id,))
    assert by_type["SuppressTokensAtBeginLogitsProcessor"] == BlockAt(0, (21,))
    assert by_type["ReasoningMaskProcessor"].vocab is vocab
    assert plan.max_length == p + 9 and plan.eos_ids == (tok.eos_token_id,) and not plan.greedy
    # per-call thresholds are device data, not part of what a graph bakes in
    other, _ = build_plan(*prepared(model, inputs, min_new_tokens=6, **common), p)
    assert other.signature() == plan.signature() and other.thresholds() != plan.thresholds()
    colder, _ = build_plan(*prepared(model, inputs, min_new_tokens=4, **{**common, "temperature": 0.5}), p)
    assert colder.signature() != plan.signature()


def test_build_plan_applies_the_mask_of_an_unpatched_model_and_names_what_it_cannot_replay(tok):
    model = tiny_qwen3(tok)
    vocab = extend_model(model, tok, 8, OmegaConf.structured(ReasoningVocabConfig()))
    del model.generate  # transformers adds no ReasoningMaskProcessor
    inputs = batch(tok, PROMPTS, "cpu")
    p = inputs.input_ids.shape[1]
    kwargs = dict(do_sample=True, temperature=0.7, max_new_tokens=5, pad_token_id=tok.pad_token_id)
    plan, _ = build_plan(*prepared(model, inputs, **kwargs), p, vocab=vocab)
    kinds = [type(s) for s in plan.steps]
    first_warper = kinds.index(Warper)
    assert kinds.count(ReasoningSpan) == 1 and kinds[first_warper - 1] is ReasoningSpan  # before the first warper
    mask = LogitsProcessorList([ReasoningMaskProcessor(vocab)])
    plan, _ = build_plan(*prepared(model, inputs, logits_processor=mask, **kwargs), p, vocab=vocab)
    assert sum(isinstance(s, ReasoningSpan) for s in plan.steps) == 1
    plan, reason = build_plan(*prepared(model, inputs, no_repeat_ngram_size=2, **kwargs), p)
    assert plan is None and reason == "logits processor NoRepeatNGramLogitsProcessor"
    gc = GenerationConfig(do_sample=False, num_beams=2, max_new_tokens=5)
    plan, reason = build_plan(LogitsProcessorList(), [], gc, p)
    assert plan is None and reason == "generation mode beam_search"


# ------------------------------------------------------------------------------------- decode attention
def naive_attention(query, keys, values, length, bias, scaling):
    """float64 softmax attention with repeat_kv: the definition the decode ops must match."""
    b, h, _, d = query.shape
    g = h // keys.shape[1]
    k = keys[:, :, :length].double().repeat_interleave(g, 1)
    v = values[:, :, :length].double().repeat_interleave(g, 1)
    scores = query.double() @ k.transpose(-1, -2) * scaling + bias[:, None, None, :length].double()
    return (scores.softmax(-1) @ v).transpose(1, 2)  # [B, 1, H, D]


def decode_inputs(b, kv_heads, group, head_dim, cache_len, length, dtype, device, seed=0):
    gen = th.Generator().manual_seed(seed)

    def rand(*shape):
        return th.randn(*shape, generator=gen).to(dtype=dtype, device=device)

    query = rand(b, 1, kv_heads * group, head_dim).transpose(1, 2)  # the layout transformers hands over
    key_new, value_new = (rand(b, 1, kv_heads, head_dim).transpose(1, 2) for _ in range(2))
    keys, values = rand(b, kv_heads, cache_len, head_dim), rand(b, kv_heads, cache_len, head_dim)
    bias = th.zeros(b, cache_len, device=device)
    for row in range(b):  # left padding: row r's first (5 r) % length slots are masked
        bias[row, : (5 * row) % (length - 1)] = float("-inf")
    return query, key_new, value_new, keys, values, th.tensor([length], device=device), bias


def relative_error(got, want):
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


@pytest.mark.parametrize("group", [1, 2, 8])
def test_eager_decode_attention_writes_the_slot_and_matches_the_definition(group):
    q, kn, vn, keys, values, length, bias = decode_inputs(3, 2, group, 16, 40, 29, th.float32, "cpu")
    before = keys.clone()
    out = eager_decode_attention(q, kn, vn, keys, values, length, decode_mask(bias, length, 32, 2, q.dtype), 0.25)
    assert th.equal(keys[:, :, 28], kn[:, :, 0]) and th.equal(values[:, :, 28], vn[:, :, 0])
    assert th.equal(keys[:, :, :28], before[:, :, :28]) and th.equal(keys[:, :, 29:], before[:, :, 29:])
    assert relative_error(out, naive_attention(q, keys, values, 29, bias, 0.25)) < 1e-5


TRITON_DEVICE = "cuda" if th.cuda.is_available() else "cpu"


def interpreted_triton(name, monkeypatch):
    """A Triton kernel module of the sampler, on CUDA, or under Triton's CPU interpreter (skipped without Triton)."""
    pytest.importorskip("triton")
    import importlib

    module = importlib.import_module(name if "." in name else f"rlvr_vocab.sampling.{name}")
    if TRITON_DEVICE == "cpu":
        if not module.interpreted():
            pytest.skip("Triton was imported without TRITON_INTERPRET=1 (conftest sets it when there is no GPU)")
        # Triton 3.6's interpreter turns a loaded scalar (a 1-element array) into a loop bound with
        # int(array), which NumPy >= 2.4 refuses; read the element instead.
        from triton.runtime import interpreter

        original = interpreter._patch_lang_tensor

        def patched(tensor, scope):
            original(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

        monkeypatch.setattr(interpreter, "_patch_lang_tensor", patched)
    return module


@pytest.fixture
def triton_decode(monkeypatch):
    """The Triton decode-attention kernels (``triton_decode``)."""
    return interpreted_triton("triton_decode", monkeypatch)


@pytest.mark.parametrize(
    "b, kv_heads, group, head_dim, cache_len, length, splits",
    [
        (2, 2, 2, 64, 300, 200, None),  # splits chosen by the kernel's rule
        (2, 2, 2, 64, 300, 200, 1),  # one split: the output written by the split kernel itself
        (3, 1, 8, 128, 200, 131, 3),  # GQA group 8, head_dim 128, length off the block
        (2, 4, 1, 64, 130, 65, 4),  # no grouping; one split gets no slot at all
        (2, 2, 3, 8, 70, 2, 2),  # group and head_dim padded up to tl.dot's 16; the first decode slot
    ],
)
def test_triton_decode_kernel_matches_the_eager_maths(
    triton_decode, b, kv_heads, group, head_dim, cache_len, length, splits
):
    q, kn, vn, keys, values, n, bias = decode_inputs(
        b, kv_heads, group, head_dim, cache_len, length, th.float32, TRITON_DEVICE
    )
    ref_keys, ref_values = keys.clone(), values.clone()
    got = triton_decode.decode_attention(q, kn, vn, keys, values, n, bias, head_dim**-0.5, splits)
    mask = decode_mask(bias, n, cache_len, kv_heads, q.dtype)
    want = eager_decode_attention(q, kn, vn, ref_keys, ref_values, n, mask, head_dim**-0.5)
    assert th.equal(keys, ref_keys) and th.equal(values, ref_values), "the K/V write differs"
    assert got.shape == (b, 1, kv_heads * group, head_dim) and got.is_contiguous()
    assert relative_error(got, want) < 1e-4
    assert relative_error(got, naive_attention(q, keys, values, length, bias, head_dim**-0.5)) < 1e-4


@pytest.mark.parametrize("splits", [1, 3])
def test_triton_decode_kernel_skips_the_left_padding(triton_decode, splits):
    """With ``start``, a row's left padding is never read: NaN there does not reach the output."""
    b, kv_heads, group, head_dim, cache_len, length = 3, 2, 2, 16, 96, 70
    q, kn, vn, keys, values, n, bias = decode_inputs(
        b, kv_heads, group, head_dim, cache_len, length, th.float32, TRITON_DEVICE
    )
    first = (bias == float("-inf")).sum(-1).to(th.int32)  # rows 0, 1, 2: 0, 5, 10 slots of padding
    assert first.tolist() == [0, 5, 10]
    ref_keys, ref_values = keys.clone(), values.clone()
    ref_keys[:, :, length - 1], ref_values[:, :, length - 1] = kn[:, :, 0], vn[:, :, 0]  # the kernel's write
    want = naive_attention(q, ref_keys, ref_values, length, bias, head_dim**-0.5)
    for row, pad in enumerate(first.tolist()):
        keys[row, :, :pad] = float("nan")
        values[row, :, :pad] = float("nan")
    got = triton_decode.decode_attention(q, kn, vn, keys, values, n, bias, head_dim**-0.5, splits, start=first)
    assert relative_error(got, want) < 1e-4
    unskipped = triton_decode.decode_attention(q, kn, vn, keys, values, n, bias, head_dim**-0.5, splits)
    assert unskipped[1:].isnan().any(), "without start the padding is read (the NaN check has no power)"


@pytest.mark.parametrize("dtype", [th.float16] + ([th.bfloat16] if th.cuda.is_available() else []))
def test_triton_decode_kernel_in_16_bits(triton_decode, dtype):
    """fp16 (and bf16 on CUDA: the interpreter's bf16 dot is wrong): fp32 accumulation, 16-bit tolerance."""
    q, kn, vn, keys, values, n, bias = decode_inputs(2, 2, 4, 64, 256, 150, dtype, TRITON_DEVICE)
    got = triton_decode.decode_attention(q, kn, vn, keys, values, n, bias, 0.125, 2)
    assert got.dtype == dtype
    assert relative_error(got, naive_attention(q, keys, values, 150, bias, 0.125)) < 1e-2


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("dtype", [th.float32, th.float16])
def test_triton_decode_kernel_norms_and_rotates_the_raw_projections(triton_decode, norm, dtype):
    """``rope=``: the kernel applies the layer's q/k RMSNorm and RoPE as ``attention.norm_rope`` does (the same
    16-bit roundings), attends with them, and writes the rotated key into the cache."""
    from rlvr_vocab.sampling.attention import norm_rope

    b, kv_heads, group, head_dim, cache_len, length = 3, 2, 3, 32, 100, 61
    q, kn, vn, keys, values, n, bias = decode_inputs(
        b, kv_heads, group, head_dim, cache_len, length, dtype, TRITON_DEVICE
    )
    gen = th.Generator().manual_seed(7)
    angle = th.rand(b, 1, head_dim // 2, generator=gen) * 50
    cos, sin = (f(th.cat([angle, angle], -1)).to(dtype=dtype, device=TRITON_DEVICE) for f in (th.cos, th.sin))
    weight = (1 + 0.5 * th.randn(kv_heads * (group + 1), head_dim, generator=gen)).to(
        dtype=dtype, device=TRITON_DEVICE
    )
    weight = weight if norm else None
    rq, rk = norm_rope(q, kn, cos, sin, weight, 1e-6)
    assert relative_error(rq, q) > 0.1 and relative_error(rk, kn) > 0.1  # the rotation is not the identity here
    ref_keys, ref_values = keys.clone(), values.clone()
    want = eager_decode_attention(
        rq, rk, vn, ref_keys, ref_values, n, decode_mask(bias, n, cache_len, kv_heads, dtype), 0.2
    )
    got = triton_decode.decode_attention(
        q, kn, vn, keys, values, n, bias, 0.2, 2, rope=(cos[:, 0], sin[:, 0], weight, 1e-6)
    )
    written = keys[:, :, length - 1].float()
    assert relative_error(written, rk[:, :, 0]) < (1e-6 if dtype == th.float32 else 2e-3), "the roped key is cached"
    assert th.equal(values, ref_values)
    assert relative_error(got, want) < (1e-4 if dtype == th.float32 else 1e-2)


def test_the_samplers_kernel_check_covers_the_raw_projection_form(triton_decode, monkeypatch):
    """``check_triton`` (run before the sampler uses the kernel) passes the kernel, and names the form that fails."""
    from rlvr_vocab.sampling.attention import check_triton

    assert check_triton(th.float32, 4, 2, 16, th.device(TRITON_DEVICE)) is None
    real = triton_decode.decode_attention
    monkeypatch.setattr(triton_decode, "decode_attention", lambda *a, rope=None, **k: real(*a, **k))  # rope ignored
    assert "q/k norm and RoPE in the kernel" in check_triton(th.float32, 4, 2, 16, th.device(TRITON_DEVICE))
    monkeypatch.setattr(triton_decode, "decode_attention", lambda *a, fold=None, **k: real(*a, **k))  # fold ignored
    assert "the input norm unfolded in the kernel" in check_triton(th.float32, 4, 2, 16, th.device(TRITON_DEVICE))


@pytest.mark.parametrize("peel", [False, True])
def test_the_kernel_with_its_first_block_peeled_computes_the_same(tok, triton_decode, monkeypatch, peel):
    """``PEEL``: the first cache block loaded before the query's work, then the loop over the rest: the sampler's
    check (splits, left padding, the raw-projection and folded forms) and greedy decoding against ``generate``."""
    from rlvr_vocab.sampling.attention import check_triton

    monkeypatch.setattr(triton_decode, "PEEL", peel)
    assert check_triton(th.float32, 4, 2, 16, th.device(TRITON_DEVICE)) is None
    model = tiny_arch(tok, "qwen3").to(TRITON_DEVICE)
    inputs = batch(tok, PROMPTS, TRITON_DEVICE)
    kwargs = dict(do_sample=False, max_new_tokens=6, pad_token_id=tok.pad_token_id)
    ref = model.generate(**inputs, **kwargs)
    assert th.equal(
        model.generate(**inputs, **kwargs, custom_generate=FastSampler(attention="triton", fold="on")), ref
    )


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_greedy_with_the_triton_kernel_matches_transformers_generate(tok, triton_decode, arch):
    """Through the fused layers (raw q/k into the kernel, which norms and rotates them) for each architecture."""
    model = tiny_arch(tok, arch).to(TRITON_DEVICE)
    inputs = batch(tok, PROMPTS, TRITON_DEVICE)
    kwargs = dict(do_sample=False, max_new_tokens=6, pad_token_id=tok.pad_token_id, repetition_penalty=1.3)
    ref = model.generate(**inputs, **kwargs)
    sampler = FastSampler(attention="triton")
    out = model.generate(**inputs, **kwargs, custom_generate=sampler)
    assert sampler.last_used_fast_path and sampler.session.attention == "triton"
    assert sampler.session.fused is not None
    assert th.equal(out, ref)


# ------------------------------------------------------------------------------------------ Triton pick
@pytest.fixture
def triton_pick(monkeypatch):
    """The Triton token pick (``triton_pick``) with 16-column draw groups: several chunks per row of a small
    vocabulary (and fewer ops for the CPU's interpreter)."""
    module = interpreted_triton("triton_pick", monkeypatch)
    monkeypatch.setattr(module, "SUB", 16)
    return module


def pick_case(n=6, vocab=150, seed=0):
    """Random logits with ties-free values, and every input of the kernel's processing switched on."""
    gen = th.Generator().manual_seed(seed)
    logits = (th.randn(n, vocab, generator=gen) * 3).to(TRITON_DEVICE)
    return dict(
        logits=logits,
        rows=th.arange(n, device=TRITON_DEVICE),
        inside=(th.arange(n) % 2 == 0).to(TRITON_DEVICE),
        seen=(th.rand(n, vocab + 1, generator=gen) < 0.3).to(TRITON_DEVICE),
        blocked=(th.arange(vocab) % 7 == 3).to(TRITON_DEVICE),
        force_at=th.tensor([-1, 0, -1, -1, 0, -1][:n], device=TRITON_DEVICE),
        eos_columns=(th.arange(vocab) == 5).to(TRITON_DEVICE),
        step=th.zeros(1, dtype=th.long, device=TRITON_DEVICE),
    )


def processed(case, temperature, penalty, standard):
    """The PyTorch maths of the kernel's processing (penalty, temperature, masks, forced EOS)."""
    x, seen = case["logits"].float(), case["seen"][:, :-1]
    x = th.where(seen, th.where(x < 0, x * penalty, x / penalty), x) / temperature
    cols = th.arange(x.shape[1], device=x.device)
    x = x.masked_fill(~case["inside"][:, None] & (cols >= standard), float("-inf"))
    x = x.masked_fill(case["blocked"], float("-inf"))
    forced = (case["force_at"] == case["step"])[:, None]
    return th.where(forced, th.where(case["eos_columns"], 0.0, float("-inf")), x)


def test_triton_pick_greedy_is_argmax_of_the_processed_scores(triton_pick):
    """Greedy: torch.argmax of the processed scores and their log_softmax, over several chunks of columns."""
    case = pick_case()
    args = [case[k] for k in ("logits", "rows", "inside", "seen", "blocked", "force_at", "eos_columns", "step")]
    tok, logp = triton_pick.pick_tokens(*args, None, 6, 0.7, 1.3, 120)
    want = processed(case, 0.7, 1.3, 120)
    assert -(-150 // (4 * triton_pick.SUB)) > 1, "one chunk per row: the combine is not exercised"
    assert th.equal(tok, want.argmax(-1)) and (tok[[1, 4]] == 5).all()
    th.testing.assert_close(logp, want.log_softmax(-1).gather(1, tok[:, None])[:, 0], rtol=1e-5, atol=1e-5)
    first = th.zeros_like(case["logits"])  # all tied: the first column, as torch.argmax
    assert triton_pick.pick_tokens(first, case["rows"], *[None] * 5, case["step"], None, 6)[0].eq(0).all()


def test_triton_pick_draws_allowed_tokens_reproducibly_by_original_row(triton_pick):
    """Sampled: only allowed tokens, log-probs of the processed softmax; the noise follows (seed, step, original
    row), so a subset of rows (compaction) draws the same tokens, and another seed or step draws others."""
    case = pick_case(n=6)
    names = ("logits", "rows", "inside", "seen", "blocked", "force_at", "eos_columns", "step")

    def draw(c, seed, step=0, rows=None):
        c = dict(c, step=th.tensor([step], device=TRITON_DEVICE))
        if rows is not None:
            c.update({k: c[k][rows] for k in ("logits", "rows", "inside", "seen")})
        seed = th.tensor([seed], device=TRITON_DEVICE)
        return triton_pick.pick_tokens(*[c[k] for k in names], seed, 6, 0.7, 1.3, 120)

    tok, logp = draw(case, 11)
    want = processed(case, 0.7, 1.3, 120).log_softmax(-1)
    assert th.isfinite(want.gather(1, tok[:, None])).all(), "a masked token was drawn"
    th.testing.assert_close(logp, want.gather(1, tok[:, None])[:, 0], rtol=1e-5, atol=1e-5)
    assert th.equal(draw(case, 11)[0], tok)
    sub = th.tensor([4, 1, 3], device=TRITON_DEVICE)
    assert th.equal(draw(case, 11, rows=sub)[0], tok[sub])
    free = ~th.isin(th.arange(6, device=TRITON_DEVICE), th.tensor([1, 4], device=TRITON_DEVICE))
    others = [draw(case, 12)[0], draw(case, 11, step=1)[0]]
    assert all(not th.equal(o[free], tok[free]) for o in others), "the noise ignores the seed or the step"


def test_triton_pick_frequencies_follow_the_softmax(triton_pick):
    """Chi-square of 300 draws (one row, 300 steps) over 5 columns against softmax (low power on the CPU's
    interpreter; bench/check_sampler runs the large test on the GPU)."""
    logits = th.tensor([[1.0, 0.2, -0.5, 2.0, 0.0]], device=TRITON_DEVICE)
    rows, seed = th.zeros(1, dtype=th.long, device=TRITON_DEVICE), th.tensor([3], device=TRITON_DEVICE)
    draws = [
        triton_pick.pick_tokens(logits, rows, *[None] * 5, th.tensor([t], device=TRITON_DEVICE), seed, 1)[0]
        for t in range(300)
    ]
    counts = th.bincount(th.cat(draws).cpu(), minlength=5).double()
    expected = logits[0].cpu().softmax(-1).double() * 300
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 4 + 6 * math.sqrt(8), f"chi2={chi2:.1f} with 4 degrees of freedom"


def test_triton_pick_samples_what_the_processors_give_and_compacts(tok, triton_pick):
    """The sampler with ``pick="triton"``: the processed log-probs of transformers' processors, no reasoning id
    outside a span, and with compaction the same tokens as without."""
    model = tiny_qwen3(tok, TRITON_DEVICE, seed=1)
    vocab = extend_model(model, tok, 16, OmegaConf.structured(ReasoningVocabConfig()))
    boost(model, list(range(vocab.standard_size, vocab.standard_size + vocab.size)), 2.0)
    prompts = [PROMPTS[0], PROMPTS[2], "hi", "<|im_start|>assistant\n<think>"]
    inputs = batch(tok, prompts, TRITON_DEVICE)
    kwargs = dict(
        do_sample=True, temperature=0.7, top_k=0, repetition_penalty=1.2, min_new_tokens=3, max_new_tokens=10
    )
    ends = th.tensor([2, 9, 5, -1])

    def run(**options):
        rec = Recorder(FastSampler(reasoning_vocab=vocab, pick="triton", force_eos_at=ends, stop_check_every=2,
                                   min_rows=1, **options))  # fmt: skip
        th.manual_seed(0)
        out = model.generate(**inputs, **kwargs, pad_token_id=tok.pad_token_id, custom_generate=rec)
        assert rec.sampler.last_used_fast_path and rec.sampler.session.pick == "triton"
        return out, rec

    out, rec = run(compaction=True)
    plain, off = run(compaction=False)
    assert rec.sampler.stats["compactions"] >= 1 and off.sampler.stats["compactions"] == 0
    assert th.equal(out, plain)
    p = inputs.input_ids.shape[1]
    nxt = out[:, p:]
    assert not ((nxt >= vocab.standard_size) & ~vocab.span_state(out)[:, p - 1 : -1]).any()
    assert (nxt >= vocab.standard_size).any(), "reasoning ids never sampled"
    got, mask = rec.sampler.last_logprobs, inputs.attention_mask
    for t in range(3):  # the first tokens of every row (rows end from token 2 on)
        ids = out[:, : p + t]
        attn = th.cat([mask, th.ones(len(ids), t, dtype=mask.dtype, device=mask.device)], 1)
        with th.no_grad():
            logits = model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0))
        scores = rec.processors(ids, logits.logits[:, -1].float())
        want = scores.log_softmax(-1).gather(1, out[:, p + t, None]).squeeze(1)
        live = (ends < 0) | (t < ends)
        th.testing.assert_close(got[live, t], want[live], rtol=1e-4, atol=1e-4)


def test_triton_pick_is_refused_for_what_it_cannot_process(tok, triton_pick):
    model = tiny_qwen3(tok, TRITON_DEVICE)
    inputs = batch(tok, PROMPTS, TRITON_DEVICE)
    with pytest.raises(ValueError, match="TopKLogitsWarper"):
        model.generate(**inputs, do_sample=True, top_k=5, max_new_tokens=3, pad_token_id=tok.pad_token_id,
                       custom_generate=FastSampler(pick="triton"))  # fmt: skip
    with pytest.raises(ValueError, match="pick='fast'"):
        FastSampler(pick="fast")


@pytest.mark.parametrize("name", ["triton_decode", "triton_pick", "triton_linear", "bench.skinny_gemm"])
def test_triton_kernels_read_no_plain_globals(monkeypatch, name):
    """Triton's GPU compiler refuses a kernel that reads a module global other than a constexpr, a module or
    another kernel; its CPU interpreter does not (12-03 D: the pick kernel compiled here and failed on the GPU)."""
    module = interpreted_triton(name, monkeypatch)
    import types

    kernels = {k: v for k, v in vars(module).items() if hasattr(v, "fn") and hasattr(v.fn, "__code__")}
    assert kernels, "no Triton kernels found"
    for kernel_name, kernel in kernels.items():
        for used in kernel.fn.__code__.co_names:
            value = vars(module).get(used)
            if value is None:
                continue  # an attribute name (tl.load's "load") or a builtin
            ok = isinstance(value, (types.ModuleType, module.tl.constexpr)) or hasattr(value, "fn")
            assert ok, f"{name}.{kernel_name} reads the plain global {used} = {value!r}"


# ------------------------------------------------------------------------------------------ skinny GEMMs
@pytest.mark.parametrize("m, k, n, bias", [(5, 200, 70, True), (16, 128, 64, False), (1, 96, 33, False)])
def test_triton_skinny_linear_matches_torch(monkeypatch, m, k, n, bias):
    triton_gemm = interpreted_triton("bench.skinny_gemm", monkeypatch)
    gen = th.Generator().manual_seed(m)
    x, w = (th.randn(*s, generator=gen).to(TRITON_DEVICE) for s in ((m, k), (n, k)))
    b = th.randn(n, generator=gen).to(TRITON_DEVICE) if bias else None
    got = triton_gemm.linear(x, w, b, block_n=16, block_k=64)
    th.testing.assert_close(got, th.nn.functional.linear(x, w, b), rtol=1e-4, atol=1e-4)


def test_triton_silu_mul_is_the_mlp_activation_of_the_fused_gate_up(monkeypatch):
    triton_gemm = interpreted_triton("bench.skinny_gemm", monkeypatch)
    gen = th.Generator().manual_seed(0)
    x, w = th.randn(7, 160, generator=gen).to(TRITON_DEVICE), th.randn(2 * 48, 160, generator=gen).to(TRITON_DEVICE)
    gate, up = th.nn.functional.linear(x, w).chunk(2, dim=-1)
    got = triton_gemm.silu_mul(x, w, block_n=16, block_k=64)
    th.testing.assert_close(got, th.nn.functional.silu(gate) * up, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="at most 64 rows"):
        triton_gemm.linear(th.zeros(65, 16, device=TRITON_DEVICE), w[:, :16])


# ------------------------------------------------------------------------------------------ Triton projections
@pytest.fixture
def triton_linear(monkeypatch):
    """The decode step's few-row projections with their neighbours fused in (``triton_linear``)."""
    return interpreted_triton("triton_linear", monkeypatch)


def linear_case(form: str, m: int, k: int, n: int, dtype=th.float32, seed=0):
    """(x, weight, kwargs) of one form of ``triton_linear.linear``: "+"-joined bias, residual (or "plain")."""
    gen = th.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (th.randn(*shape, generator=gen) * scale).to(dtype).to(TRITON_DEVICE)

    parts = form.split("+")
    x, w = rand(m, k), rand(n, k, scale=k**-0.5)
    kwargs = {}
    if "bias" in parts:
        kwargs["bias"] = rand(n, scale=0.3)
    if "residual" in parts:
        kwargs["residual"] = rand(m, n)
    return x, w, kwargs


@pytest.mark.parametrize("form", ["plain", "bias", "residual", "bias+residual"])
@pytest.mark.parametrize("m, k, n, split_k", [(5, 200, 70, 1), (33, 96, 48, 1), (5, 200, 70, 2), (33, 200, 48, 3)])
def test_triton_linear_matches_the_pytorch_maths(triton_linear, form, m, k, n, split_k):
    """K and N off the blocks, rows padded up to tl.dot's 16 and past one power of two, K split in one kernel
    (the column block's last program sums the partials and leaves the counters at zero for the next launch)."""
    x, w, kwargs = linear_case(form, m, k, n)
    work = triton_linear.workspace(x.device, n)
    want = triton_linear.reference(x, w, **kwargs)
    for _ in range(2):  # the second launch reuses the workspace
        got = triton_linear.linear(x, w, **kwargs, config=(16, 64, 4, 2, split_k), work=work)
        th.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert not work[0].any()


@pytest.mark.parametrize("fold, bias", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("m, k, inter", [(5, 200, 40), (33, 96, 48)])
def test_the_gated_kernel_is_the_mlps_gate_up_and_silu_times_up(triton_linear, fold, bias, m, k, inter):
    """``gated``: the gate/up GEMM and SiLU x up in one kernel, with the folded norm's row scale (sums of squares in
    three parts) or plain; K and the intermediate size off the blocks, rows padded up to tl.dot's 16."""
    x, w, kwargs = linear_case("bias" if bias else "plain", m, k, 2 * inter)
    if fold:
        kwargs |= dict(ss=th.stack([p.pow(2).sum(-1) for p in (2 * x).chunk(3, -1)], -1), hidden=k, eps=1e-6)
    got = triton_linear.gated(x, w, **kwargs, config=(16, 64, 4, 2))
    want = triton_linear.gated_reference(x, w, **kwargs)
    assert got.shape == (m, inter)
    th.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    gate, up = th.nn.functional.linear(x, w, kwargs.get("bias")).chunk(2, -1)
    if not fold:  # the reference is transformers' MLP activation
        th.testing.assert_close(got, th.nn.functional.silu(gate) * up, rtol=1e-4, atol=1e-4)
    else:  # the row scale matters: the test can fail
        assert not th.allclose(got, th.nn.functional.silu(gate) * up, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="ss must be fp32"):
        triton_linear.gated(x, w, ss=th.ones(m + 1, 2, device=x.device))


def test_triton_linear_in_16_bits(triton_linear):
    """fp16 (bf16 on CUDA only: the interpreter's bf16 dot is wrong), in the default block configuration."""
    dtype = th.bfloat16 if TRITON_DEVICE == "cuda" else th.float16
    x, w, kwargs = linear_case("residual", 7, 512, 96, dtype)
    got = triton_linear.linear(x, w, **kwargs).float()
    want = triton_linear.reference(x, w, **kwargs).float()
    assert float((got - want).abs().max() / want.abs().max()) < 2e-2


def test_triton_linear_reference_is_transformers_projection_and_residual(tok):
    """``reference`` rounds as transformers' ``residual + o_proj(x)`` does: equal in bf16, bit for bit."""
    from rlvr_vocab.sampling import triton_linear

    model = tiny_arch(tok, "llama").to(th.bfloat16)  # llama here has biases (attention_bias, mlp_bias)
    layer = model.model.layers[0]
    x = th.randn(5, 64, generator=th.Generator().manual_seed(0)).to(th.bfloat16)
    with th.no_grad():
        for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
            inputs = th.randn(5, proj.in_features, generator=th.Generator().manual_seed(1)).to(th.bfloat16)
            assert proj.bias is not None
            assert th.equal(triton_linear.reference(inputs, proj.weight, proj.bias, residual=x), x + proj(inputs))


def test_the_samplers_linear_check_names_a_wrong_kernel(triton_linear, monkeypatch):
    assert triton_linear.check(th.float32, th.device(TRITON_DEVICE)) is None
    real = triton_linear.linear
    monkeypatch.setattr(triton_linear, "linear", lambda *a, residual=None, **k: real(*a, **k))  # residual ignored
    assert "(residual, 5 rows)" in triton_linear.check(th.float32, th.device(TRITON_DEVICE))
    monkeypatch.setattr(triton_linear, "linear", lambda *a, ss=None, **k: real(*a, **k))  # no sums of squares
    assert "sums of squares" in triton_linear.check(th.float32, th.device(TRITON_DEVICE))
    monkeypatch.setattr(triton_linear, "linear", real)
    gated = triton_linear.gated
    monkeypatch.setattr(triton_linear, "gated", lambda x, w, ss=None, **k: gated(x, w, **k))  # the row scale ignored
    assert "(gated, folded, 5 rows)" in triton_linear.check(th.float32, th.device(TRITON_DEVICE))
    with pytest.raises(ValueError, match="64 rows"):
        real(th.zeros(65, 16, device=TRITON_DEVICE), th.zeros(8, 16, device=TRITON_DEVICE))
    with pytest.raises(ValueError, match="16 columns"):
        real(th.zeros(4, 8, device=TRITON_DEVICE), th.zeros(8, 16, device=TRITON_DEVICE))


@pytest.mark.parametrize(
    "arch, linear",
    [
        ("qwen3", "o+down"),
        ("qwen2", "o"),
        ("llama", "o+down"),
        ("qwen2", "all"),
        ("llama", "o+down+qkv"),
        ("llama", "o+down+gated"),
    ],
)
def test_greedy_with_the_triton_projections_matches_transformers_generate(tok, triton_decode, triton_linear, arch,
                                                                           linear, monkeypatch):  # fmt: skip
    """The named projections in Triton (the residual adds inside them), every decode step."""
    calls = []
    real = triton_linear.linear
    monkeypatch.setattr(triton_linear, "linear", lambda x, w, *a, **k: calls.append(w.shape) or real(x, w, *a, **k))
    gated = triton_linear.gated
    monkeypatch.setattr(triton_linear, "gated", lambda x, w, *a, **k: calls.append("gated") or gated(x, w, *a, **k))
    model = tiny_arch(tok, arch).to(TRITON_DEVICE)
    inputs = batch(tok, PROMPTS, TRITON_DEVICE)
    kwargs = dict(do_sample=False, max_new_tokens=6, pad_token_id=tok.pad_token_id, repetition_penalty=1.3)
    ref = model.generate(**inputs, **kwargs)
    sampler = FastSampler(attention="triton", linear=linear)
    out = model.generate(**inputs, **kwargs, custom_generate=sampler)
    assert sampler.last_used_fast_path and sampler.session.linear == sampler_module.LINEAR_SETS[linear]
    uncaptured = sampler.stats["steps"] - sampler.stats["replays"]  # steps run in Python (CUDA: the rest replay)
    layer = model.model.layers[0]
    o_calls, down_calls = (
        calls.count(layer.self_attn.o_proj.weight.shape),
        calls.count(layer.mlp.down_proj.weight.shape),
    )
    assert uncaptured >= 1 and o_calls >= 2 * uncaptured  # both layers, every such step
    assert (down_calls >= 2 * uncaptured) if "down" in sampler_module.LINEAR_SETS[linear] else down_calls == 0
    fused = sampler.session.fused.layers[0]
    for name in ("qkv", "gate_up"):  # the fused layers' own GEMMs
        n = calls.count(getattr(fused, name).shape)
        assert (n >= 2 * uncaptured) if name in sampler_module.LINEAR_SETS[linear] else n == 0
    n = calls.count("gated")  # gate/up with SiLU x up in one kernel
    assert (n >= 2 * uncaptured) if "gated" in sampler_module.LINEAR_SETS[linear] else n == 0
    assert th.equal(out, ref)


def test_the_silu_kernels_are_refused_for_another_mlp_activation(tok, triton_linear):
    """The folded norms and ``gated`` compute SiLU x up: a GELU MLP gets neither (by name where asked for), and
    ``auto`` keeps it unfolded, with transformers' activation."""
    model = tiny_arch(tok, "llama").to(TRITON_DEVICE)
    model.config.hidden_act = "gelu"
    for layer in model.model.layers:
        layer.mlp.act_fn = th.nn.GELU()
    inputs = batch(tok, PROMPTS, TRITON_DEVICE)
    kwargs = dict(do_sample=False, max_new_tokens=3, pad_token_id=tok.pad_token_id)
    with pytest.raises(ValueError, match="linear='o\\+down\\+gated'.*activation is GELU, not SiLU"):
        model.generate(**inputs, **kwargs, custom_generate=FastSampler(linear="o+down+gated"))
    with pytest.raises(ValueError, match="fold='on'.*SiLU"):
        model.generate(**inputs, **kwargs, custom_generate=FastSampler(fold="on", linear="torch", attention="eager"))
    ref = model.generate(**inputs, **kwargs)
    auto = FastSampler(fold="auto", linear="torch", attention="eager")
    assert th.equal(model.generate(**inputs, **kwargs, custom_generate=auto), ref)
    assert auto.last_used_fast_path and not auto.session.fused.fold
    from rlvr_vocab.sampling import fused

    # linear="auto" on CUDA (its kernel check passed): o and down in Triton, gate/up and GELU left to torch
    chooser = FastSampler(linear="auto")
    chooser._usable = lambda *a: True
    assert chooser._resolve_linear(auto.session.fused, th.float32, th.device("cuda")) == ("o", "down")
    silu = fused.FusedWeights.build(tiny_arch(tok, "llama"))[0]
    assert chooser._resolve_linear(silu, th.float32, th.device("cuda")) == sampler_module.LINEAR_SETS["o+down+gated"]


def test_triton_projections_are_refused_by_name_where_they_cannot_serve(tok, triton_linear):
    model = tiny_arch(tok, "llama").to(TRITON_DEVICE)
    inputs = batch(tok, PROMPTS, TRITON_DEVICE)
    kwargs = dict(do_sample=False, max_new_tokens=3, pad_token_id=tok.pad_token_id)
    o = model.model.layers[1].self_attn.o_proj
    o.weight = th.nn.Parameter(o.weight.detach().t().contiguous().t())  # the same values, column-major
    with pytest.raises(ValueError, match="linear='o'.*o / down projection weights are not contiguous"):
        model.generate(**inputs, **kwargs, custom_generate=FastSampler(linear="o"))
    auto = FastSampler()
    model.generate(**inputs, **kwargs, custom_generate=auto)
    assert auto.session.fused is not None and auto.session.linear == ()  # torch's projections (a strided o weight)
    with pytest.raises(ValueError, match="linear='cublas'"):
        FastSampler(linear="cublas")


# ------------------------------------------------------------------------------------------ folded RMSNorms
@pytest.fixture
def norm_fold(monkeypatch):
    """The RMSNorms folded into the projections after them (``norm_fold``), its kernel on CUDA or interpreted."""
    return interpreted_triton("norm_fold", monkeypatch)


def test_folding_an_rmsnorm_into_the_projection_after_it_is_the_same_maths(tok):
    """``r * (x @ (W * w).T)`` is ``RMSNorm(x) @ W.T`` (fp32: to rounding), for transformers' own norm and the sums
    of squares in parts, as the o / down kernels leave them (one part per column block)."""
    from rlvr_vocab.sampling import norm_fold

    layer = tiny_arch(tok, "qwen3").model.layers[0]
    norm, proj = layer.input_layernorm, layer.self_attn.q_proj
    x = th.randn(5, 64, generator=th.Generator().manual_seed(0)) * 3
    folded = proj.weight.detach().clone()
    norm_fold.fold_weight(folded, norm.weight)
    ss = th.cat([norm_fold.sums_of_squares(part) for part in x.chunk(4, dim=-1)], -1)  # [5, 4]
    r = norm_fold.row_scale(ss, 64, norm.variance_epsilon)
    with th.no_grad():
        want = proj(norm(x))
    th.testing.assert_close(norm_fold.scaled(x @ folded.T, r, proj.bias), want, rtol=1e-5, atol=1e-5)
    assert not th.allclose(norm_fold.scaled(x @ folded.T, r * 1.01, proj.bias), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m, parts, bias", [(5, 1, False), (33, 3, True), (2, 64, True)])
def test_the_folded_silu_mul_kernel_matches_its_pytorch_maths(norm_fold, m, parts, bias):
    """Rows, sums of squares in 1-64 parts (the o kernel's column blocks), the intermediate size off the block."""
    gen = th.Generator().manual_seed(m)
    inter = norm_fold.BLOCK + 24
    gate_up = (th.randn(m, 2 * inter, generator=gen) * 4).to(TRITON_DEVICE)
    ss = (th.rand(m, parts, generator=gen) * 50).to(TRITON_DEVICE)
    b = (th.randn(2 * inter, generator=gen) * 0.3).to(TRITON_DEVICE) if bias else None
    want = norm_fold.silu_mul_reference(gate_up, ss, 96, 1e-6, b)
    got = norm_fold.silu_mul(gate_up, ss, 96, 1e-6, b, impl="triton")
    th.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    gate, up = gate_up.chunk(2, dim=-1)
    r = th.rsqrt(ss.sum(-1, keepdim=True) / 96 + 1e-6)
    bg, bu = b.chunk(2) if bias else (0, 0)
    th.testing.assert_close(want, th.nn.functional.silu(gate * r + bg) * (up * r + bu), rtol=1e-5, atol=1e-5)
    assert norm_fold.check(th.float32, th.device(TRITON_DEVICE)) is None
    with pytest.raises(ValueError, match="impl='cuda'"):
        norm_fold.silu_mul(gate_up, ss, 96, 1e-6, b, impl="cuda")


def test_the_o_and_down_kernels_leave_the_sums_of_squares_of_their_output(triton_linear):
    """``sums=True``: each output row's sum of squares per 16-column block, of the rounded output (residual in)."""
    x, w, kwargs = linear_case("bias+residual", 5, 200, 70)
    work = triton_linear.workspace(x.device, 70)
    out, ss = triton_linear.small_linear(x, w, **kwargs, work=work, sums=True)
    assert ss.shape == (5, triton_linear.ss_blocks(70, 200)) == (5, 5)
    want = th.nn.functional.pad(out, (0, 80 - 70)).reshape(5, 5, 16).pow(2).sum(-1)
    th.testing.assert_close(ss, want, rtol=1e-5, atol=1e-5)
    th.testing.assert_close(out, triton_linear.reference(x, w, **kwargs), rtol=1e-4, atol=1e-4)
    assert th.equal(triton_linear.small_linear(x, w, **kwargs, work=work), out)


def test_the_attention_kernel_unfolds_the_input_norm_as_the_eager_maths(triton_decode, norm_fold):
    """The kernel scales the loaded q / k / v rows and adds the qkv bias (``fold``) before its q/k norm and RoPE,
    as ``attention.unfold`` then ``norm_rope`` do; the new K/V written to the cache are the unfolded ones."""
    from rlvr_vocab.sampling import attention

    gen = th.Generator().manual_seed(3)
    b, h, hkv, d, cache_len, length = 3, 4, 2, 16, 70, 41

    def rand(*shape, scale=1.0):
        return (th.randn(*shape, generator=gen) * scale).to(TRITON_DEVICE)

    q, k, v = rand(b, 1, h, d, scale=5).transpose(1, 2), rand(b, hkv, 1, d, scale=5), rand(b, hkv, 1, d, scale=5)
    keys, values = rand(b, hkv, cache_len, d), rand(b, hkv, cache_len, d)
    bias = th.zeros(b, cache_len, device=TRITON_DEVICE)
    n = th.tensor([length], device=TRITON_DEVICE)
    angle = th.rand(b, 1, d // 2, generator=gen).to(TRITON_DEVICE) * 50
    cos, sin = th.cos(th.cat([angle, angle], -1)), th.sin(th.cat([angle, angle], -1))
    weight = (1 + rand(h + hkv, d) * 0.3).contiguous()
    ss, qkv_bias = rand(b, 3).abs() * 40, rand((h + 2 * hkv) * d, scale=0.5)
    uq, uk, uv = attention.unfold(q, k, v, ss, 48, 1e-6, qkv_bias)
    rq, rk = attention.norm_rope(uq, uk, cos, sin, weight, 1e-6)
    mask = attention.decode_mask(bias, n, cache_len, hkv, q.dtype)
    want_k, want_v = keys.clone(), values.clone()
    want = attention.eager_decode_attention(rq, rk, uv, want_k, want_v, n, mask, d**-0.5)
    got_k, got_v = keys.clone(), values.clone()
    got = triton_decode.decode_attention(
        q, k, v, got_k, got_v, n, bias, d**-0.5, 1, rope=(cos[:, 0], sin[:, 0], weight, 1e-6),
        fold=(ss, 48, 1e-6, qkv_bias),
    )  # fmt: skip
    th.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    th.testing.assert_close(got_k, want_k, rtol=1e-4, atol=1e-4)
    th.testing.assert_close(got_v, want_v, rtol=1e-4, atol=1e-4)
    plain = triton_decode.decode_attention(q, k, v, keys.clone(), values.clone(), n, bias, d**-0.5, 1,
                                           rope=(cos[:, 0], sin[:, 0], weight, 1e-6))  # fmt: skip
    assert not th.allclose(plain, want, rtol=1e-3, atol=1e-3)  # the fold changes the answer: the test can fail


@pytest.mark.parametrize(
    "arch, attention, linear",
    [
        ("qwen3", "triton", "o+down"),
        ("qwen2", "triton", "o"),
        ("llama", "eager", "torch"),
        ("qwen2", "triton", "all"),
        ("llama", "triton", "o+down+gated"),
    ],
)
def test_greedy_with_the_norms_folded_matches_transformers_generate(tok, triton_decode, triton_linear, norm_fold,
                                                                     arch, attention, linear, monkeypatch):  # fmt: skip
    """``fold="on"``: the RMSNorms folded into qkv and gate_up on every path (the Triton kernels: the attention's
    scale, the o / down kernels' sums of squares, the SiLU x up kernel; the eager attention and torch projections:
    the same maths in PyTorch ops), fp32, greedy: the tokens of ``generate``. Biases everywhere they can be."""
    calls = []
    real, gated = norm_fold.silu_mul_triton, triton_linear.gated
    inputs = batch(tok, PROMPTS, TRITON_DEVICE)
    rows = inputs["input_ids"].shape[0]  # the decode steps' calls (the kernels' checks use other row counts)
    monkeypatch.setattr(norm_fold, "silu_mul_triton",
                        lambda x, *a, **k: calls.append(("silu_mul", x.shape[0])) or real(x, *a, **k))  # fmt: skip
    monkeypatch.setattr(
        triton_linear, "gated", lambda x, *a, **k: calls.append(("gated", x.shape[0])) or gated(x, *a, **k)
    )
    model = tiny_arch(tok, arch).to(TRITON_DEVICE)
    kwargs = dict(do_sample=False, max_new_tokens=8, pad_token_id=tok.pad_token_id, repetition_penalty=1.3)
    ref = model.generate(**inputs, **kwargs)
    sampler = FastSampler(attention=attention, linear=linear, fold="on")
    out = model.generate(**inputs, **kwargs, custom_generate=sampler)
    s = sampler.session
    assert sampler.last_used_fast_path and s.fused.fold and s.fold_impl == "triton"
    uncaptured = sampler.stats["steps"] - sampler.stats["replays"]
    used, unused = ("gated", "silu_mul") if "gated" in s.linear else ("silu_mul", "gated")
    assert uncaptured * 2 <= calls.count((used, rows)) and calls.count((unused, rows)) == 0  # both layers, every step
    assert th.equal(out, ref)
    layer = model.model.layers[0]
    assert th.equal(s.fused.layers[0].qkv[:1], layer.self_attn.q_proj.weight[:1] * layer.input_layernorm.weight)
    with pytest.raises(ValueError, match="fold='maybe'"):
        FastSampler(fold="maybe")
    with pytest.raises(ValueError, match="fold='on'.*fuse=False"):
        model.generate(**inputs, **kwargs, custom_generate=FastSampler(fold="on", fuse=False))


@pytest.mark.skipif(th.cuda.is_available(), reason="the refusal is for devices without it")
def test_programmatic_dependent_launch_is_refused_where_it_cannot_run(tok):
    model = tiny_arch(tok, "qwen3")
    kwargs = dict(do_sample=False, max_new_tokens=3, pad_token_id=tok.pad_token_id)
    with pytest.raises(ValueError, match="pdl='on'.*compute capability 9"):
        model.generate(**batch(tok, PROMPTS, "cpu"), **kwargs, custom_generate=FastSampler(pdl="on"))
    with pytest.raises(ValueError, match="pdl='yes'"):
        FastSampler(pdl="yes")
    sampler = FastSampler()
    model.generate(**batch(tok, PROMPTS, "cpu"), **kwargs, custom_generate=sampler)
    assert sampler.last_paths["pdl"] is False


def test_auto_runs_each_kernels_check_once_per_key_and_never_uses_a_kernel_after_it_failed():
    sampler = FastSampler()
    calls = []

    def check(answer):
        return lambda: calls.append(answer) or answer

    assert sampler._usable("pick", "cuda:0", check(None)) and sampler._usable("pick", "cuda:0", check("unreached"))
    assert calls == [None], "one check per key"
    assert not sampler._usable("linear", "bf16", check("relative error 1e+00"))
    assert not sampler._usable("linear", "fp32", check(None)), "a failed kernel is not checked again"
    assert calls == [None, "relative error 1e+00"] and sampler.stats["failures"] == 1
    sampler._failed("pick", "RuntimeError: boom")  # a run failed: the PyTorch pick from now on
    assert not sampler._usable("pick", "cuda:1", check(None)) and len(calls) == 2
    assert sampler._usable("fold", "cuda:0", check(None)) and sampler._usable("attention", "x", check(None))


def test_auto_folds_the_norms_only_in_few_row_sessions_on_cuda(tok, norm_fold):
    """``fold="auto"``: on CUDA in sessions of at most ``triton_linear.MAX_ROWS`` rows (the kernel checked first);
    not on the CPU, not in bigger sessions, never without the fused layers."""
    model = tiny_arch(tok, "qwen3").to(TRITON_DEVICE)
    kwargs = dict(do_sample=False, max_new_tokens=3, pad_token_id=tok.pad_token_id)
    cuda = TRITON_DEVICE == "cuda"
    for prompts, folds in ((PROMPTS, cuda), ([PROMPTS[0]] * 65, False)):
        sampler = FastSampler()
        model.generate(**batch(tok, prompts, TRITON_DEVICE), **kwargs, custom_generate=sampler)
        assert sampler.session.fused.fold == folds and sampler.session.fold_impl == ("triton" if folds else None)
    sampler = FastSampler(fuse=False)
    model.generate(**batch(tok, PROMPTS, TRITON_DEVICE), **kwargs, custom_generate=sampler)
    assert sampler.session.fused is None and sampler.session.fold_impl is None


# ------------------------------------------------------------------------------------------ fused layers
def tiny_arch(tok, arch: str):
    """A random 2-layer model of each fused architecture, with the biases each can have switched on."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
    )  # fmt: skip
    config = {
        "qwen3": lambda: Qwen3Config(head_dim=16, attention_bias=True, **common),
        "qwen2": lambda: Qwen2Config(**common),  # q/k/v biases
        "llama": lambda: LlamaConfig(attention_bias=True, mlp_bias=True, **common),
    }[arch]()
    th.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config).eval()
    with th.no_grad():  # norms away from 1 and biases away from 0, so a swapped weight shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(th.randn_like(p) * 0.3)
    return model


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_fused_decode_layers_compute_what_transformers_layers_do(tok, arch, monkeypatch):
    from rlvr_vocab.sampling import fused

    calls = []
    real = fused.layer_forward
    monkeypatch.setattr(fused, "layer_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny_arch(tok, arch)
    inputs = batch(tok, PROMPTS, "cpu")
    greedy = dict(do_sample=False, max_new_tokens=24, pad_token_id=tok.pad_token_id)
    ref = model.generate(**inputs, **greedy)
    fast = FastSampler()
    out = model.generate(**inputs, **greedy, custom_generate=fast)
    assert fast.session.fused is not None and len(calls) >= 2 * 22  # both layers, every decode step
    n = min(ref.shape[1], out.shape[1])
    assert th.equal(out[:, :n], ref[:, :n])
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)  # HF's layers restored

    sampled = dict(do_sample=True, top_k=0, max_new_tokens=24, pad_token_id=tok.pad_token_id)
    plain = FastSampler(fuse=False)
    for _ in range(2):  # the second call reuses the session: its fused copies must follow the moved weights
        th.manual_seed(5)
        a = model.generate(**inputs, **sampled, custom_generate=plain)
        th.manual_seed(5)
        b = model.generate(**inputs, **sampled, custom_generate=fast)
        assert plain.session.fused is None and th.equal(a, b)
        th.testing.assert_close(fast.last_logprobs, plain.last_logprobs, atol=2e-5, rtol=0)
        with th.no_grad():  # as training does between calls
            for p in model.model.layers.parameters():
                p.mul_(1.1)
    assert fast.stats["fallbacks"] == 0


def test_layers_that_cannot_be_fused_run_as_transformers_layers(tok):
    from peft import LoraConfig, get_peft_model

    from rlvr_vocab.sampling import fused

    model = get_peft_model(tiny_arch(tok, "qwen3"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).eval()
    assert "not a plain nn.Linear" in fused.unfusable(model)
    inputs = batch(tok, PROMPTS, "cpu")
    kwargs = dict(do_sample=False, max_new_tokens=16, pad_token_id=tok.pad_token_id)
    ref = model.generate(**inputs, **kwargs)
    fast = FastSampler()
    out = model.generate(**inputs, **kwargs, custom_generate=fast)
    assert fast.last_used_fast_path and fast.session.fused is None
    n = min(ref.shape[1], out.shape[1])
    assert th.equal(out[:, :n], ref[:, :n])


# ------------------------------------------------------------------------------------------------ CUDA
# ------------------------------------------------------------------------------------------ fused prefill
@pytest.fixture
def fused_prefill(monkeypatch):
    """The prefill through the fused layers (``prefill``), its kernels on CUDA or interpreted."""
    return interpreted_triton("prefill", monkeypatch)


@pytest.mark.parametrize("arch, fold", [("qwen3", "off"), ("qwen3", "on"), ("qwen2", "on"), ("llama", "off")])
def test_the_fused_prefill_computes_what_transformers_layers_do(
    tok, fused_prefill, norm_fold, arch, fold, monkeypatch
):
    """``prefill="fused"``: every layer through ``prefill.layer_forward`` (its Triton kernels), fp32, biases and
    norms away from their defaults: the prompt's K/V in the cache and the first token's log-probs are the eager
    prefill's, the greedy tokens ``generate``'s; a kept session's second call prefills with the weights moved since
    (the fused buffers are refreshed before the prefill), and transformers' layers are back afterwards."""
    calls = []
    real = fused_prefill.layer_forward
    monkeypatch.setattr(fused_prefill, "layer_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny_arch(tok, arch).to(TRITON_DEVICE)
    inputs = batch(tok, PROMPTS, TRITON_DEVICE)
    p = inputs["input_ids"].shape[1]
    kwargs = dict(do_sample=False, max_new_tokens=4, pad_token_id=tok.pad_token_id, repetition_penalty=1.3)
    fused = FastSampler(prefill="fused", fold=fold)  # its second call: a kept session
    for _ in range(2):
        ref = model.generate(**inputs, **kwargs)
        eager = FastSampler(prefill="eager", fold=fold)
        want = model.generate(**inputs, **kwargs, custom_generate=eager)
        out = model.generate(**inputs, **kwargs, custom_generate=fused)
        assert fused.last_paths["prefill"] == "fused" and eager.last_paths["prefill"] == "eager"
        assert fused.session.prefill_impl == "triton" and fused.session.fused.fold == (fold == "on")
        assert th.equal(out, ref) and th.equal(want, ref)
        for got, expected in zip(fused.session.cache.keys + fused.session.cache.values,
                                 eager.session.cache.keys + eager.session.cache.values, strict=True):  # fmt: skip
            th.testing.assert_close(got[:, :, :p], expected[:, :, :p], rtol=1e-5, atol=1e-5)
        th.testing.assert_close(fused.last_logprobs[:, 0], eager.last_logprobs[:, 0], rtol=0, atol=1e-5)
        with th.no_grad():  # as training does between calls
            for param in model.model.layers.parameters():
                param.mul_(1.1)
    assert len(calls) == 2 * 2 and fused.stats["failures"] == 0  # both layers, both calls
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)


def test_the_fused_prefill_is_refused_without_the_fused_layers_and_auto_keeps_it_to_cuda(tok, fused_prefill):
    model = tiny_arch(tok, "qwen3")
    kwargs = dict(do_sample=False, max_new_tokens=3, pad_token_id=tok.pad_token_id)
    with pytest.raises(ValueError, match="prefill='fused'.*fuse=False"):
        model.generate(
            **batch(tok, PROMPTS, "cpu"), **kwargs, custom_generate=FastSampler(prefill="fused", fuse=False)
        )
    sampler = FastSampler()  # auto: the fused prefill on CUDA only, transformers' layers on the CPU
    model.generate(**batch(tok, PROMPTS, "cpu"), **kwargs, custom_generate=sampler)
    assert sampler.last_paths["prefill"] == "eager" and sampler.session.prefill_impl is None


def test_a_failing_fused_prefill_under_auto_falls_back_to_transformers_layers_once(tok, fused_prefill, monkeypatch):
    """``prefill="auto"`` (made to pick the fused prefill here, as it does on CUDA): a failure of it is logged once,
    counted, and the same call prefills through transformers' layers (same tokens); later sessions do not try it."""

    def broken(*args, **kwargs):
        raise RuntimeError("out of resources: shared memory")

    monkeypatch.setattr(fused_prefill, "layer_forward", broken)
    model = tiny_arch(tok, "qwen3")
    inputs = batch(tok, PROMPTS, "cpu")
    kwargs = dict(do_sample=False, max_new_tokens=3, pad_token_id=tok.pad_token_id)
    ref = model.generate(**inputs, **kwargs)
    sampler = FastSampler()
    sampler._resolve_prefill = lambda fused, dtype, device: (
        "triton" if fused is not None and sampler._failure["prefill"] is None else None
    )
    assert th.equal(model.generate(**inputs, **kwargs, custom_generate=sampler), ref)
    assert sampler.last_paths["prefill"] == "eager" and sampler.stats["failures"] == 1
    assert "out of resources" in sampler._failure["prefill"]
    sampler.session = None  # a new session: the failed kernels are not tried again
    assert th.equal(model.generate(**inputs, **kwargs, custom_generate=sampler), ref)
    assert sampler.session.prefill_impl is None and sampler.stats["failures"] == 1
    with pytest.raises(RuntimeError, match="out of resources"):  # forced: the failure is raised
        model.generate(**inputs, **kwargs, custom_generate=FastSampler(prefill="fused"))


def launch_signatures(monkeypatch):
    """Record, per launched sampler kernel, the signature Triton compiles it for (``native_specialize_impl``, the
    rule Triton's launcher applies: an int's class is 1, a multiple of 16 or neither, unless the kernel names it in
    ``do_not_specialize``; a tensor's dtype and 16-byte alignment). A new signature is a new compilation on a GPU:
    ~0.5 s of JIT in the middle of a run (12-07 H's step 10). Returns ``{kernel name: [signature per launch]}``."""
    import inspect

    jit = pytest.importorskip("triton.runtime.jit")
    from triton.backends.compiler import BaseBackend

    from rlvr_vocab.sampling import prefill, triton_env

    kernel_class = type(prefill._qkv_kernel)
    seen: dict[str, list] = {}
    original = kernel_class.run

    def run(self, *args, grid, warmup, **kwargs):
        fn = getattr(self, "fn", self)
        params = inspect.signature(fn).parameters
        dns = (self.kwargs if triton_env.interpreted(self) else vars(self)).get("do_not_specialize") or []
        bound = dict(zip(self.arg_names, args, strict=False)) | kwargs  # constexprs come as kwargs
        signature = tuple(
            (name, jit.native_specialize_impl(BaseBackend, value, False, name not in dns, True))
            for name, value in bound.items()
            if name in params and "constexpr" not in str(params[name].annotation)
            and not isinstance(value, (bool, float))
        )  # fmt: skip
        seen.setdefault(fn.__name__, []).append(signature)
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(kernel_class, "run", run)
    return seen


def test_the_samplers_kernels_compile_once_for_every_prompt_length_and_row_count(
    tok, triton_decode, triton_linear, norm_fold, fused_prefill, triton_pick, monkeypatch
):
    """Every Triton path on (the fused prefill, the attention, o / down / gated, the folded norms, the pick): a
    kept session's later call, whose prompt is padded to a multiple of 16 and whose rows end early and are compacted
    to one, launches no kernel with a signature the first call did not compile. Before 12-07: the prefill's
    ``qkv_rope`` kernel was compiled again for prompt lengths that are multiples of 16, the projections for one
    live row."""
    if not hasattr(pytest.importorskip("triton.runtime.jit"), "native_specialize_impl"):
        pytest.skip("this Triton has no native_specialize_impl")
    seen = launch_signatures(monkeypatch)
    model = tiny_arch(tok, "qwen3").to(TRITON_DEVICE)
    first = batch(tok, PROMPTS, TRITON_DEVICE)
    later = tok(PROMPTS, return_tensors="pt", padding=True, pad_to_multiple_of=16).to(TRITON_DEVICE)
    assert first.input_ids.shape[1] % 16 and later.input_ids.shape[1] % 16 == 0
    ends = th.tensor([-1, -1, -1, -1])
    sampler = FastSampler(attention="triton", linear="o+down+gated", fold="on", prefill="fused", pick="triton",
                          force_eos_at=ends, min_rows=1, stop_check_every=2)  # fmt: skip
    kwargs = dict(do_sample=True, top_k=0, max_new_tokens=6, pad_token_id=tok.pad_token_id)
    model.generate(**first, **kwargs, custom_generate=sampler)
    assert sampler.stats["compactions"] == 0 and sampler.last_paths["prefill"] == "fused"
    compiled = {name: set(sigs) for name, sigs in seen.items()}
    assert {"_qkv_kernel", "_split_kernel", "_linear_kernel", "_gated_kernel", "_partial_kernel"} <= set(compiled)
    seen.clear()
    ends[:3] = th.tensor([1, 2, 3])  # rows end after 1, 2 and 3 tokens: compacted from 4 rows to 1
    session = sampler.session
    model.generate(**later, **kwargs, custom_generate=sampler)
    assert sampler.session is session and sampler.stats["compactions"] == 1 and session.state.n == 1
    again = {}  # kernel: the arguments whose class no signature of the first call had
    for name, sigs in seen.items():
        for sig in set(sigs) - compiled.get(name, set()):
            args = {arg for arg, spec in sig if all(dict(old).get(arg) != spec for old in compiled.get(name, ()))}
            again.setdefault(name, set()).update(args or {"(new kernel)"})
    assert not again, f"kernels compiled again mid-run, for these arguments: {again}"


@pytest.mark.parametrize("dtype", [th.float32, th.bfloat16])
def test_the_prefill_kernels_pass_their_check_and_the_check_sees_a_wrong_one(fused_prefill, dtype, monkeypatch):
    device = th.device(TRITON_DEVICE)
    assert fused_prefill.check(dtype, device) is None
    real = fused_prefill.qkv_rope_reference

    def swapped_heads(qkv, *args, **kwargs):  # the reference with the query's heads in the wrong order
        return real(qkv, *args, **kwargs).flip(1)

    monkeypatch.setattr(fused_prefill, "qkv_rope_reference", swapped_heads)
    assert fused_prefill.check(dtype, device).startswith("qkv_rope: relative error")


@pytest.mark.gpu
@pytest.mark.skipif(not th.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attention", ["eager", "auto"])
@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_graphs_are_captured_and_reused(tok, compiled, attention):
    model = tiny_qwen3(tok, "cuda")
    inputs = batch(tok, PROMPTS, "cuda")
    sampler = FastSampler(compile=compiled, attention=attention, window=16)
    kwargs = dict(do_sample=False, max_new_tokens=60, min_new_tokens=60, pad_token_id=tok.pad_token_id)
    ref = model.generate(**inputs, **kwargs)
    out = model.generate(**inputs, **kwargs, custom_generate=sampler)
    s = sampler.session
    assert not s.graphs_failed and sampler.stats["failures"] == 0
    if attention == "eager":
        assert s.attention == "eager" and len(s.graphs) >= 3  # one per 16-slot window
    else:
        assert s.attention == "triton" and list(s.graphs) == [(4, None)]  # one graph serves every length
    graphs = dict(s.graphs)
    again = model.generate(**inputs, **kwargs, custom_generate=sampler)
    assert sampler.session.graphs == graphs, "the second call should replay the same graphs"
    assert th.equal(out, ref) and th.equal(again, ref)
    assert not sampler._compile_failed and (id(model) in sampler._compiled) == compiled


@pytest.mark.gpu
@pytest.mark.skipif(not th.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fold", ["on", "off"])
def test_cuda_programmatic_dependent_launch_decodes_as_generate(tok, fold):
    """``pdl="on"``: the Triton kernels chained with programmatic dependent launch, compiled and captured in CUDA
    graphs, greedy: the tokens of ``generate`` (fp32; every kernel waits for the one before)."""
    if th.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs compute capability 9+")
    model = tiny_arch(tok, "qwen3").to("cuda")
    inputs = batch(tok, PROMPTS, "cuda")
    kwargs = dict(do_sample=False, max_new_tokens=40, min_new_tokens=40, pad_token_id=tok.pad_token_id)
    ref = model.generate(**inputs, **kwargs)
    sampler = FastSampler(pdl="on", fold=fold, linear="o+down", attention="triton")
    out = model.generate(**inputs, **kwargs, custom_generate=sampler)
    assert sampler.last_paths["pdl"] and sampler.stats["replays"] > 30 and sampler.stats["failures"] == 0
    assert th.equal(out, ref)


@pytest.mark.gpu
@pytest.mark.skipif(not th.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_compaction_samples_the_same_tokens(tok, compiled):
    model = tiny_qwen3(tok, "cuda", seed=1)
    boost(model, [tok.eos_token_id], 0.5)
    inputs = batch(tok, [PROMPTS[i % 4] + " x" * (i % 5) for i in range(24)], "cuda")
    plain, off = sample_with(model, inputs, tok, compile=compiled, compaction=False, stop_check_every=2)
    compacted, on = sample_with(model, inputs, tok, compile=compiled, min_rows=1, stop_check_every=2)
    assert on.stats["compactions"] >= 2 and on.stats["failures"] == 0
    assert th.equal(compacted, plain)
    assert on.stats["compiles"] <= 2, "one compiled forward and one compiled pick for every batch size"


# ------------------------------------------------------------------------------------------ end to end
def distinct_chars(completions, **kwargs):
    """A reward that differs between the completions of one prompt, so the policy gradient is not 0."""
    return [float(len(set(c[0]["content"] if isinstance(c, list) else c))) for c in completions]


@pytest.mark.parametrize("n_reasoning", [0, 8])
def test_train_runs_on_the_fast_backend(make_cfg, monkeypatch, n_reasoning):

    from rlvr_vocab.rewards.registry import REWARD_REGISTRY
    from rlvr_vocab.train import train

    calls = []
    original = FastSampler.generate

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FastSampler, "generate", counting)
    monkeypatch.setitem(REWARD_REGISTRY, "distinct_chars", distinct_chars)
    cfg = make_cfg(
        "experiment=debug",
        "training.generation_backend=fast",
        "training.max_completion_length=12",
        "training.num_generations=4",
        f"model.reasoning_vocab_size={n_reasoning}",
        "reward.funcs=[distinct_chars]",
        "reward.weights=[1.0]",
    )
    metrics = train(cfg)
    assert metrics["global_step"] == 2 and len(calls) >= 2
    trained = AutoModelForCausalLM.from_pretrained(cfg.output_dir)
    tok = build_tiny_tokenizer()
    initial = build_tiny_model(cfg.model, tok, th.float32, cfg.seed)
    changed = [
        name
        for name, p in initial.named_parameters()
        if p.shape == trained.get_parameter(name).shape and not th.equal(p, trained.get_parameter(name))
    ]
    assert changed, "no parameter changed in two GRPO steps"


# ----------------------------------------------------------------------------- every sampling path: the mask
MASKED_BACKENDS = {"fast": {"generation_backend": "fast"}, "trl": {"generation_backend": "trl"}}
UNMASKED_SWITCHES = {"trl-continuous-batching": "use_transformers_continuous_batching", "vllm": "use_vllm"}
SPAN_PROMPTS = ["<|im_start|>assistant\n"] * 8 + ["<|im_start|>assistant\n<think>"] * 8


def reasoning_trainer(tok, tmp_path, **kwargs):
    """A trainer whose policy would sample reasoning ids everywhere (and often the closing tag)."""
    model = tiny_llama(tok, seed=5, tied=True)
    vocab = extend_model(model, tok, 40, OmegaConf.structured(ReasoningVocabConfig()))
    boost(model, list(range(vocab.standard_size, vocab.standard_size + vocab.size)), 3.0)
    boost(model, [vocab.close_id], 1.5)  # (a boosted <think> makes this tiny tied model repeat it forever)
    return make_trainer(model, tok, vocab, tmp_path, max_completion_length=32, **kwargs), vocab


@pytest.mark.parametrize("backend", [*MASKED_BACKENDS, *UNMASKED_SWITCHES])
def test_no_reasoning_id_outside_a_span_on_any_sampling_path(tok, tmp_path, backend):
    """Through the trainer's own generation path: masked backends sample reasoning ids inside spans only; the
    switches whose sampler bypasses model.generate are refused, by validate() before any load and by the trainer."""
    from conftest import compose_config

    from rlvr_vocab.config import ConfigError, validate

    if backend in UNMASKED_SWITCHES:
        key = UNMASKED_SWITCHES[backend]
        cfg = compose_config("experiment=debug", "model.reasoning_vocab_size=8", f"+training.extra.{key}=true")
        with pytest.raises(ConfigError, match=rf"training.extra.{key}=true .*does not apply the reasoning-vocabulary"):
            validate(cfg)
        validate(compose_config("experiment=debug", f"+training.extra.{key}=true"))  # fine without reasoning rows
        with pytest.raises(ValueError, match=f"{key}=True .*does not apply the reasoning-vocabulary mask"):
            reasoning_trainer(tok, tmp_path, **{key: True})
        return
    trainer, vocab = reasoning_trainer(tok, tmp_path, **MASKED_BACKENDS[backend])
    th.manual_seed(0)
    prompt_ids, completion_ids, *_ = trainer._generate(SPAN_PROMPTS)
    inside_seen = outside_seen = 0
    for p_ids, c_ids in zip(prompt_ids, completion_ids, strict=True):
        ids = th.tensor(p_ids + c_ids)
        inside = vocab.span_state(ids[None])[0, len(p_ids) - 1 : -1]
        reasoning = ids[len(p_ids) :] >= vocab.standard_size
        assert not (reasoning & ~inside).any(), "a reasoning id was sampled outside the thinking span"
        inside_seen += int((reasoning & inside).sum())
        outside_seen += int((~inside).sum())
    assert inside_seen > 0 and outside_seen > 0, "want reasoning ids inside spans and tokens outside them"
    if backend == "fast":
        assert trainer.fast_sampler.last_used_fast_path


def test_a_sampler_without_the_mask_stops_training(tok, tmp_path):
    """The trainer checks every generation batch: a path that lets a reasoning id through outside a span raises."""
    from rlvr_vocab.reasoning_vocab import reasoning_ids_outside_span

    trainer, vocab = reasoning_trainer(tok, tmp_path, generation_backend="trl")
    del trainer.model.generate  # the plain transformers generate: no ReasoningMaskProcessor
    th.manual_seed(0)
    with pytest.raises(RuntimeError, match="sampled outside the thinking span"):
        trainer._generate(SPAN_PROMPTS)
    ids = tok(SPAN_PROMPTS[0]).input_ids
    assert reasoning_ids_outside_span(
        vocab, [ids, ids], [[vocab.standard_size], [vocab.open_id, vocab.standard_size]]
    ) == [(0, 0)]
