"""train(cfg): config -> model/tokenizer -> data -> rewards -> trainer -> train -> save."""

from __future__ import annotations

import datetime
import logging
import os
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger
from omegaconf import DictConfig

from rlvr_vocab.config import ConfigError, validate

if TYPE_CHECKING:
    from rlvr_vocab.rundir import RunDir


def _corpus_texts(cfg: DictConfig, train_dataset) -> list[str] | None:
    """Texts whose token counts rank the sources for model.reasoning.init=frequent."""
    if cfg.model.reasoning.init != "frequent":
        return None
    path = cfg.model.reasoning.frequency_corpus
    if path is None:
        return list(train_dataset["problem"])
    if not Path(path).is_file():
        raise ConfigError(f"model.reasoning.frequency_corpus={path!r} does not exist.")
    return Path(path).read_text().splitlines()


def train(cfg: DictConfig, hydra_files: dict[str, str] | None = None) -> dict:
    """Run GRPO as configured; returns the final metrics. ``cfg.output_dir`` must be set.

    ``hydra_files``: the ``.hydra/`` files (secrets scrubbed) that hydra_entry passes, written into the run dir
    once its checks pass.
    """
    from rlvr_vocab import rundir
    from rlvr_vocab.models import resolve_bf16
    from rlvr_vocab.peft_utils import check_qlora
    from rlvr_vocab.preflight import check_model_available
    from rlvr_vocab.rewards.registry import get_reward_funcs
    from rlvr_vocab.trainer import grpo_config_kwargs

    started = time.perf_counter()
    # ---- config: every check that needs no model or data runs first
    validate(cfg)
    check_qlora(cfg.model.lora, cfg.model.source)  # model.lora.load_in_4bit needs CUDA + bitsandbytes + an adapter
    grpo_config_kwargs(cfg)  # every training key is a GRPOConfig field
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its timeout warnings print whole completions
    # trl 1.16 reads model.is_gradient_checkpointing at every generation, which transformers 5.2x deprecates: a
    # FutureWarning per step that no setting of ours causes or cures (pyproject pins both)
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    if not cfg.output_dir:
        raise ConfigError("output_dir is not set (grpo_train.py sets it to the Hydra run dir).")
    bf16 = resolve_bf16(cfg.training.bf16)
    try:
        reward_funcs, reward_weights = get_reward_funcs(cfg.reward)
    except ValueError as err:  # an unknown name, a bad weight or argument: a config error like any other
        raise ConfigError(str(err)) from err
    check_model_available(cfg.model)  # before the data: an uncached hub model offline is named at once

    # ---- run dir: locked; a finished run or an incompatible resume stops here, with nothing written
    run = rundir.open_run(cfg, Path(cfg.output_dir))
    try:
        if run.finished_step is not None:
            return {"global_step": run.finished_step, "already_finished": True}
        return _train(cfg, run, hydra_files, bf16, reward_funcs, reward_weights, started)
    finally:
        run.release()


def _train(
    cfg: DictConfig, run: RunDir, hydra_files, bf16: bool, reward_funcs: list, reward_weights: list, started: float
) -> dict:
    """Data, then (its lines also in the run dir's train.log) model, trainer, train, save: in the run dir that
    ``rundir.open_run`` checked and locked."""
    from rlvr_vocab.data import load_datasets
    from rlvr_vocab.logging_utils import RUN_LOG, run_log
    from rlvr_vocab.rundir import process_rank

    # ---- data (before the model: data errors surface before an expensive load, and before any write)
    train_dataset, eval_dataset = load_datasets(cfg)
    run.commit(hydra_files)  # config record, .hydra/, metrics.jsonl trimmed to the checkpoint
    with run_log(run.path / RUN_LOG, enabled=process_rank() == 0):
        return _fit(cfg, run, bf16, reward_funcs, reward_weights, train_dataset, eval_dataset, started)


def _fit(
    cfg: DictConfig, run: RunDir, bf16: bool, reward_funcs: list, reward_weights: list, train_dataset, eval_dataset,
    started: float,
) -> dict:  # fmt: skip
    """Model, trainer, train, save, with the start banner and the closing summary on the console."""
    from rlvr_vocab import resume
    from rlvr_vocab.distributed import RankRecordCallback
    from rlvr_vocab.logging_utils import (
        MetricsFileCallback,
        StalledRewardCallback,
        finish_tracker,
        quiet_console,
        start_tracker,
    )
    from rlvr_vocab.models import load_model_and_tokenizer

    output_dir, checkpoint = run.path, run.checkpoint
    if checkpoint:
        logger.info(f"Resuming from {checkpoint}")
    rows = {"train": len(train_dataset), "held-out": len(eval_dataset) if eval_dataset is not None else 0}
    callbacks = [MetricsFileCallback(output_dir / "metrics.jsonl"), resume.PreemptionCallback()]
    callbacks.append(StalledRewardCallback(cfg.logging.stall_warn_steps))  # no reward spread: nothing to learn
    callbacks.append(RankRecordCallback(output_dir))  # several processes: <output_dir>/ranks/rank-<r>.jsonl
    heldout = None
    if cfg.eval.every_steps > 0:  # greedy held-out accuracy during training (rlvr-eval's settings)
        from rlvr_vocab.heldout import HeldOutEvalCallback

        heldout = HeldOutEvalCallback(cfg, train_dataset, eval_dataset)
        callbacks.append(heldout)

    # ---- model and tokenizer (+ thinking span, + reasoning vocabulary)
    from rlvr_vocab.peft_utils import apply_lora, build_reference_model, load_kwargs_for_qlora
    from rlvr_vocab.reasoning_vocab import extend_model
    from rlvr_vocab.rewards.registry import for_span
    from rlvr_vocab.thinking import setup_span
    from rlvr_vocab.trainer import RLVRGRPOConfig, RLVRGRPOTrainer, grpo_config_kwargs

    model, tokenizer = load_model_and_tokenizer(
        cfg.model, cfg.paths.cache_dir, bf16=bf16, seed=cfg.seed, load_kwargs=load_kwargs_for_qlora(cfg.model.lora)
    )
    n = cfg.model.reasoning_vocab_size
    span = setup_span(model, tokenizer, cfg.model, cfg.dataset.think, n, train_dataset[0]["prompt"])
    if span.tags is not None:  # answer rewards judge only what follows the span
        reward_funcs = for_span(reward_funcs, span.tags.open_tag, span.tags.close_tag, span.prompt_opens)
    vocab = None
    if n > 0:
        vocab = extend_model(model, tokenizer, n, cfg.model.reasoning, span.tags, _corpus_texts(cfg, train_dataset))
    if heldout is not None:
        heldout.use_span(span.tags, tokenizer)
    # KL reference: a frozen copy of the initial policy (rows included), none when beta=0 or under LoRA
    ref_model = build_reference_model(model, cfg.training.beta, cfg.model.lora.enabled)
    if cfg.model.lora.enabled:
        model = apply_lora(model, cfg.model.lora, cfg.model.reasoning_vocab_size)

    # ---- trainer
    report_to = start_tracker(cfg, output_dir)
    try:
        kwargs = grpo_config_kwargs(cfg)
        if cfg.logging.backend == "wandb" and cfg.logging.log_completions:
            kwargs["log_completions"] = True
        if cfg.logging.backend == "trackio":
            kwargs.setdefault("project", cfg.logging.project)  # TrainingArguments.project: the trackio project
        if eval_dataset is None or kwargs.get("eval_strategy", "no") == "no":
            eval_dataset = None
        kwargs["bf16"] = bf16  # null resolved to what this machine supports
        args = RLVRGRPOConfig(
            output_dir=str(output_dir),
            report_to=report_to,
            reward_weights=reward_weights,
            use_cpu=not _has_accelerator(),
            **kwargs,
        )
        trainer = RLVRGRPOTrainer(
            model=model,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            callbacks=callbacks,
            reasoning_vocab=vocab,
            ref_model=ref_model,
            span_tags=span.tags,
            span_check_steps=cfg.model.reasoning.span_check_steps,
        )
        if heldout is not None:
            heldout.trainer = trainer
        if trainer.is_world_process_zero():
            logger.info(_banner(cfg, trainer, rows, heldout, output_dir, report_to, checkpoint))
        with quiet_console(trainer):  # our step lines, no metrics dicts or progress bars
            if vocab is not None and cfg.model.reasoning.keep_initial_checkpoint and not checkpoint:
                trainer.save_initial_checkpoint()

            # ---- train
            with resume.signal_handlers():
                result = trainer.train(resume_from_checkpoint=checkpoint)

            # ---- save: the final model, its tokenizer, the reasoning map and trainer_state.json in the run dir
            trainer.save_model(str(output_dir))
            trainer.save_state()
        run.mark_finished(trainer.state.global_step, trainer.state.max_steps, cfg.training.num_train_epochs)
        metrics = dict(result.metrics)
        metrics["global_step"] = trainer.state.global_step
        if trainer.is_world_process_zero():
            logger.info(_summary(trainer.state, time.perf_counter() - started, output_dir))
        return metrics
    finally:
        finish_tracker(cfg)


def _banner(cfg: DictConfig, trainer, rows: dict[str, int], heldout, output_dir: Path, report_to: str, checkpoint):
    """The start banner: what is trained, on what, with which rewards, for how long, and where it goes."""
    args = trainer.args
    n = cfg.model.reasoning_vocab_size
    reasoning = f", {n} reasoning rows (init {cfg.model.reasoning.init})" if n > 0 else ", no reasoning rows"
    evaluation = "off"
    if heldout is not None:
        split = " of the training split" if heldout.settings["split"] == "train" else ""
        every = "every step" if heldout.every == 1 else f"every {heldout.every} steps"
        evaluation = f"{every} on {len(heldout.rows)} problems{split}"
    rewards = " + ".join(
        f"{w:g} x {name}" for name, w in zip(trainer.reward_func_names, trainer.reward_weights.tolist(), strict=True)
    )
    completions = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    prompts = completions // args.num_generations
    steps = f"max_steps {args.max_steps}" if args.max_steps > 0 else f"{args.num_train_epochs:g} epochs"
    tracker = report_to
    if report_to in ("wandb", "trackio"):
        tracker += f" (project {cfg.logging.project}" + (f", {cfg.logging.mode})" if report_to == "wandb" else ")")
    resuming = f" (resuming from {Path(checkpoint).name})" if checkpoint else ""
    return "\n".join(
        [
            f"GRPO run {cfg.exp_name}",
            f"  model    {cfg.model.name_or_path} ({cfg.model.source}){reasoning}",
            f"  data     {cfg.dataset.name}: {rows['train']} train rows, {rows['held-out']} held-out rows; "
            f"held-out eval {evaluation}",
            f"  rewards  {rewards}",
            f"  steps    {steps}, {prompts} prompts x {args.num_generations} completions per step, "
            f"max {args.max_completion_length} completion tokens, lr {args.learning_rate:.1e}",
            f"  output   {output_dir}{resuming}",
            f"  tracker  {tracker}",
        ]
    )


def _summary(state, seconds: float, output_dir: Path) -> str:
    """The closing line: steps done, wall time, the last training reward and held-out pass@1, the outputs."""
    reward = next((e["reward"] for e in reversed(state.log_history) if "reward" in e), None)
    last_eval = next((e for e in reversed(state.log_history) if "heldout/pass@1" in e), None)
    parts = [f"Finished: step {state.global_step}/{state.max_steps} in {datetime.timedelta(seconds=round(seconds))}"]
    if reward is not None:
        parts.append(f"final reward {reward:.3f}")
    if last_eval is not None:
        parts.append(f"held-out pass@1 {last_eval['heldout/pass@1']:.3f} (step {last_eval['step']})")
    parts.append(f"outputs in {output_dir}")
    return " | ".join(parts)


def _has_accelerator() -> bool:
    import torch as th

    return th.cuda.is_available()


def main() -> None:
    """Console script ``rlvr-train``: the same Hydra app as grpo_train.py."""
    import hydra

    import rlvr_vocab.config  # noqa: F401  (registers the schema)

    config_dir = os.environ.get("RLVR_CONFIG_DIR", str(Path(__file__).resolve().parents[1] / "conf"))
    hydra.main(config_path=config_dir, config_name="config", version_base="1.3")(hydra_entry)()


def hydra_entry(cfg: DictConfig) -> None:
    """What grpo_train.py and rlvr-train run: the Hydra run dir becomes the output dir."""
    import sys

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from rlvr_vocab.distributed import export_submitit_torch_env
    from rlvr_vocab.redact import scrub_argv
    from rlvr_vocab.rundir import remove_if_empty

    sys.argv[:] = scrub_argv(sys.argv)  # trackers record the command line (wandb's metadata): no secrets in it
    hydra_cfg = HydraConfig.get()
    if not cfg.output_dir:
        cfg.output_dir = hydra_cfg.runtime.output_dir
    if cfg.logging.backend == "wandb" and cfg.logging.group is None and hydra_cfg.mode == RunMode.MULTIRUN:
        cfg.logging.group = f"{cfg.exp_name}-{Path(hydra_cfg.sweep.dir).name}"  # one wandb group per sweep
    try:
        export_submitit_torch_env()  # submitit job of several tasks: RANK, MASTER_ADDR, ... from Slurm
        train(cfg, hydra_files=_hydra_files(cfg, hydra_cfg))
    except ConfigError as err:
        logger.error(str(err))
        remove_if_empty(Path(cfg.output_dir))  # the folder Hydra made for a start that was refused
        sys.exit(2)
    except Exception:
        # Under a multirun launcher Hydra keeps the exception in the job's result and the point's log would end
        # in "Job completed successfully": the traceback goes to the log (and the run dir's log) here.
        logger.exception(f"Training failed (output dir {cfg.output_dir})")
        raise


def _hydra_files(cfg: DictConfig, hydra_cfg: DictConfig) -> dict[str, str]:
    """What Hydra would write into ``.hydra/`` (conf/config.yaml turns that off), with secrets scrubbed."""
    from omegaconf import OmegaConf

    from rlvr_vocab.redact import scrub_secrets

    def to_yaml(node) -> str:
        return OmegaConf.to_yaml(OmegaConf.create(scrub_secrets(node)))

    return {
        "config.yaml": to_yaml(OmegaConf.to_container(cfg, resolve=False)),
        "hydra.yaml": to_yaml({"hydra": OmegaConf.to_container(hydra_cfg, resolve=False)}),
        "overrides.yaml": to_yaml(list(hydra_cfg.overrides.task)),
    }
