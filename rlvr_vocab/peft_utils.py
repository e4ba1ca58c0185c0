"""LoRA / QLoRA adapters (``model.lora.*``) and the frozen reference policy for the KL term.

Where each piece goes in ``train()``:

    load_kwargs = load_kwargs_for_qlora(cfg.model.lora)       # before from_pretrained (4-bit NF4 base)
    model, tokenizer = load_model_and_tokenizer(...)          # + extend_model(...) for reasoning rows
    ref_model = build_reference_model(model, cfg.training.beta, cfg.model.lora.enabled)   # before PEFT
    if cfg.model.lora.enabled:
        model = apply_lora(model, cfg.model.lora, cfg.model.reasoning_vocab_size)

Reasoning rows under LoRA. The N rows appended by ``extend_model`` are new parameters: a LoRA adapter on
the attention projections alone would leave them at their initial copies forever. Two ways to train them:

* ``trainable_token_indices`` (the default here, PEFT >= 0.15): only the N rows of the input embedding
  (and of an untied output head) are trainable; every other row stays frozen and the adapter stays small.
  With tied embeddings PEFT ties the output head to the same N trainable rows.
* ``model.lora.modules_to_save=[embed_tokens, lm_head]``: the whole embedding and head are trained and
  saved with the adapter (vocab x hidden parameters each; ``ensure_weight_tying`` keeps a tied pair tied).

The reference policy. With ``training.beta > 0`` TRL reloads a reference model from the policy's
``config._name_or_path``, which cannot rebuild a tiny random model, a GGUF-converted model or the extra
reasoning rows. ``build_reference_model`` returns a frozen copy of the policy as it is before training
(rows added, before PEFT) and ``trl_reference_model`` hands it to TRL's GRPOTrainer in place of that reload.
Under PEFT no copy is needed: TRL scores the reference with the adapters disabled, i.e. the base model.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
from collections.abc import Iterator
from typing import Any

import torch as th
from loguru import logger
from omegaconf import DictConfig, OmegaConf

from rlvr_vocab.config import ConfigError


# --------------------------------------------------------------------------------------------- QLoRA
def check_qlora(lora_cfg: DictConfig, model_source: str = "hub") -> None:
    """Raise ConfigError (naming ``model.lora.load_in_4bit``) when 4-bit loading cannot work here."""
    if not lora_cfg.load_in_4bit:
        return
    if not lora_cfg.enabled:
        raise ConfigError(
            "model.lora.load_in_4bit=true needs model.lora.enabled=true: a 4-bit base model can only be trained "
            "through an adapter."
        )
    if model_source == "tiny":
        raise ConfigError("model.lora.load_in_4bit=true: the tiny model is built in code, not loaded; set it false.")
    if not th.cuda.is_available():
        raise ConfigError(
            "model.lora.load_in_4bit=true needs a CUDA GPU (bitsandbytes 4-bit kernels); this machine has none. "
            "Set model.lora.load_in_4bit=false to train a plain LoRA adapter."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            "model.lora.load_in_4bit=true needs bitsandbytes: `pip install -e '.[gpu]'` (or `pip install "
            "bitsandbytes`), or set model.lora.load_in_4bit=false."
        )


def load_kwargs_for_qlora(lora_cfg: DictConfig, model_source: str = "hub") -> dict[str, Any]:
    """``from_pretrained`` kwargs for a QLoRA base model: NF4 weights, double quantisation, bf16 compute.

    Returns ``{}`` when ``model.lora.load_in_4bit`` is false. Raises ConfigError before anything is loaded
    when 4-bit loading cannot work (no CUDA, no bitsandbytes, no adapter, the tiny model).

    Example:
        >>> from omegaconf import OmegaConf
        >>> load_kwargs_for_qlora(OmegaConf.create({"enabled": True, "load_in_4bit": False}))
        {}
    """
    check_qlora(lora_cfg, model_source)
    if not lora_cfg.load_in_4bit:
        return {}
    from accelerate import PartialState
    from transformers import BitsAndBytesConfig

    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=th.bfloat16,
        ),
        # one whole copy per process, on that process's GPU (bitsandbytes places weights at load time)
        "device_map": {"": PartialState().local_process_index},
    }


# ---------------------------------------------------------------------------------------------- LoRA
def _module_name(model, module) -> str | None:
    """The last path component of ``module`` inside ``model`` (what PEFT matches module names against)."""
    for name, candidate in model.named_modules():
        if candidate is module:
            return name.rsplit(".", 1)[-1]
    return None


def _embedding_names(model) -> tuple[str, str | None, bool]:
    """(input embedding name, output head name or None, tied?)."""
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    embed_name = _module_name(model, embed) or "embed_tokens"
    head_name = _module_name(model, head) if head is not None else None
    tied = head is not None and head.weight is embed.weight
    return embed_name, head_name, tied


def reasoning_row_ids(model, reasoning_vocab_size: int) -> list[int]:
    """Ids of the reasoning rows: ``[standard_size, standard_size + N)`` (standard size as extend_model saved it)."""
    if reasoning_vocab_size <= 0:
        return []
    rows = model.get_input_embeddings().weight.size(0)
    info = getattr(model.config, "reasoning_vocab", None) or {}
    standard = info.get("standard_size", rows - reasoning_vocab_size)
    if standard + reasoning_vocab_size != rows:
        raise ConfigError(
            f"model.reasoning_vocab_size={reasoning_vocab_size} but the model has {rows} embedding rows after "
            f"{standard} standard ones: add the reasoning rows (extend_model) before the adapter."
        )
    return list(range(standard, rows))


def lora_config(model, lora_cfg: DictConfig, reasoning_vocab_size: int = 0):
    """The ``peft.LoraConfig`` for ``model.lora.*``, with the reasoning rows trainable when N > 0.

    Reasoning rows become trainable through ``trainable_token_indices`` unless the embedding (and, when
    untied, the head) are already fully trained via ``model.lora.modules_to_save``.
    """
    from peft import LoraConfig

    cfg = OmegaConf.to_container(lora_cfg, resolve=True) if isinstance(lora_cfg, DictConfig) else dict(lora_cfg)
    targets = list(cfg.get("target_modules") or [])
    if not targets:
        raise ConfigError("model.lora.target_modules is empty: name the modules to adapt, e.g. [q_proj, v_proj].")
    target_modules: list[str] | str = "all-linear" if targets == ["all-linear"] else targets
    modules_to_save = list(cfg.get("modules_to_save") or [])

    embed_name, head_name, tied = _embedding_names(model)
    saved = set(modules_to_save)
    trainable_tokens: dict[str, list[int]] = {}
    ids = reasoning_row_ids(model, reasoning_vocab_size)
    if ids:
        if embed_name not in saved:
            trainable_tokens[embed_name] = ids  # PEFT ties a tied head to these rows
        if head_name is not None and not tied and head_name not in saved:
            trainable_tokens[head_name] = ids
        if trainable_tokens:
            logger.info(f"LoRA: reasoning rows {ids[0]}..{ids[-1]} trainable in {sorted(trainable_tokens)}")
    return LoraConfig(
        r=cfg.get("r", 16),
        lora_alpha=cfg.get("alpha", 32),
        lora_dropout=cfg.get("dropout", 0.0),
        target_modules=target_modules,
        modules_to_save=modules_to_save or None,
        trainable_token_indices=trainable_tokens or None,
        # fully trained embedding + head copies stay tied when the model ties them
        ensure_weight_tying=tied and bool(saved & {embed_name, head_name}),
        bias="none",
        task_type="CAUSAL_LM",
    )


def apply_lora(model, lora_cfg: DictConfig, reasoning_vocab_size: int = 0):
    """Wrap ``model`` in a LoRA adapter (``peft.get_peft_model``); the base weights are frozen.

    Call after the reasoning rows are added. A 4-bit base (QLoRA) is first prepared for k-bit training
    (norms in fp32, input gradients on). Returns the ``PeftModel``.
    """
    from peft import get_peft_model, prepare_model_for_kbit_training

    config = lora_config(model, lora_cfg, reasoning_vocab_size)
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    peft_model = get_peft_model(model, config)
    trainable, total = peft_model.get_nb_trainable_parameters()
    logger.info(f"LoRA r={config.r}: {trainable / 1e6:.2f}M trainable of {total / 1e6:.1f}M parameters")
    return peft_model


# ---------------------------------------------------------------------------------- reference model
def build_reference_model(model, beta: float, lora_enabled: bool = False):
    """A frozen copy of the policy as the KL reference, or None when none is needed.

    None when ``beta == 0`` (no KL term: nothing is loaded) or under LoRA (TRL disables the adapters to
    score the reference). Call after the reasoning rows are added and before the adapter is applied.
    """
    if beta == 0.0 or lora_enabled:
        return None
    ref = copy.deepcopy(model)
    ref.__dict__.pop("generate", None)  # a masked generate patched onto the policy would point at the policy
    ref.eval()
    ref.requires_grad_(False)
    return ref


@contextlib.contextmanager
def trl_reference_model(ref_model) -> Iterator[None]:
    """While constructing a GRPOTrainer, make TRL use ``ref_model`` instead of reloading ``_name_or_path``.

    TRL 1.16 builds its reference with ``create_model_from_path(config._name_or_path)`` and then applies
    dropout removal, the fp32 head cast, its fused log-prob head and ``accelerator.prepare`` to it; only that
    one load is replaced, so the rest of TRL's handling stays as it is. With ``ref_model=None`` this does nothing.
    """
    if ref_model is None:
        yield
        return
    import trl.trainer.grpo_trainer as grpo_module

    original = grpo_module.create_model_from_path

    def from_policy(model_id, *args, **kwargs):
        logger.info("Reference model: a frozen copy of the initial policy (not reloaded from its path)")
        return ref_model

    grpo_module.create_model_from_path = from_policy
    try:
        yield
    finally:
        grpo_module.create_model_from_path = original
