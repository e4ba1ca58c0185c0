"""The fast sampler: same tokens as transformers when greedy, same distribution as TRL when sampling, TRL's EOS
cut, the reasoning mask, an end-to-end GRPO run. Runs on the CPU (eager decode); the same tests run on CUDA
(CUDA-graph decode) where a GPU is present."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_trainer, tiny_llama
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from rlvr_vocab import sampling
from rlvr_vocab.config import ReasoningVocabConfig
from rlvr_vocab.models import build_tiny_model, build_tiny_tokenizer
from rlvr_vocab.reasoning_vocab import extend_model
from rlvr_vocab.sampling import FastSampler, generate_completions

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
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
PROMPTS = [
    "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n",
    "hi",
    "<|im_start|>user\nWhat is 12*3?<|im_end|>\n<|im_start|>assistant\n<think>",
    "abc def",
]


@pytest.fixture(autouse=True)
def no_compile(monkeypatch):
    """CUDA runs of these tests use CUDA graphs without torch.compile (seconds, not minutes); one test compiles."""
    monkeypatch.setattr(sampling, "COMPILE", False)


@pytest.fixture
def tok():
    t = build_tiny_tokenizer()
    t.padding_side = "left"
    return t


def tiny_qwen3(tok, device="cpu", seed=0):
    return build_tiny_model(TINY, tok, torch.float32, seed).to(device).eval()


def boost(model, ids, scale=4.0):
    """Make the given output rows likely (so masks and EOS are exercised by a random model)."""
    with torch.no_grad():
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
def test_greedy_matches_transformers_generate(tok, device, window, extra, monkeypatch):
    monkeypatch.setattr(sampling, "WINDOW", window)  # small windows: many window switches in 40 tokens
    model = tiny_qwen3(tok, device)
    boost(model, [tok.eos_token_id], 2.0)
    inputs = batch(tok, PROMPTS, device)
    kwargs = dict(do_sample=False, max_new_tokens=40, pad_token_id=tok.pad_token_id, **extra)
    ref = model.generate(**inputs, **kwargs)
    sampler = FastSampler()
    out = model.generate(**inputs, **kwargs, custom_generate=sampler)
    assert sampler.last_used_fast_path
    n = min(ref.shape[1], out.shape[1])
    assert torch.equal(out[:, :n], ref[:, :n])
    assert (out[:, n:] == tok.pad_token_id).all() and (ref[:, n:] == tok.pad_token_id).all()


def test_temperature_near_zero_is_greedy(tok):
    model = tiny_qwen3(tok)
    inputs = batch(tok, PROMPTS, "cpu")
    common = dict(max_new_tokens=24, pad_token_id=tok.pad_token_id, custom_generate=FastSampler())
    greedy = model.generate(**inputs, do_sample=False, **common)
    cold = model.generate(**inputs, do_sample=True, temperature=1e-4, top_k=0, **common)
    assert torch.equal(greedy, cold)


def test_unsupported_processor_falls_back_to_transformers(tok):
    model = tiny_qwen3(tok)
    inputs = batch(tok, PROMPTS, "cpu")
    kwargs = dict(do_sample=False, max_new_tokens=24, pad_token_id=tok.pad_token_id, no_repeat_ngram_size=2)
    ref = model.generate(**inputs, **kwargs)
    sampler = FastSampler()
    out = model.generate(**inputs, **kwargs, custom_generate=sampler)
    assert not sampler.last_used_fast_path
    assert torch.equal(out, ref)


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
    torch.manual_seed(0)
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
        attn = torch.cat([mask, torch.ones(len(ids), t, dtype=mask.dtype, device=device)], 1)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, -1].float()
        scores = rec.processors(ids, logits)
        want = scores.log_softmax(-1).gather(1, out[:, p + t, None]).squeeze(1)
        bad = ~torch.isfinite(want) & alive[:, t]
        assert not bad.any(), (
            f"step {t}: rows {bad.nonzero().flatten().tolist()} drew {out[bad, p + t].tolist()} "
            f"(reasoning ids from {vocab.standard_size}, open {vocab.open_id}, close {vocab.close_id}); "
            f"span state {vocab.span_state(ids)[bad, -1].tolist()}, raw logit {logits[bad].gather(1, out[bad, p + t, None]).tolist()}, "
            f"processed {scores[bad].gather(1, out[bad, p + t, None]).tolist()}"
        )
        torch.testing.assert_close(got[alive[:, t], t], want[alive[:, t]], rtol=1e-4, atol=1e-4)


def test_first_token_frequencies_follow_the_processed_softmax(tok):
    """Chi-square test of 6,000 draws of the first token against softmax(processed logits)."""
    model = tiny_qwen3(tok, seed=2)
    prompt = "<|im_start|>user\n7-2?<|im_end|>\n<|im_start|>assistant\n"
    n = 6000
    inputs = batch(tok, [prompt] * n, "cpu")
    rec = Recorder(FastSampler())
    torch.manual_seed(0)
    kwargs = dict(do_sample=True, temperature=0.8, top_k=12, max_new_tokens=1, pad_token_id=tok.pad_token_id)
    out = model.generate(**inputs, **kwargs, custom_generate=rec)
    with torch.no_grad():
        logits = model(**batch(tok, [prompt], "cpu")).logits[:, -1].float()
    probs = rec.processors(inputs.input_ids[:1], logits).softmax(-1)[0]
    counts = torch.bincount(out[:, -1], minlength=probs.numel()).double()
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
    ours, logps = generate_completions(trainer, ids)
    theirs, _ = GRPOTrainer._generate_single_turn(trainer, ids, None, {}, trainer.num_generations)
    assert trainer._fast_sampler.last_used_fast_path and logps is None
    assert ours == theirs
    ended = [c for c in ours if c and c[-1] == tok.eos_token_id]
    assert 0 < len(ended) < len(ours), "want some completions that stop early and some that run to the limit"


def test_sampled_completions_stop_at_first_eos(tok, tmp_path):
    model = tiny_llama(tok, seed=4)
    boost(model, [tok.eos_token_id], 2.5)
    trainer = make_trainer(model, tok, None, tmp_path)
    torch.manual_seed(0)
    completions, _ = generate_completions(trainer, prompt_ids(tok, 16))
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
    torch.manual_seed(0)
    completions, _ = generate_completions(trainer, ids)
    gen_logps = trainer._fast_sampler.last_logprobs
    # rebuild TRL's batch: left-padded prompts, right-padded completions with a mask up to the first EOS
    p = max(len(x) for x in ids)
    c = max(len(x) for x in completions)
    seqs = torch.full((len(ids), p + c), tok.pad_token_id)
    attn = torch.zeros_like(seqs)
    for i, (pi, ci) in enumerate(zip(ids, completions, strict=True)):
        seqs[i, p - len(pi) : p + len(ci)] = torch.tensor(pi + ci)
        attn[i, p - len(pi) : p + len(ci)] = 1
    train_logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, seqs, attn, c)
    keep = attn[:, p:].bool()
    assert keep.sum() >= 20
    torch.testing.assert_close(train_logps[keep], gen_logps[:, :c][keep], rtol=1e-4, atol=1e-4)
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
    torch.manual_seed(1)
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


# ------------------------------------------------------------------------------------------------ CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_graphs_are_captured_and_reused(tok, monkeypatch, compiled):
    monkeypatch.setattr(sampling, "WINDOW", 16)
    model = tiny_qwen3(tok, "cuda")
    inputs = batch(tok, PROMPTS, "cuda")
    sampler = FastSampler(compile=compiled)
    kwargs = dict(do_sample=False, max_new_tokens=60, min_new_tokens=60, pad_token_id=tok.pad_token_id)
    ref = model.generate(**inputs, **kwargs)
    out = model.generate(**inputs, **kwargs, custom_generate=sampler)
    s = sampler.session
    assert not s.graphs_failed and len(s.graphs) >= 3
    graphs = dict(s.graphs)
    again = model.generate(**inputs, **kwargs, custom_generate=sampler)
    assert sampler.session.graphs == graphs, "the second call should replay the same graphs"
    assert torch.equal(out, ref) and torch.equal(again, ref)
    assert not sampler._compile_failed and (id(model) in sampler._compiled) == compiled


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
    initial = build_tiny_model(cfg.model, tok, torch.float32, cfg.seed)
    changed = [
        name
        for name, p in initial.named_parameters()
        if p.shape == trained.get_parameter(name).shape and not torch.equal(p, trained.get_parameter(name))
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
    torch.manual_seed(0)
    prompt_ids, completion_ids, *_ = trainer._generate(SPAN_PROMPTS)
    inside_seen = outside_seen = 0
    for p_ids, c_ids in zip(prompt_ids, completion_ids, strict=True):
        ids = torch.tensor(p_ids + c_ids)
        inside = vocab.span_state(ids[None])[0, len(p_ids) - 1 : -1]
        reasoning = ids[len(p_ids) :] >= vocab.standard_size
        assert not (reasoning & ~inside).any(), "a reasoning id was sampled outside the thinking span"
        inside_seen += int((reasoning & inside).sum())
        outside_seen += int((~inside).sum())
    assert inside_seen > 0 and outside_seen > 0, "want reasoning ids inside spans and tokens outside them"
    if backend == "fast":
        assert trainer._fast_sampler.last_used_fast_path


def test_a_sampler_without_the_mask_stops_training(tok, tmp_path):
    """The trainer checks every generation batch: a path that lets a reasoning id through outside a span raises."""
    from rlvr_vocab.reasoning_vocab import reasoning_ids_outside_span

    trainer, vocab = reasoning_trainer(tok, tmp_path, generation_backend="trl")
    del trainer.model.generate  # the plain transformers generate: no ReasoningMaskProcessor
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="sampled outside the thinking span"):
        trainer._generate(SPAN_PROMPTS)
    ids = tok(SPAN_PROMPTS[0]).input_ids
    assert reasoning_ids_outside_span(
        vocab, [ids, ids], [[vocab.standard_size], [vocab.open_id, vocab.standard_size]]
    ) == [(0, 0)]
