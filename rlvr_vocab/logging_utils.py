"""Experiment tracking (wandb / none), the run's metrics.jsonl and train.log, the console's lines, and the
secret-free config trackers record.

The console is for people, files are for programs: one line per logging step (``step_line``) in place of
transformers' metrics dicts and progress bars (``quiet_console``); the full metrics go to ``metrics.jsonl`` and
the tracker, and every console line of the run also to ``<run dir>/train.log`` (``run_log``).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import time
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from loguru import logger
from omegaconf import DictConfig, OmegaConf
from transformers import TrainerCallback

from rlvr_vocab.redact import scrub_secrets


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    """The fully resolved config as plain data, secrets scrubbed (what is saved and sent to trackers)."""
    return scrub_secrets(OmegaConf.to_container(cfg, resolve=True))


def start_tracker(cfg: DictConfig, output_dir: Path) -> str:
    """Start the configured tracker; returns the value for GRPOConfig.report_to."""
    backend = cfg.logging.backend
    if backend == "none":
        return "none"
    if backend == "wandb":
        import wandb

        os.environ.setdefault("WANDB_LOG_MODEL", "false")  # never upload checkpoints implicitly
        wandb.init(
            project=cfg.logging.project,
            entity=cfg.logging.entity,
            group=cfg.logging.group,
            tags=list(cfg.logging.tags),
            name=cfg.exp_name,
            mode=cfg.logging.mode,
            dir=str(output_dir),
            config=resolved_config(cfg),
            resume="allow",
            id=_stable_run_id(output_dir),
        )
        return "wandb"
    return backend  # tensorboard / trackio: the HF integrations start themselves


def _stable_run_id(output_dir: Path) -> str:
    """One wandb run per output dir, so a resumed (requeued) job continues the same run."""
    id_file = output_dir / ".wandb_run_id"
    if id_file.is_file():
        return id_file.read_text().strip()
    import uuid

    run_id = uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    return run_id


def finish_tracker(cfg: DictConfig) -> None:
    if cfg.logging.backend == "wandb":
        import wandb

        if wandb.run is not None:
            wandb.finish()


RUN_LOG = "train.log"  # in the run dir: the console's loguru lines (banner, step lines, held-out, summary)
LOG_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <8} | {name}:{function}:{line} - {message}"  # loguru's own


@contextlib.contextmanager
def run_log(path: Path, enabled: bool = True) -> Iterator[None]:
    """While inside: every loguru line at INFO or above also goes to ``path`` (appended: a resume continues it).

    ``enabled``: false on ranks other than 0 (their lines would repeat its own). A failure's traceback is
    appended to the file as well (the console gets it from whoever handles the exception, hydra_entry or the
    caller).
    """
    if not enabled:
        yield
        return
    # An open file, not the path: loguru formats a path as a template ({time}), and a sweep point's folder
    # name holds the override's braces (0_+reward.kwargs.x={a:1},...).
    with Path(path).open("a", encoding="utf-8", buffering=1) as stream:
        sink = logger.add(stream, level="INFO", format=LOG_FORMAT, colorize=False)
        try:
            yield
        except Exception:
            logger.remove(sink)
            sink = None
            stream.write(f"Training failed:\n{traceback.format_exc()}")
            raise
        finally:
            if sink is not None:
                logger.remove(sink)


@contextlib.contextmanager
def quiet_console(trainer) -> Iterator[None]:
    """Our one line per logging step in place of what transformers prints: its metrics dict at every log
    (ProgressCallback / PrinterCallback, numbers as strings), its tqdm bar (redrawn lines in a Slurm log, and
    loguru lines cut into it on a terminal) and save_pretrained's "Writing model shards" bar at every save.

    The callbacks are taken off ``trainer`` for good; progress bars (transformers' and the Hub's) are off while
    inside and back on afterwards if they were on. Neither changes what metrics.jsonl or the tracker receive.
    """
    from transformers import PrinterCallback, ProgressCallback
    from transformers.utils import logging as hf_logging

    for callback in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(callback)
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()


def step_line(
    step: int, max_steps: int, logs: Mapping[str, Any], seconds_per_step: float | None, eta: float | None
) -> str:
    """The console's line for one logging step: what a researcher watches (metrics.jsonl holds every metric).

    Reward mean ± std, each reward function's mean, completion length, the share of completions cut at the
    token limit, learning rate, wall seconds per step and time left; with reasoning rows (``reasoning/*``) the
    share of completion tokens drawn from them and their share of the span's tokens.

    >>> logs = {"reward": 0.5, "reward_std": 0.25, "rewards/accuracy/mean": 0.5, "rewards/format/mean": 1.0,
    ...         "completions/mean_length": 41.0, "completions/clipped_ratio": 0.125, "learning_rate": 3e-6}
    >>> step_line(3, 10, logs, 1.5, 10.5).split(" | ")  # doctest: +NORMALIZE_WHITESPACE
    ['step 3/10', 'reward 0.500 ± 0.250', 'accuracy 0.500 format 1.000', 'len 41.0 clipped 0.12', 'lr 3.0e-06',
     '1.50 s/step ETA 0:00:10']
    >>> step_line(1, 2, {"reward": 0.0, "reasoning/token_fraction": 0.05, "reasoning/span_token_fraction": 0.2},
    ...           None, None)
    'step 1/2 | reward 0.000 ± nan | len nan clipped nan | lr nan | reasoning 0.050 of tokens, 0.200 of span'
    """
    nan = float("nan")
    parts = [f"step {step}/{max_steps}", f"reward {logs.get('reward', nan):.3f} ± {logs.get('reward_std', nan):.3f}"]
    rewards = [
        f"{key[len('rewards/') : -len('/mean')]} {value:.3f}"
        for key, value in logs.items()
        if key.startswith("rewards/") and key.endswith("/mean")
    ]
    if rewards:
        parts.append(" ".join(rewards))
    parts.append(
        f"len {logs.get('completions/mean_length', nan):.1f} clipped {logs.get('completions/clipped_ratio', nan):.2f}"
    )
    parts.append(f"lr {logs.get('learning_rate', nan):.1e}")
    if seconds_per_step is not None:
        eta_text = f" ETA {datetime.timedelta(seconds=round(eta))}" if eta is not None else ""
        parts.append(f"{seconds_per_step:.2f} s/step{eta_text}")
    if "reasoning/token_fraction" in logs:
        span = logs.get("reasoning/span_token_fraction")
        span_text = f", {span:.3f} of span" if span is not None else ""
        parts.append(f"reasoning {logs['reasoning/token_fraction']:.3f} of tokens{span_text}")
    return " | ".join(parts)


class MetricsFileCallback(TrainerCallback):
    """Append every logged metrics dict (with its step and unix time) to <output_dir>/metrics.jsonl; print the
    step's ``step_line`` (wall seconds per step over the last logging interval, time left at the mean pace of
    this process's steps so far)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.started: tuple[float, int] | None = None  # (perf_counter, global_step) at on_train_begin
        self.last: tuple[float, int] | None = None  # the same at the latest step line

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = self.last = (time.perf_counter(), state.global_step)

    @staticmethod
    def truncate_after(path: Path, step: int) -> None:
        """On resume: drop lines logged after the checkpoint's step, so each step is logged once (step -1: all).

        A line that is not a JSON record (the last one, cut short when the run was killed mid-write) is
        dropped with a warning, so it can neither stop the resume nor glue itself to the next record.
        """
        if not path.is_file():
            return
        text = path.read_text(errors="replace")
        lines = text.splitlines()
        kept, torn = [], []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                torn.append(number)
                continue
            if not isinstance(record, dict):
                torn.append(number)
            elif record.get("step", 0) <= step:
                kept.append(line)
        if torn:
            logger.warning(
                f"{path}: dropped {len(torn)} line(s) that are not JSON records (cut short by a kill?): {torn}"
            )
        if len(kept) != len(lines) or (text and not text.endswith("\n")):
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "time": round(time.time(), 3)}  # time: unix seconds, for curves
        record.update({k: v for k, v in logs.items() if _is_number(v)})
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if "reward" in logs:
            logger.info(step_line(state.global_step, state.max_steps, logs, *self._pace(state)))

    def _pace(self, state) -> tuple[float | None, float | None]:
        """(wall seconds per step since the previous step line, seconds left at the mean pace so far)."""
        now, step = time.perf_counter(), state.global_step
        if self.started is None or self.last is None or step <= self.last[1]:
            return None, None
        per_step = (now - self.last[0]) / (step - self.last[1])
        mean = (now - self.started[0]) / (step - self.started[1])
        self.last = (now, step)
        return per_step, mean * max(state.max_steps - step, 0)


class StalledRewardCallback(TrainerCallback):
    """A loud warning when GRPO has nothing to learn from: for ``steps`` logged steps in a row every group of
    completions got identical rewards (TRL's ``frac_reward_zero_std`` = 1), so every advantage is 0 and the policy
    gets no gradient. Seen on 2026-12-02 (RESULTS.md): runs that settled on a shape the format bonus paid for
    (`</think>>` then nothing) sat at reward 0.200 with no spread for the rest of training. Warns once per stall."""

    def __init__(self, steps: int):
        self.steps = steps
        self.run = 0  # consecutive logged steps with no spread in any group
        self.warned = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.steps or not logs or "frac_reward_zero_std" not in logs:
            return
        if logs["frac_reward_zero_std"] < 1.0 - 1e-6:
            self.run, self.warned = 0, False
            return
        self.run += 1
        if self.run < self.steps or self.warned or not state.is_world_process_zero:
            return
        self.warned = True
        reward = logs.get("reward")
        reward_text = f" (reward {reward:.3f} for every completion)" if isinstance(reward, (int, float)) else ""
        logger.warning(
            "\n" + "!" * 100 + f"\n!!! step {state.global_step}: for {self.run} logged steps in a row every group of "
            f"completions got the same reward{reward_text}.\n!!! The advantages are 0: the policy learns nothing "
            "from here on. Read the latest completions (a reward hole or a collapse?), or more spread per group "
            "(training.num_generations, training.temperature) may help.\n!!! (logging.stall_warn_steps="
            f"{self.steps}; 0 turns this warning off)\n" + "!" * 100
        )


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))
