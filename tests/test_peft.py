"""LoRA / QLoRA adapters and the KL reference model, on the tiny model (CPU)."""

from __future__ import annotations

import inspect

import pytest
import torch as th
from conftest import config_trainer
from omegaconf import OmegaConf

from rlvr_vocab.config import ConfigError
from rlvr_vocab.models import CHATML_TEMPLATE, load_model_and_tokenizer
from rlvr_vocab.peft_utils import (
    apply_lora,
    build_reference_model,
    check_qlora,
    load_kwargs_for_qlora,
    lora_config,
    trl_reference_model,
)

LORA = ("model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8", "model.lora.dropout=0.0")
GRPO = (
    "training.max_steps=2",
    "training.num_generations=2",
    "training.per_device_train_batch_size=4",
    "training.max_completion_length=8",
    "training.learning_rate=1e-2",
    "training.save_strategy=no",
    "training.bf16=false",
    "dataset.max_train_samples=8",
    "dataset.generator.num_train=32",
    "dataset.generator.num_eval=8",
)


def _tiny(cfg):
    from rlvr_vocab.reasoning_vocab import extend_model

    model, tok = load_model_and_tokenizer(cfg.model, cfg.paths.cache_dir, bf16=False, seed=cfg.seed)
    vocab = None
    if cfg.model.reasoning_vocab_size:
        vocab = extend_model(model, tok, cfg.model.reasoning_vocab_size, cfg.model.reasoning)
        # open the thinking span in the generation prompt (as Qwen3's template does), so reasoning rows are used
        tok.chat_template = CHATML_TEMPLATE.replace("assistant\n' }}", "assistant\n<think>' }}")
        assert tok.chat_template != CHATML_TEMPLATE
    return model, tok, vocab


def _snapshot(model, trainable: bool):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad == trainable}


# ------------------------------------------------------------------------------------------- config
def test_lora_config_makes_reasoning_rows_trainable_tied(make_cfg):
    cfg = make_cfg("model=tiny", "model.reasoning_vocab_size=4", *LORA)
    model, _, vocab = _tiny(cfg)
    config = lora_config(model, cfg.model.lora, 4)
    ids = list(range(vocab.standard_size, vocab.standard_size + 4))
    assert config.trainable_token_indices == {"embed_tokens": ids}  # a tied head follows the embedding
    assert (
        config.r == 4
        and config.lora_alpha == 8
        and set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    )


def test_lora_config_untied_head_and_modules_to_save(make_cfg):
    cfg = make_cfg("model=tiny", "model.tiny.tie_word_embeddings=false", "model.reasoning_vocab_size=3", *LORA)
    model, _, vocab = _tiny(cfg)
    ids = list(range(vocab.standard_size, vocab.standard_size + 3))
    assert lora_config(model, cfg.model.lora, 3).trainable_token_indices == {"embed_tokens": ids, "lm_head": ids}
    cfg.model.lora.modules_to_save = ["embed_tokens", "lm_head"]
    config = lora_config(model, cfg.model.lora, 3)
    assert config.trainable_token_indices is None and set(config.modules_to_save) == {"embed_tokens", "lm_head"}


def test_lora_without_reasoning_rows_trains_only_the_adapter(make_cfg):
    cfg = make_cfg("model=tiny", *LORA)
    model, _, _ = _tiny(cfg)
    peft_model = apply_lora(model, cfg.model.lora, 0)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


# ------------------------------------------------------------------------------------------- QLoRA
def test_qlora_is_a_clear_config_error_without_cuda(make_cfg):
    if th.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = make_cfg("model=qwen3_0.6b", *LORA, "model.lora.load_in_4bit=true")
    with pytest.raises(ConfigError, match="model.lora.load_in_4bit"):
        load_kwargs_for_qlora(cfg.model.lora, cfg.model.source)


def test_qlora_needs_an_adapter(make_cfg):
    cfg = make_cfg("model=qwen3_0.6b", "model.lora.load_in_4bit=true")
    with pytest.raises(ConfigError, match="model.lora.enabled"):
        check_qlora(cfg.model.lora, cfg.model.source)
    assert load_kwargs_for_qlora(make_cfg("model=tiny", *LORA).model.lora) == {}


@pytest.mark.gpu
def test_qlora_grpo_on_gpu(make_cfg, tmp_path):
    """4-bit NF4 base (the tiny model saved and reloaded through from_pretrained), LoRA on top, 2 GRPO steps."""
    if not th.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    cfg = make_cfg("model=tiny", "dataset=arithmetic", *LORA, "model.lora.load_in_4bit=true", *GRPO)
    cfg.training.bf16 = True
    kwargs = load_kwargs_for_qlora(cfg.model.lora)
    q = kwargs["quantization_config"]
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == th.bfloat16
    model, tok, vocab = _tiny(cfg)
    model.save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=th.bfloat16, **kwargs)
    assert model.is_loaded_in_4bit
    model = apply_lora(model, cfg.model.lora, 0)
    before = _snapshot(model, True)
    trainer = config_trainer(cfg, model, tok, vocab, use_cpu=False)
    trainer.train()
    after = _snapshot(model, True)
    assert any(not th.equal(before[n], after[n]) for n in before), "no LoRA weight changed"


# ------------------------------------------------------------------------------------------- GRPO + LoRA
@pytest.mark.parametrize("reasoning_vocab_size", [0, 4])
def test_grpo_with_lora_changes_adapter_not_base(make_cfg, reasoning_vocab_size):
    n = reasoning_vocab_size
    cfg = make_cfg("model=tiny", "dataset=arithmetic", f"model.reasoning_vocab_size={n}", *LORA, *GRPO)
    model, tok, vocab = _tiny(cfg)
    model = apply_lora(model, cfg.model.lora, n)
    adapter_before, base_before = _snapshot(model, True), _snapshot(model, False)
    assert any("trainable_tokens" in name for name in adapter_before) == bool(n)
    trainer = config_trainer(cfg, model, tok, vocab)
    assert trainer.ref_model is None
    trainer.train()
    adapter_after, base_after = _snapshot(model, True), _snapshot(model, False)
    changed = [n for n in adapter_before if not th.equal(adapter_before[n], adapter_after[n])]
    assert any("lora_" in n for n in changed), "no LoRA weight changed"
    if n:
        assert any("trainable_tokens" in name for name in changed), "the reasoning rows did not change"
    assert all(th.equal(base_before[n], base_after[n]) for n in base_before), "a frozen base weight changed"


# ------------------------------------------------------------------------------------------- reference model
def test_beta_zero_loads_no_reference_model(make_cfg):
    cfg = make_cfg("model=tiny", "dataset=arithmetic", "training.beta=0.0", *GRPO)
    model, tok, vocab = _tiny(cfg)
    assert build_reference_model(model, cfg.training.beta) is None
    trainer = config_trainer(cfg, model, tok, vocab)
    assert trainer.ref_model is None and trainer.beta == 0.0


@pytest.mark.parametrize("reasoning_vocab_size", [0, 4])
def test_beta_positive_uses_a_frozen_copy_of_the_initial_policy(make_cfg, reasoning_vocab_size):
    """TRL alone would reload 'tiny-qwen3' from the hub and fail; the copy keeps the reasoning rows."""
    cfg = make_cfg(
        "model=tiny",
        "dataset=arithmetic",
        "training.beta=0.1",
        f"model.reasoning_vocab_size={reasoning_vocab_size}",
        *GRPO,
    )
    model, tok, vocab = _tiny(cfg)
    ref = build_reference_model(model, cfg.training.beta)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = config_trainer(cfg, model, tok, vocab, ref_model=ref)
    assert trainer.ref_model is not None
    ref_params = dict(trainer.accelerator.unwrap_model(trainer.ref_model).named_parameters())
    assert ref_params["model.embed_tokens.weight"].size(0) == model.get_input_embeddings().weight.size(0)
    trainer.train()
    assert any(not th.equal(initial[n], p) for n, p in model.named_parameters()), "the policy did not train"
    assert all(th.equal(initial[n], p) for n, p in ref_params.items()), "the reference moved"
    assert not any(p.requires_grad for p in ref_params.values())
    assert any("kl" in entry for entry in trainer.state.log_history)


def test_reference_patch_is_undone():
    import trl.trainer.grpo_trainer as grpo_module

    original = grpo_module.create_model_from_path
    with trl_reference_model(th.nn.Linear(1, 1)):
        assert grpo_module.create_model_from_path is not original
    assert grpo_module.create_model_from_path is original


# ------------------------------------------------------------------------------------------- train()
def _train_wires_lora() -> bool:
    import rlvr_vocab.train

    return "apply_lora" in inspect.getsource(rlvr_vocab.train)


def test_train_with_lora_end_to_end(make_cfg, tmp_path):
    """train() with LoRA, reasoning rows and a KL term; then rlvr-eval reads the adapter checkpoints of the run."""
    if not _train_wires_lora():
        pytest.skip("rlvr_vocab/train.py does not call peft_utils.apply_lora yet")
    from rlvr_vocab.cli.evaluate import evaluate
    from rlvr_vocab.train import train

    cfg = make_cfg(
        "model=tiny", "dataset=arithmetic", "model.reasoning_vocab_size=4", *LORA, *GRPO, "training.beta=0.05",
        "training.save_strategy=steps", "training.save_steps=1",
    )  # fmt: skip
    metrics = train(cfg)
    run = tmp_path / "run"
    assert metrics["global_step"] == 2
    for folder in (run, run / "checkpoint-1", run / "checkpoint-2"):
        assert (folder / "adapter_config.json").is_file() and (folder / "reasoning_vocab.json").is_file(), folder
    for key, value in {"model_path": str(run), "max_samples": 2, "max_new_tokens": 4}.items():
        OmegaConf.update(cfg, f"eval.{key}", value, force_add=True)  # a free-form dict or a typed EvalConfig
    report = evaluate(cfg)
    assert [r["step"] for r in report["results"]] == [1, 2]
