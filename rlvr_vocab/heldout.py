"""Held-out accuracy during training: ``eval.every_steps=N`` runs rlvr-eval's greedy eval on the policy.

The same settings as ``rlvr-eval`` (``eval.split``, ``max_samples``, ``batch_size``, ``max_new_tokens``,
``num_samples``, ``reward``), so a curve logged here and a later ``rlvr-eval`` of the checkpoints agree.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch as th
from loguru import logger
from omegaconf import DictConfig
from transformers import Trainer, TrainerCallback

from rlvr_vocab.evaluation import correctness_reward, eval_settings, evaluate_model, select_rows, span_reward

SAMPLES_FILE = "heldout_samples.jsonl"  # the latest eval's completions, one problem a line (reasoning ids marked)


class HeldOutEvalCallback(TrainerCallback):
    """``eval.every_steps=N``: this eval on the policy in training, at step 0, every N steps and at the end.

    Logs ``heldout/pass@1``, ``heldout/format_rate``, ``heldout/mean_length``, ``heldout/truncated_rate``
    (and ``pass@k``/``maj@k`` with ``eval.num_samples``), ``heldout/seconds`` (the eval's own time) and
    ``heldout/train_seconds`` (time since training began in this process, evals included), through the
    trainer's log: metrics.jsonl and the tracker. Every rank evaluates the same problems (FSDP needs all
    ranks in a forward); the random state is restored afterwards, so training samples as without it.
    With a thinking span it also logs ``heldout/closed_rate`` (the span closed), ``heldout/closed_boxed_rate``
    (closed, and a boxed answer after it), ``heldout/closed_answered_rate`` (closed, and a box or a number after
    it) and ``heldout/think_length``; correctness judges the answer after the
    span. The latest eval's completions go to ``heldout_samples.jsonl`` in the run dir (rewritten at each eval).
    """

    def __init__(self, cfg: DictConfig, train_dataset, eval_dataset):
        self.cfg = cfg
        self.settings = eval_settings(cfg)
        self.every = self.settings["every_steps"]
        if self.every < 1:
            raise ValueError("HeldOutEvalCallback needs eval.every_steps >= 1")
        self.reward = correctness_reward(cfg, self.settings["reward"])
        self.rows = select_rows(cfg, self.settings, train_dataset, eval_dataset)
        self.trainer = None  # set by train() once the trainer exists
        self.span_tags = None  # set by use_span() once the tokenizer has its span tags
        self.started: float | None = None
        self.last_step: int | None = None

    def use_span(self, tags, tokenizer) -> None:
        """Judge the answer after the thinking span, as the training rewards do (train() calls this)."""
        self.span_tags = tags
        holder = type("Policy", (), {"span_tags": tags})()
        self.reward = span_reward(self.reward, holder, tokenizer, self.rows)

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()
        if state.global_step == 0:
            self.run(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 or state.global_step >= state.max_steps:
            self.run(state.global_step)

    def run(self, step: int) -> dict[str, float]:
        """Evaluate now and log ``heldout/*``; returns those metrics."""
        if self.trainer is None:
            raise RuntimeError("HeldOutEvalCallback.trainer is not set")
        if step == self.last_step:
            return {}
        self.last_step = step
        trainer = self.trainer
        model = trainer.accelerator.unwrap_model(trainer.model)
        tokenizer = trainer.processing_class
        was_training, padding_side = model.training, tokenizer.padding_side
        devices = [th.cuda.current_device()] if th.cuda.is_available() else []
        start = time.perf_counter()
        model.eval()
        model.span_tags = self.span_tags
        try:
            with th.random.fork_rng(devices=devices):
                summary, records = evaluate_model(
                    model, tokenizer, self.rows, self.settings, self.cfg, self.reward, desc=f"held-out step {step}",
                    progress=False,
                )  # fmt: skip
        finally:
            model.train(was_training)
            tokenizer.padding_side = padding_side
        metrics = {f"heldout/{k}": float(v) for k, v in summary.items() if k != "num_problems"}
        metrics["heldout/seconds"] = time.perf_counter() - start
        metrics["heldout/train_seconds"] = time.perf_counter() - (self.started or start)
        should_log = trainer.control.should_log  # Trainer.log clears it: the step's own metrics must still be logged
        Trainer.log(trainer, metrics)  # transformers' log: GRPOTrainer.log would flush its own step metrics here
        trainer.control.should_log = should_log
        if trainer.is_world_process_zero():
            closed = f", closed span {summary['closed_rate']:.3f}" if "closed_rate" in summary else ""
            logger.info(
                f"held-out step {step}: pass@1 {summary['pass@1']:.3f}, format {summary['format_rate']:.3f}{closed} "
                f"({len(self.rows)} problems, {metrics['heldout/seconds']:.1f} s)"
            )
            self._write_samples(step, records, model, tokenizer)  # the latest eval's (a stopped run keeps some)
        return metrics

    def _write_samples(self, step: int, records: list[dict], model, tokenizer) -> None:
        """The latest eval's completions, for reading what the policy writes (reasoning ids marked ⟦ ⟧)."""
        vocab = getattr(model, "reasoning_vocab", None) or getattr(self.trainer, "reasoning_vocab", None)
        path = Path(self.trainer.args.output_dir) / SAMPLES_FILE
        tmp = path.with_suffix(".tmp")
        with tmp.open("w") as f:
            for record in records:
                row = {"step": step, **{k: v for k, v in record.items() if k != "samples"}}
                if vocab is not None and record.get("completion_ids") is not None:
                    row["rendered"] = vocab.render(tokenizer, record["completion_ids"])
                f.write(json.dumps(row) + "\n")
        os.replace(tmp, path)
