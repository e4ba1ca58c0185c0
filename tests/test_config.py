"""Every config composes; unknown keys fail fast; every training key reaches GRPOConfig."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time

import pytest
from conftest import REPO, compose_config
from omegaconf import OmegaConf

from rlvr_vocab.config import ConfigError, TrainingConfig, validate

GROUPS = {
    g: sorted(p.stem for p in (REPO / "conf" / g).glob("*.yaml"))
    for g in ("model", "dataset", "training", "reward", "logging", "experiment")
}


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_every_group_option_composes_and_validates(group):
    assert GROUPS[group], f"conf/{group} is empty"
    for option in GROUPS[group]:
        cfg = compose_config(f"{group}={option}")
        validate(cfg)


def test_experiments_exist():
    assert {"quickstart", "debug", "baseline", "reasoning"} <= set(GROUPS["experiment"])


def test_cookbook_experiment_uses_the_cookbook_system_prompt():
    from rlvr_vocab.rewards.cookbook import COOKBOOK_SYSTEM_PROMPT

    cfg = compose_config("experiment=cookbook")
    assert cfg.dataset.system_prompt == COOKBOOK_SYSTEM_PROMPT
    assert list(cfg.reward.funcs)[0].startswith("cookbook")


def test_debug_overlay_shrinks_everything():
    cfg = compose_config("debug=default")
    assert cfg.model.source == "tiny" and cfg.training.max_steps == 2
    assert cfg.training.num_generations == 2 and cfg.training.max_completion_length == 8
    assert cfg.logging.backend == "none" and cfg.paths.output_root == "outputs/debug"


def test_schema_training_keys_are_grpo_config_fields():
    from rlvr_vocab.trainer import RLVRGRPOConfig

    grpo_fields = {f.name for f in dataclasses.fields(RLVRGRPOConfig)}
    ours = {f.name for f in dataclasses.fields(TrainingConfig)} - {"extra"}
    assert ours - grpo_fields == set()


def test_training_and_generation_keys_reach_grpo_config():
    from rlvr_vocab.trainer import RLVRGRPOConfig, grpo_config_kwargs

    cfg = compose_config(
        "training.learning_rate=3e-6",
        "training.num_generations=4",
        "training.max_completion_length=32",
        "training.save_steps=7",
        "model.generation_kwargs.temperature=0.7",
        "model.generation_kwargs.top_k=5",
        "+model.generation_kwargs.no_repeat_ngram_size=3",
        "+training.extra.top_entropy_quantile=0.5",
        "seed=3",
    )
    kwargs = grpo_config_kwargs(cfg)
    args = RLVRGRPOConfig(
        output_dir="/tmp/unused", use_cpu=True, bf16=False, **{k: v for k, v in kwargs.items() if k != "bf16"}
    )
    assert args.learning_rate == 3e-6 and args.num_generations == 4 and args.max_completion_length == 32
    assert args.save_steps == 7 and args.seed == 3 and args.top_entropy_quantile == 0.5
    assert args.temperature == 0.7 and args.top_k == 5
    assert args.generation_kwargs == {"no_repeat_ngram_size": 3}
    # every schema key arrived with the composed value
    for key, value in OmegaConf.to_container(cfg.training).items():
        if key not in ("extra", "bf16") and value is not None:  # None: GRPOConfig derives the value
            assert getattr(args, key) == value, key


@pytest.mark.parametrize("on", [False, True])
def test_the_composed_training_config_warns_nothing(tmp_path, on):
    """No warning caused by our own config: training.gradient_checkpointing reaches GRPOConfig by the name that
    transformers does not deprecate (the old one printed a FutureWarning on every run)."""
    import warnings

    from rlvr_vocab.trainer import RLVRGRPOConfig, grpo_config_kwargs

    kwargs = grpo_config_kwargs(compose_config(f"training.gradient_checkpointing={on}"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = RLVRGRPOConfig(output_dir=str(tmp_path), use_cpu=True, **{**kwargs, "bf16": False})
    assert args.activation_checkpointing is on and args.gradient_checkpointing is on
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []


def test_gradient_checkpointing_reaches_an_older_transformers_by_its_old_name():
    """transformers 5.17 (the GPU machine's, inside our pins) has no ``activation_checkpointing`` field: the switch
    must go by ``gradient_checkpointing`` there, or GRPOConfig(...) raises TypeError before the first step."""
    import dataclasses

    from rlvr_vocab.trainer import RLVRGRPOConfig, grpo_config_kwargs

    fields = [(f.name, object) for f in dataclasses.fields(RLVRGRPOConfig) if f.name != "activation_checkpointing"]
    older = dataclasses.make_dataclass("OlderGRPOConfig", fields)
    kwargs = grpo_config_kwargs(compose_config("training.gradient_checkpointing=true"), older)
    assert kwargs["gradient_checkpointing"] is True
    assert set(kwargs) <= {name for name, _ in fields}


def test_unknown_extra_training_key_is_rejected_with_suggestion():
    from rlvr_vocab.trainer import grpo_config_kwargs

    cfg = compose_config("+training.extra.top_entropy_quantil=0.5")
    with pytest.raises(ConfigError, match="training.extra.top_entropy_quantil.*top_entropy_quantile"):
        grpo_config_kwargs(cfg)


def test_validate_needs_neither_torch_nor_trl():
    """config.py is the bottom floor: composing and validating a config imports hydra and omegaconf only."""
    code = (
        "import sys\n"
        "from hydra import compose, initialize_config_dir\n"
        "import rlvr_vocab.config as c\n"
        f"with initialize_config_dir(config_dir={str(REPO / 'conf')!r}, version_base='1.3'):\n"
        "    cfg = compose(config_name='config', overrides=['model.lora.enabled=true'])\n"
        "c.validate(cfg)\n"
        "print(sorted(m for m in ('torch', 'trl', 'transformers') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_conflicting_max_new_tokens_is_rejected():
    cfg = compose_config("+model.generation_kwargs.max_new_tokens=99", "training.max_completion_length=32")
    with pytest.raises(ConfigError, match="max_new_tokens.*training.max_completion_length"):
        validate(cfg)


@pytest.mark.parametrize(
    "override, key",
    [
        ("training.num_generations=3", "num_generations"),
        ("model.reasoning_vocab_size=-1", "model.reasoning_vocab_size"),
        ("dataset.answer_format=latex", "dataset.answer_format"),
        ("reward.weights=[1.0,2.0,3.0]", "reward.weights"),
        ("training.generation_backend=vllm", "training.generation_backend"),
    ],
)
def test_cross_key_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose_config(override))


def test_typo_exits_fast_naming_the_key(tmp_path):
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "grpo_train.py", "training.learning_rat=3e-6", f"hydra.run.dir={tmp_path}/run"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "learning_rat" in proc.stderr + proc.stdout
    assert not (tmp_path / "run" / "config.yaml").exists()  # failed before doing any work
    assert time.time() - start < 60


def test_bad_value_type_is_rejected():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose_config("training.max_steps=ten")


@pytest.mark.parametrize(
    "override, message",
    [
        ("training.learning_rate=-1", "training.learning_rate=-1.0: must be >= 0"),
        ("training.learning_rate=nan", "training.learning_rate=nan: must be >= 0"),
        (
            "training.per_device_train_batch_size=0",
            "training.per_device_train_batch_size=0: must be a whole number >= 1",
        ),
        ("training.gradient_accumulation_steps=0", "training.gradient_accumulation_steps=0"),
        ("model.generation_kwargs.temperature=0", "model.generation_kwargs.temperature=0: must be > 0"),
        ("model.generation_kwargs.top_p=1.5", r"model.generation_kwargs.top_p=1.5: must be in \(0, 1\]"),
        ("+training.extra.min_p=-0.1", r"training.extra.min_p=-0.1: must be in \[0, 1\]"),
        ("training.save_steps=0", "training.save_steps=0.0: must be > 0"),
        ("training.save_total_limit=0", "training.save_total_limit=0"),
        ("training.beta=-0.1", "training.beta"),
        ("training.epsilon=0", "training.epsilon"),
        ("training.num_iterations=0", "training.num_iterations"),
        ("training.save_strategy=sometimes", "training.save_strategy='sometimes': choose one of no, steps, epoch"),
        ("training.max_steps=-1 training.num_train_epochs=0", "trains nothing"),
        (
            "dataset.max_train_samples=0",
            r"dataset.max_train_samples=0: must be a whole number >= 1 \(or null: every row\)",
        ),
        ("dataset.max_eval_samples=0", "dataset.max_eval_samples=0"),
        ("eval.batch_size=0", "eval.batch_size=0"),
        ("eval.every_steps=-1", "eval.every_steps=-1"),
        ("seed=-1", "seed=-1"),
        ("experiment=debug dataset.generator.num_train=0", "dataset.generator.num_train=0"),
        ("model.lora.enabled=true model.lora.r=0", "model.lora.r=0"),
        ("reward.weights=[nan]", r"reward.weights\[0\]=nan"),
        ("+training.extra.temperature=0.5 model.generation_kwargs.temperature=0.7", "set one of them only"),
    ],
)
def test_values_out_of_range_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_config(*override.split()))


def test_values_in_range_pass():
    validate(compose_config("training.learning_rate=0", "training.max_steps=-1", "training.num_train_epochs=0.5",
                            "model.generation_kwargs.top_p=1", "training.max_grad_norm=0", "dataset.max_train_samples=1"))  # fmt: skip
