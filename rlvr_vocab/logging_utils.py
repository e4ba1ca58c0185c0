"""Experiment tracking (wandb / none), the run's metrics.jsonl, and the secret-free config trackers record."""

from __future__ import annotations

import json
import math
import os
import time
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


class MetricsFileCallback(TrainerCallback):
    """Append every logged metrics dict (with its step and unix time) to <output_dir>/metrics.jsonl; echo the reward."""

    def __init__(self, path: Path):
        self.path = Path(path)

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
            logger.info(
                f"step {state.global_step}/{state.max_steps} reward {logs['reward']:.3f} "
                f"(std {logs.get('reward_std', float('nan')):.3f}) "
                f"len {logs.get('completions/mean_length', float('nan')):.1f}"
            )


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))
