"""Compose the real conf/ with tiny overrides; each test gets its own output folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GSM8K_DIR = REPO / "data" / "gsm8k"  # shipped with the repo (MIT, LICENSE beside it)
# One conversion cache per checkout (the GGUF is de-quantised once, ~30 s, then reused by every test).
CACHE_DIR = REPO / ".cache"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs 2 workers on 2 cores: one compute thread each (their
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # subprocesses too), or OpenMP's spinning threads oversubscribe them
if "TRITON_INTERPRET" not in os.environ:  # no GPU: Triton kernels (where installed) run in Triton's CPU interpreter,
    import torch as th  # which must be chosen before anything imports Triton

    if not th.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import rlvr_vocab.config  # noqa: E402,F401  (registers the schema)


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``--dist loadgroup``) the tests on the one Slurm cluster run on one worker, one at a time:
    the two-node jobs need both nodes, and the time-limit tests wait for their own job to start again."""
    for item in items:
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm"))


def compose_config(*overrides: str):
    """The composed config as grpo_train.py would see it (without running Hydra's app)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


def cached_config(*overrides: str):
    """compose_config with the shared conversion cache (the tools' tests: no output dir)."""
    return compose_config(f"paths.cache_dir={CACHE_DIR}", *overrides)


def tiny_llama(tokenizer, tied: bool = False, seed: int = 0):
    """A random 2-layer Llama over the tokenizer's vocabulary (tied or untied head), in eval mode."""
    import torch as th
    from transformers import AutoModelForCausalLM, LlamaConfig

    th.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return AutoModelForCausalLM.from_config(config).eval()


def digit_share(completions, **kwargs) -> list[float]:
    """A reward that varies across a random model's completions (accuracy is 0 for all: no advantage)."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]


def logged_steps(trainer_state: dict) -> list[int]:
    """The optimizer steps that logged a loss in a ``trainer_state.json`` (``log_history``)."""
    return [entry["step"] for entry in trainer_state["log_history"] if "loss" in entry]


def make_trainer(model, tokenizer, vocab, tmp_path, **kwargs):
    """An RLVRGRPOTrainer on a 4-row dataset with a zero reward (for log-prob and generation tests).

    ``kwargs`` override the RLVRGRPOConfig fields (default: CPU, fp32, batch 4, 2 generations, 24 tokens, fast).
    """
    from datasets import Dataset

    from rlvr_vocab.trainer import RLVRGRPOConfig, RLVRGRPOTrainer, checkpointing_field

    def zero(completions, **_):
        return [0.0] * len(completions)

    settings = {
        "output_dir": str(tmp_path / "t"),
        "use_cpu": True,
        "bf16": False,
        "per_device_train_batch_size": 4,
        "num_generations": 2,
        "max_completion_length": 24,
        "report_to": "none",
        "generation_backend": "fast",
        checkpointing_field(): True,  # GRPOConfig's default, by the name this transformers takes without a warning
    }
    args = RLVRGRPOConfig(**{**settings, **kwargs})
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": "1+1?"}]}] * 4)
    return RLVRGRPOTrainer(
        model=model,
        reward_funcs=[zero],
        args=args,
        train_dataset=ds,
        processing_class=tokenizer,
        reasoning_vocab=vocab,
    )


def config_trainer(cfg, model, tokenizer, vocab, ref_model=None, use_cpu: bool = True):
    """The trainer as train.py builds it from a composed config (its data and GRPOConfig), with the digit_share reward.

    ``ref_model``: the KL reference handed to TRL in place of its reload (peft_utils.build_reference_model).
    """
    from rlvr_vocab.data import load_datasets
    from rlvr_vocab.peft_utils import trl_reference_model
    from rlvr_vocab.trainer import RLVRGRPOConfig, RLVRGRPOTrainer, grpo_config_kwargs

    funcs, weights = [digit_share], [1.0]
    train_ds, _ = load_datasets(cfg)
    kwargs = grpo_config_kwargs(cfg)
    kwargs["bf16"] = bool(cfg.training.bf16)
    args = RLVRGRPOConfig(
        output_dir=cfg.output_dir, report_to="none", reward_weights=weights, use_cpu=use_cpu, **kwargs
    )
    with trl_reference_model(ref_model):
        return RLVRGRPOTrainer(
            model=model,
            reward_funcs=funcs,
            args=args,
            train_dataset=train_ds,
            processing_class=tokenizer,
            reasoning_vocab=vocab,
        )


@pytest.fixture
def make_cfg(tmp_path):
    """compose_config with output_dir in tmp_path and the shared conversion cache."""

    def _make(*overrides: str):
        return cached_config(f"output_dir={tmp_path / 'run'}", *overrides)

    return _make


@pytest.fixture
def gsm8k_dir():
    if not (GSM8K_DIR / "test.jsonl").is_file():
        pytest.skip(f"GSM8K files not found at {GSM8K_DIR} (data/gsm8k in the repo)")
    return GSM8K_DIR
