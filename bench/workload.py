"""The benchmarks' shared workload: the Qwen3-0.6B shape, its tokenizer and prompts, and the sampler's options.

Every benchmark builds its model from a config with random weights (no download). The sampler's optional
features (``attention=``, the forced-EOS hook, ``stats``) are detected, so the scripts also run against a
sampler that lacks them and say what they skipped.
"""

from __future__ import annotations

import inspect
import json
import os
import random
import statistics
import time
from pathlib import Path

QWEN3_06B = dict(  # Qwen/Qwen3-0.6B's config.json, minus the weights
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151936,
    tie_word_embeddings=True,
    max_position_embeddings=40960,
    rope_theta=1000000,
    rms_norm_eps=1e-6,
)
TINY = dict(  # a 2-layer model of the same family, for CPU smoke tests
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8
)
VOCAB = QWEN3_06B["vocab_size"]
TINY_VOCAB = 512  # vocabulary of the tiny CPU runs (the full one makes a 2-layer model slow for nothing)
PROMPT_TOKENS = (48, 80)  # prompt length range (words), varied so that prompts are left-padded
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# Dense bf16 tensor-core peaks from the vendors' data sheets (FLOP/s, without sparsity), by device-name part.
STATED_BF16_PEAK = {"H200": 989e12, "H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12}


# ------------------------------------------------------------------------------------------ model and data
def build_tokenizer(vocab_size: int):
    """A word-level tokenizer with one token per model row ('t0' ... ), ChatML specials and think tags."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size - len(SPECIALS))}
    vocab.update({tok: vocab_size - len(SPECIALS) + i for i, tok in enumerate(SPECIALS)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>", "<think>", "</think>"],
    )
    tok.padding_side = "left"
    return tok


def build_model(tok, seed: int = 0, tiny: bool = False, device: str | None = None, dtype=None, **overrides):
    """Qwen3-0.6B's shape with random weights (bf16 on the GPU) or, with ``tiny``, a 2-layer model (fp32, CPU).

    ``overrides`` replace config fields (e.g. ``num_hidden_layers``); the vocabulary is the tokenizer's.
    """
    import torch as th
    from transformers import AutoModelForCausalLM, Qwen3Config

    shape = {**QWEN3_06B, **(TINY if tiny else {}), "vocab_size": len(tok), **overrides}
    config = Qwen3Config(**shape, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    th.manual_seed(seed)
    if device is None:
        device = "cpu" if tiny or not th.cuda.is_available() else "cuda"
    if dtype is None:
        dtype = th.bfloat16 if device.startswith("cuda") else th.float32
    with th.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")


def problem_words(rng: random.Random, vocab_size: int, lengths: tuple[int, int] = PROMPT_TOKENS) -> str:
    """48-80 (``lengths``) random word tokens (one token each), the text of one prompt."""
    length = rng.randint(*lengths)
    top = max(vocab_size - len(SPECIALS), 2)
    return " ".join(f"t{rng.randrange(min(100, top - 1), top)}" for _ in range(length))


def prompt_words(rng: random.Random, vocab_size: int, lengths: tuple[int, int] = PROMPT_TOKENS) -> str:
    """One prompt of 48-80 random word tokens in ChatML, ending in an open ``<think>`` span."""
    return f"<|im_start|> {problem_words(rng, vocab_size, lengths)} <|im_end|> <|im_start|> <think>"


def build_prompts(
    n: int, seed: int = 0, vocab_size: int = VOCAB, chat: bool = True, lengths: tuple[int, int] = PROMPT_TOKENS
) -> list[str]:
    """``n`` prompts of random tokens below ``vocab_size`` (left-padded when batched: lengths differ).

    ``chat=False``: the words alone (for a dataset whose prompts the chat template wraps). ``lengths``: the
    range of word tokens per prompt; ``(80, 80)`` makes every prompt, and so every step's padded length, the same.
    """
    rng = random.Random(seed)
    make = prompt_words if chat else problem_words
    return [make(rng, vocab_size, lengths) for _ in range(n)]


def build_dataset(n: int, seed: int = 0, vocab_size: int = VOCAB, lengths: tuple[int, int] = PROMPT_TOKENS):
    """A datasets.Dataset of ``n`` prompts (the GRPO benchmark's training data)."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": p} for p in build_prompts(n, seed, vocab_size, lengths=lengths)])


def random_reward(completions, **kwargs):
    """A reward of random numbers (the benchmark measures speed, not learning)."""
    return [random.random() for _ in completions]


# ------------------------------------------------------------------------------------------ the sampler
def sampler_options(sampler=None) -> dict[str, bool]:
    """Which optional features this checkout's FastSampler has (from its signature and an instance's attributes)."""
    from rlvr_vocab.sampling import FastSampler

    params = inspect.signature(FastSampler.__init__).parameters
    instance = sampler if sampler is not None else FastSampler()
    if sampler is not None:  # a given sampler (or stand-in) says what it has
        params = {}
    return {
        "attention": "attention" in params or hasattr(instance, "attention"),
        "fuse": "fuse" in params or hasattr(instance, "fuse"),
        "pick": "pick" in params or hasattr(instance, "pick"),
        "linear": "linear" in params or hasattr(instance, "linear"),
        "fold": "fold" in params or hasattr(instance, "fold"),
        "pdl": "pdl" in params or hasattr(instance, "pdl"),
        "prefill": "prefill" in params or hasattr(instance, "prefill"),
        "force_eos_at": "force_eos_at" in params or hasattr(instance, "force_eos_at"),
        "logits_hook": "logits_hook" in params or hasattr(instance, "logits_hook"),
        "stats": isinstance(getattr(instance, "stats", None), dict),
    }


def make_sampler(reasoning_vocab=None, compile: bool | None = None, attention: str | None = None, **options):
    """A FastSampler; ``attention`` and ``options`` (``fuse``, ``pick``) are passed only where the sampler takes
    them (ValueError if not)."""
    from rlvr_vocab.sampling import FastSampler

    kwargs = {"reasoning_vocab": reasoning_vocab, "compile": compile}
    have = sampler_options()
    for name, value in [("attention", attention), *options.items()]:
        if value is None:
            continue
        if not have.get(name):
            raise ValueError(f"this FastSampler has no {name}= option (asked for {name}={value!r})")
        kwargs[name] = value
    return FastSampler(**kwargs)


def session_paths(sampler) -> dict:
    """What the sampler's last call ran (``last_paths``: attention, pick, projections, folded norms), or, for a
    sampler without it, what its session holds; empty when neither says."""
    paths = getattr(sampler, "last_paths", None)
    if isinstance(paths, dict) and paths:
        return dict(paths)
    session = getattr(sampler, "session", None)
    names = ("attention", "pick", "linear")
    return {n: getattr(session, n) for n in names if hasattr(session, n)} if session is not None else {}


def sampler_stats(sampler) -> dict:
    """The sampler's counters (captures, compiles, compactions, fallbacks), or what can be read without them."""
    if sampler is None:
        return {}
    stats = getattr(sampler, "stats", None)
    if isinstance(stats, dict):
        return {k: v for k, v in stats.items() if isinstance(v, (int, float, bool, str))}
    session = getattr(sampler, "session", None)
    graphs = getattr(session, "graphs", None)
    return {
        "graphs_held": len(graphs) if graphs is not None else 0,
        "compile_failed": bool(getattr(sampler, "_compile_failed", False)),
    }


def stats_delta(before: dict, after: dict) -> dict:
    """Numeric counters that changed between two ``sampler_stats`` readings.

    Example:
        >>> stats_delta({"captures": 3, "compiles": 1}, {"captures": 5, "compiles": 1, "fallbacks": 0})
        {'captures': 2}
    """
    out = {}
    for k, v in after.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v != before.get(k, 0):
            out[k] = v - before.get(k, 0)
    return out


def force_eos(sampler, lengths, eos_id: int) -> str | None:
    """Make row i of the next calls end with EOS as its ``lengths[i]``-th token; the hook used, None if none.

    Uses the sampler's ``force_eos_at`` (a LongTensor [B]) or, failing that, its ``logits_hook``
    (``hook(step, scores) -> scores``, step = index of the token being sampled, graph-safe here).
    ``lengths=None`` removes the hook.
    """
    import torch as th

    options = sampler_options(sampler)
    if options["force_eos_at"]:
        # the sampler takes the 0-based index of the EOS token: length - 1
        sampler.force_eos_at = None if lengths is None else th.as_tensor(lengths, dtype=th.long) - 1
        return "force_eos_at"
    if options["logits_hook"]:
        if lengths is None:
            sampler.logits_hook = None
            return "logits_hook"
        cache: dict = {}

        def hook(step, scores):
            device = scores.device
            if device not in cache:
                cache[device] = th.as_tensor(lengths, dtype=th.long, device=device) - 1
            due = (cache[device] == th.as_tensor(step, device=device)).unsqueeze(1)
            keep = th.zeros(scores.shape[-1], dtype=th.bool, device=device)
            keep[eos_id] = True
            return scores.masked_fill(due & ~keep, float("-inf")).masked_fill(due & keep, 0.0)

        sampler.logits_hook = hook
        return "logits_hook"
    return None


def spread_lengths(batch: int, max_tokens: int, low: float = 0.1, seed: int = 0) -> list[int]:
    """Completion lengths spread uniformly from ``low`` x max to max over ``batch`` rows, in random order.

    Example:
        >>> sorted(spread_lengths(4, 100))
        [10, 40, 70, 100]
    """
    if batch == 1:
        return [max_tokens]
    step = (1 - low) * max_tokens / (batch - 1)
    lengths = [max(1, round(low * max_tokens + i * step)) for i in range(batch)]
    random.Random(seed).shuffle(lengths)
    return lengths


def completion_lengths(completions, eos_ids: list[int]) -> list[int]:
    """Tokens of each completion row up to and including its first EOS (the whole row without one).

    Example:
        >>> import torch as th
        >>> completion_lengths(th.tensor([[5, 2, 0], [5, 6, 7]]), [2])
        [2, 3]
    """
    import torch as th

    is_eos = th.isin(completions, th.tensor(eos_ids, device=completions.device))
    has = is_eos.any(1)
    first = th.where(has, is_eos.int().argmax(1) + 1, th.full_like(has, completions.shape[1], dtype=th.long))
    return [int(x) for x in first.tolist()]


# ------------------------------------------------------------------------------------------ small helpers
def median(xs: list[float]) -> float | None:
    """The median, or None for no values.

    Example:
        >>> median([3.0, 1.0, 2.0, 10.0])
        2.5
    """
    return statistics.median(xs) if xs else None


def stated_peak(device_name: str) -> float | None:
    """The data-sheet dense bf16 peak (FLOP/s) for a device name, None when unknown.

    Example:
        >>> stated_peak("NVIDIA H200") / 1e12
        989.0
    """
    for key, value in STATED_BF16_PEAK.items():
        if key in device_name:
            return value
    return None


def write_json(path: str | os.PathLike, data) -> None:
    """Write JSON atomically (a reader never sees half a file, a killed writer leaves the previous one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def deadline_left(deadline: float | None) -> float:
    """Seconds left before a unix-time deadline (infinite without one)."""
    return float("inf") if deadline is None else deadline - time.time()


def timed(sync, fn, **kwargs):
    """(fn(**kwargs), seconds), bracketed by ``sync()`` (``torch.cuda.synchronize`` on the GPU)."""
    sync()
    t0 = time.perf_counter()
    out = fn(**kwargs)
    sync()
    return out, time.perf_counter() - t0
