"""Load a trained policy and generate from it: what rlvr-eval and rlvr-infer share.

``load_policy`` accepts whatever a run leaves behind: a hub id or local model folder, a run's
``checkpoint-N`` or final folder, a folder holding a reasoning vocabulary (``reasoning_vocab.json``:
its rows and the masked ``generate`` come back), or a LoRA adapter folder (``adapter_config.json``: the
configured ``model=`` is loaded as the base, the adapter is put on top and merged).

``generate`` runs batched, left-padded ``model.generate`` over chat prompts, greedy or sampled, and
returns the decoded completions (reasoning ids read as their source tokens) with their token counts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch as th
from loguru import logger
from omegaconf import DictConfig, OmegaConf

from rlvr_vocab.checkpoints import is_model_dir
from rlvr_vocab.config import ConfigError, parse_think
from rlvr_vocab.thinking import (
    CompletionSpan,
    SpanTags,
    apply_think_mode,
    ends_inside,
    find_tags,
    setup_span,
    split_completion,
)

PROBE_PROMPT = [{"role": "user", "content": "What is 1 + 1?"}]  # rendered to see where the generation prompt ends
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")  # read from model.generation_kwargs


# ------------------------------------------------------------------------------------------ loading
def _device() -> th.device:
    return th.device("cuda" if th.cuda.is_available() else "cpu")


def _dtype() -> th.dtype:
    from rlvr_vocab.models import bf16_supported

    return th.bfloat16 if bf16_supported() else th.float32


def _add_rows_from_map(model, tokenizer, vocab) -> None:
    """Give a freshly loaded base model the reasoning rows of a saved map (before its adapter is loaded).

    The adapter holds the trained rows (trainable tokens or full embedding copies), so only the shape, the
    tags and the masked ``generate`` matter here; the rows start as copies of their sources as in training.
    """
    from rlvr_vocab.reasoning_vocab import attach_generation_mask, extend_model
    from rlvr_vocab.thinking import add_tag_tokens

    reasoning_cfg = OmegaConf.create({"init": "first_n", "repeat_policy": "cycle"})
    tags = add_tag_tokens(tokenizer, model, vocab.think_open, vocab.think_close)
    built = extend_model(model, tokenizer, vocab.size, reasoning_cfg, tags)
    if built.standard_size != vocab.standard_size:
        raise ConfigError(
            f"The adapter's reasoning_vocab.json starts reasoning ids at {vocab.standard_size} but the base model "
            f"has {built.standard_size} rows: pass the model= the adapter was trained on."
        )
    with th.no_grad():  # rows as the run started them (matters only for rows the adapter does not hold)
        for i, source in enumerate(vocab.source_ids):
            model.get_input_embeddings().weight[vocab.standard_size + i] = model.get_input_embeddings().weight[source]
            out = model.get_output_embeddings()
            if out is not None and out.weight is not model.get_input_embeddings().weight:
                out.weight[vocab.standard_size + i] = out.weight[source]
    attach_generation_mask(model, vocab)


def _load_adapter(cfg: DictConfig, path: Path):
    from peft import PeftModel
    from transformers import AutoTokenizer

    from rlvr_vocab.models import load_model_and_tokenizer, prepare_tokenizer, resolve_bf16
    from rlvr_vocab.reasoning_vocab import ReasoningVocab

    adapter = json.loads((path / "adapter_config.json").read_text())
    base_id = adapter.get("base_model_name_or_path") or ""
    if cfg.model.source == "hub" and base_id and base_id != cfg.model.name_or_path:
        logger.warning(
            f"{path} was trained on {base_id!r} but model.name_or_path={cfg.model.name_or_path!r} is loaded as the base"
        )
    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.paths.cache_dir, bf16=resolve_bf16(None), seed=cfg.seed)
    if (path / "tokenizer_config.json").is_file():
        tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(path), cfg.model)
    vocab = ReasoningVocab.load(path)
    if vocab is not None:
        _add_rows_from_map(model, tokenizer, vocab)
    model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    model.reasoning_vocab = vocab
    return model, tokenizer


def load_policy(cfg: DictConfig, path: str | Path | None = None):
    """(model, tokenizer) on this machine's device, in eval mode.

    Args:
        cfg: the composed config; ``model=`` is what loads when ``path`` is None, and the base of an adapter.
        path: a hub id, a model or checkpoint folder, or a LoRA adapter folder (None: the configured model).
    """
    from rlvr_vocab.models import load_model_and_tokenizer, prepare_tokenizer, resolve_bf16
    from rlvr_vocab.reasoning_vocab import extend_model, load_checkpoint

    if path is None:
        model, tokenizer = load_model_and_tokenizer(
            cfg.model, cfg.paths.cache_dir, bf16=resolve_bf16(None), seed=cfg.seed
        )
        n = cfg.model.reasoning_vocab_size
        span = setup_span(model, tokenizer, cfg.model, cfg.dataset.think, n, PROBE_PROMPT)  # as training starts
        model.reasoning_vocab = None
        if n > 0:  # the untrained extension (what checkpoint-0 holds)
            model.reasoning_vocab = extend_model(model, tokenizer, n, cfg.model.reasoning, span.tags)
    elif (Path(path) / "adapter_config.json").is_file():
        model, tokenizer = _load_adapter(cfg, Path(path))
    else:
        if Path(path).exists() and not is_model_dir(path):
            raise ConfigError(
                f"eval.model_path={str(path)!r} holds neither a model (config.json) nor a LoRA adapter "
                "(adapter_config.json) nor checkpoint-N folders."
            )
        model, tokenizer = load_checkpoint(path, dtype=_dtype())
        tokenizer = prepare_tokenizer(tokenizer, cfg.model)
        if (
            parse_think(cfg.dataset.think) is True
            and find_tags(tokenizer, cfg.model.think_open, cfg.model.think_close) is None
        ):
            raise ConfigError(
                f"dataset.think=true but {path} has no {cfg.model.think_open!r} token: evaluate it with dataset.think=auto."
            )
        apply_think_mode(tokenizer, cfg.dataset.think, cfg.model.think_open)  # a run's saved template stays as it is
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.span_tags = find_tags(tokenizer, cfg.model.think_open, cfg.model.think_close)
    model.to(_device()).eval()
    return model, tokenizer


# ------------------------------------------------------------------------------------------ generation
@dataclass
class Completion:
    """One generated completion."""

    text: str  # decoded, special tokens dropped, reasoning ids read as their source tokens
    num_tokens: int  # generated tokens, the end-of-sequence token included
    truncated: bool  # stopped by max_new_tokens before an end-of-sequence token
    answer: str | None = None  # the text after its thinking span (the whole text without one; None: unclosed)
    span: CompletionSpan | None = None  # where its thinking span is (None: the tokenizer has no span tags)
    ids: list[int] | None = None  # its token ids up to the end-of-sequence token (reasoning ids as they are)


def sampling_kwargs(model_cfg: DictConfig) -> dict[str, Any]:
    """The sampling settings of ``model.generation_kwargs`` (temperature, top_p, top_k, ...) that generate takes."""
    gen = OmegaConf.to_container(model_cfg.generation_kwargs, resolve=True) or {}
    kwargs = {k: gen[k] for k in SAMPLING_KEYS if gen.get(k) is not None}
    if kwargs.get("top_k") == 0:  # 0 means off in our configs; transformers wants None
        kwargs.pop("top_k")
    return kwargs


def render_prompts(tokenizer, prompts: list) -> list[str]:
    """Chat prompts (lists of messages) through the chat template with the generation prompt; text as is."""
    return [
        p if isinstance(p, str) else tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]


def _eos_ids(model, tokenizer) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.insert(0, tokenizer.eos_token_id)
    return ids


@th.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list,
    max_new_tokens: int,
    num_samples: int = 1,
    do_sample: bool = False,
    sampling: dict[str, Any] | None = None,
    batch_size: int = 16,
    seed: int | None = None,
    progress: bool = True,
    desc: str = "generate",
    tags: SpanTags | None = None,
) -> list[list[Completion]]:
    """``num_samples`` completions per prompt, in prompt order.

    Args:
        prompts: chat prompts (lists of messages) or already templated strings.
        do_sample: False: greedy (``num_samples`` must be 1); True: sample with ``sampling`` (temperature, ...).
        batch_size: sequences per ``generate`` call (prompts x samples); prompts are grouped by length.
        seed: seeds torch before sampling, so a run is reproducible.
        tags: the thinking-span tags: each completion's answer is then what follows its span.
    """
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    if num_samples > 1 and not do_sample:
        raise ValueError("greedy decoding gives one completion per prompt: pass do_sample=True for num_samples > 1")
    if seed is not None:
        th.manual_seed(seed)
    eos_ids = _eos_ids(model, tokenizer)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        num_return_sequences=num_samples,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos_ids,
        **((sampling or {}) if do_sample else {}),
    )
    vocab = getattr(model, "reasoning_vocab", None)
    tokenizer.padding_side = "left"
    texts = render_prompts(tokenizer, prompts)
    encoded = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))  # similar lengths share a batch: less padding
    per_call = max(1, batch_size // num_samples)
    results: list[list[Completion] | None] = [None] * len(texts)
    device = next(model.parameters()).device
    bar = tqdm(total=len(texts), desc=desc, unit="prompt", disable=not progress)
    for start in range(0, len(order), per_call):
        idx = order[start : start + per_call]
        batch = tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt").to(device)
        out = model.generate(**batch, generation_config=config)
        completions = out[:, batch["input_ids"].size(1) :].tolist()
        for j, i in enumerate(idx):
            inside = tags is not None and ends_inside(encoded[i], tags.open_id, tags.close_id)
            results[i] = [
                _decode(tokenizer, vocab, ids, eos_ids, tags, inside)
                for ids in completions[j * num_samples : (j + 1) * num_samples]
            ]
        bar.update(len(idx))
    bar.close()
    return results  # type: ignore[return-value]


def _decode(tokenizer, vocab, ids: list[int], eos_ids: list[int], tags=None, prompt_inside=False) -> Completion:
    end = next((k for k, t in enumerate(ids) if t in eos_ids), None)
    kept = ids if end is None else ids[:end]

    def text_of(part: list[int]) -> str:
        return vocab.decode(tokenizer, part) if vocab is not None else tokenizer.decode(part, skip_special_tokens=True)

    span = split_completion(kept, tags, prompt_inside) if tags is not None else None
    start = 0 if span is None else span.answer_start
    return Completion(
        text=text_of(kept),
        num_tokens=len(ids) if end is None else end + 1,
        truncated=end is None,
        answer=None if start is None else (text_of(kept) if start == 0 else text_of(kept[start:])),
        span=span,
        ids=kept,
    )
