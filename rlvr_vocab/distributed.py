"""Runs of several processes: torch.distributed's variables for submitit tasks, and a record of what each rank did.

* :func:`export_submitit_torch_env`: the Hydra submitit launcher with several tasks per job
  (``hydra.launcher.nodes=2``, or ``tasks_per_node`` > 1) starts the Hydra job in every task, in-process, with no
  launcher to set torch.distributed's ``env://`` variables. This sets them from the Slurm task (submitit's
  ``TorchDistributedEnvironment``: MASTER_ADDR = first host of the job, MASTER_PORT from the job id, RANK,
  WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE), so the Trainer's accelerate state joins one process group.
  ``train.hydra_entry`` calls it; it does nothing in a one-task job or under ``accelerate launch`` (RANK is set).
* :class:`RankRecordCallback`: when a run has several processes, each rank appends a JSON line at the start and
  at the end of training to ``<output_dir>/ranks/rank-<rank>.jsonl``: rank, world size, node rank, hostname,
  Slurm job and restart, the step reached, the optimizer steps this process ran, and a SHA-256 of its parameters.
  The file shows where every rank ran and that the replicas agree (:func:`params_sha256` of the saved model
  equals every rank's).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from loguru import logger
from transformers import TrainerCallback

RANKS_DIR = "ranks"  # under the run's output dir: one rank-<rank>.jsonl per process


def export_submitit_torch_env() -> bool:
    """In a submitit task of a job with several tasks, export torch.distributed's env:// variables; True if done."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm" or "RANK" in os.environ:
        return False  # not a submitit Slurm job, or a launcher (accelerate / torchrun) already set the rank
    from submitit import JobEnvironment
    from submitit.helpers import TorchDistributedEnvironment

    if JobEnvironment().num_tasks <= 1:
        return False
    # CUDA_VISIBLE_DEVICES stays as Slurm set it: accelerate picks cuda:<LOCAL_RANK> among the node's GPUs.
    dist_env = TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    logger.info(
        f"torch.distributed from Slurm: rank {dist_env.rank} of {dist_env.world_size} "
        f"(local {dist_env.local_rank}), rendezvous {dist_env.master_addr}:{dist_env.master_port}"
    )
    return True


def params_sha256(named_tensors: Iterable[tuple[str, Any]]) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of each tensor, in name order: equal iff the tensors are equal.

    Example:
        >>> import torch as th
        >>> a = params_sha256([("w", th.ones(2)), ("b", th.zeros(1))])
        >>> a == params_sha256([("b", th.zeros(1)), ("w", th.ones(2))])  # order does not matter
        True
        >>> a == params_sha256([("w", th.ones(2)), ("b", th.full((1,), 1e-9))])
        False
    """
    import torch as th

    digest = hashlib.sha256()
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(dtype=th.uint8).numpy().tobytes())
    return digest.hexdigest()


def _model_sha256(model: Any) -> str | None:
    """The parameters' hash, or None when they are sharded (FSDP2 DTensors: no rank holds the whole model)."""
    from torch.distributed.tensor import DTensor

    params = list(model.named_parameters())
    if any(isinstance(p, DTensor) for _, p in params):
        return None
    return params_sha256(params)


def read_rank_records(output_dir: str | os.PathLike) -> dict[int, list[dict]]:
    """Rank -> its records, oldest first, from ``<output_dir>/ranks/rank-*.jsonl`` ({} for a one-process run)."""
    records = {}
    for path in sorted(Path(output_dir, RANKS_DIR).glob("rank-*.jsonl")):
        records[int(path.stem.split("-")[1])] = [json.loads(line) for line in path.read_text().splitlines() if line]
    return records


class RankRecordCallback(TrainerCallback):
    """In a run of several processes, every rank appends its record at train begin and end (see module doc)."""

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.output_dir = Path(output_dir)
        self.steps_run = 0

    def _write(self, event: str, args, state, model) -> None:
        if args.world_size <= 1:
            return
        import torch.distributed as dist

        record = {
            "event": event,
            "time": round(time.time(), 3),
            "rank": args.process_index,
            "world_size": args.world_size,
            "local_rank": args.local_process_index,
            # GROUP_RANK: torchrun's node rank (accelerate launch --machine_rank); SLURM_NODEID under submitit
            "node_rank": int(os.environ.get("GROUP_RANK") or os.environ.get("SLURM_NODEID") or 0),
            "hostname": socket.gethostname(),
            "backend": dist.get_backend() if dist.is_available() and dist.is_initialized() else None,
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT") or 0),
            "is_world_process_zero": state.is_world_process_zero,
            "global_step": state.global_step,
            "steps_run": self.steps_run,
            "params_sha256": _model_sha256(model) if model is not None else None,
        }
        path = self.output_dir / RANKS_DIR / f"rank-{args.process_index}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._write("train_begin", args, state, model)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        self.steps_run += 1
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._write("train_end", args, state, model)
        return control
