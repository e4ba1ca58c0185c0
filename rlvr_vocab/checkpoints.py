"""Checkpoint folders: their names, which ones a run holds, and whether one is complete enough to resume from.

The one home of ``checkpoint-N``: ``checkpoint_name``/``checkpoint_step`` turn a step into a folder name and
back, ``checkpoint_dirs`` lists a run's checkpoints by step, ``find_checkpoints`` those that hold a model
(rlvr-eval, rlvr-viz). Completeness (resume.py, rundir.py): after the Trainer has written every file of a
checkpoint, ``mark_complete`` writes ``checkpoint_complete.json`` listing each file and its size;
``checkpoint_problem`` says why a folder cannot be resumed from (no marker, a file whose size changed, a
missing optimizer, ...), and ``latest_complete_checkpoint`` picks the newest one that can.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path

from loguru import logger

PREFIX = "checkpoint-"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")  # a Trainer checkpoint folder: checkpoint-<optimizer step>
COMPLETE_MARKER = "checkpoint_complete.json"  # written last, after every other file of the checkpoint
# What a resumable HF Trainer checkpoint holds, as file-name patterns (plain, sharded, PEFT, FSDP layouts).
_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "pytorch_model_fsdp*",
)
_OPTIMIZER = ("optimizer.pt", "optimizer.bin", "optimizer_*")
_SCHEDULER = ("scheduler.pt",)
_RNG = ("rng_state*.pth",)


# ------------------------------------------------------------------------------------------ names
def checkpoint_name(step: int) -> str:
    """The folder name the Trainer gives the checkpoint of optimizer step ``step``.

    Example:
        >>> checkpoint_name(40)
        'checkpoint-40'
    """
    return f"{PREFIX}{step}"


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step N of a ``checkpoint-N`` directory name, else None.

    Example:
        >>> checkpoint_step("outputs/run/checkpoint-40"), checkpoint_step("outputs/run/final")
        (40, None)
    """
    match = CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def checkpoint_dirs(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``checkpoint-N`` folder under ``run_dir``, by step ([] without ``run_dir``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted((step, p) for p in run_dir.iterdir() if (step := checkpoint_step(p)) is not None and p.is_dir())


def is_model_dir(path: str | Path) -> bool:
    """A folder holding a full model (config.json) or a LoRA adapter (adapter_config.json)."""
    path = Path(path)
    return (path / "config.json").is_file() or (path / "adapter_config.json").is_file()


def find_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``checkpoint-N`` under ``run_dir`` that holds a model, by step."""
    return [(step, path) for step, path in checkpoint_dirs(run_dir) if is_model_dir(path)]


def trained_step(path: str | Path) -> int | None:
    """The optimizer step a model folder was saved at: N of ``checkpoint-N``, else ``trainer_state.json``."""
    path = Path(path)
    step = checkpoint_step(path)
    if step is not None:
        return step
    state = path / "trainer_state.json"
    if state.is_file():
        return json.loads(state.read_text()).get("global_step")
    return None


# ------------------------------------------------------------------------------------------ completeness
def _file_sizes(directory: Path) -> dict[str, int]:
    """Relative path -> size in bytes of every file under ``directory`` (the marker itself excluded)."""
    sizes = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = Path(root, name)
            rel = path.relative_to(directory).as_posix()
            if rel != COMPLETE_MARKER:
                sizes[rel] = path.stat().st_size
    return sizes


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _has_any(directory: Path, patterns: Iterable[str]) -> bool:
    return any(next(directory.glob(pattern), None) is not None for pattern in patterns)


def _marker_problem(path: Path, step: int) -> str | None:
    """Why the marker of ``path`` does not vouch for it, or None when every listed file is intact."""
    marker = _read_json(path / COMPLETE_MARKER)
    if marker is None:
        return f"{COMPLETE_MARKER} is missing or unreadable"
    if marker.get("global_step") != step:
        return f"{COMPLETE_MARKER} is for step {marker.get('global_step')}"
    for rel, size in marker.get("files", {}).items():
        file = path / rel
        if not file.is_file():
            return f"{rel} is missing"
        if file.stat().st_size != size:
            return f"{rel} has {file.stat().st_size} bytes, {size} when saved"
    return None


def _structure_problem(path: Path, step: int) -> str | None:
    """Why ``path`` is not a complete HF Trainer checkpoint by its files alone, or None."""
    state = _read_json(path / "trainer_state.json")
    if state is None:
        return "trainer_state.json is missing or unreadable"
    if state.get("global_step") != step:
        return f"trainer_state.json is at step {state.get('global_step')}"
    for what, patterns in (("weights", _WEIGHTS), ("optimizer", _OPTIMIZER), ("scheduler", _SCHEDULER), ("rng", _RNG)):
        if not _has_any(path, patterns):
            return f"no {what} file ({' | '.join(patterns)})"
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.exists():
            shards = set((_read_json(index) or {}).get("weight_map", {}).values())
            missing = sorted(s for s in shards if not (path / s).is_file())
            if not shards or missing:
                return f"{index_name} lists missing shards {missing}"
    return None


def checkpoint_problem(path: str | os.PathLike, require_marker: bool = False) -> str | None:
    """Why ``path`` cannot be resumed from (a short reason), or None when it is complete.

    Complete means: named ``checkpoint-N``; ``trainer_state.json`` readable and at step N; model weights,
    optimizer, scheduler and RNG state present; shards listed in an index present; and, when a
    ``checkpoint_complete.json`` marker exists (or ``require_marker``), every file it lists still has its size.
    """
    path = Path(path)
    step = checkpoint_step(path)
    if step is None or not path.is_dir():
        return "not a checkpoint-N directory"
    if require_marker or (path / COMPLETE_MARKER).exists():
        problem = _marker_problem(path, step)
        if problem:
            return problem
    return _structure_problem(path, step)


def is_complete_checkpoint(path: str | os.PathLike, require_marker: bool = False) -> bool:
    """True when ``path`` is a checkpoint the Trainer can resume from (see :func:`checkpoint_problem`)."""
    return checkpoint_problem(path, require_marker) is None


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest complete ``checkpoint-N`` directory (N >= 1) in ``output_dir``, or None (fresh run).

    Once any checkpoint in ``output_dir`` carries a completion marker (written by PreemptionCallback), the
    marker is required: a checkpoint saved by this code but killed before its marker is skipped. Only when
    no marked checkpoint is usable (``save_total_limit=1`` deletes the previous one before the new one is
    marked) does the newest checkpoint that is complete by its files alone win, with a warning; older runs
    without markers are judged that way too. Skipped checkpoints are logged, never deleted.
    """
    # Step 0 (the untrained model some runs keep, weights only) has nothing to resume: a fresh start is the same.
    newest_first = [path for step, path in reversed(checkpoint_dirs(output_dir)) if step > 0]
    if any((path / COMPLETE_MARKER).exists() for path in newest_first):
        for path in newest_first:
            problem = checkpoint_problem(path, require_marker=True)
            if problem is None:
                return str(path)
            logger.warning(f"Skipping incomplete checkpoint {path}: {problem}")
    for path in newest_first:
        if (path / COMPLETE_MARKER).exists():
            continue  # its marker already ruled it out
        problem = checkpoint_problem(path)
        if problem is None:
            if any((p / COMPLETE_MARKER).exists() for p in newest_first):
                logger.warning(f"No marked checkpoint is usable; {path} is complete by its files: resuming from it")
            return str(path)
        logger.warning(f"Skipping incomplete checkpoint {path}: {problem}")
    return None


def mark_complete(checkpoint_dir: str | os.PathLike, global_step: int) -> Path:
    """Flush every file of ``checkpoint_dir`` to disk, then write its completion marker atomically."""
    checkpoint_dir = Path(checkpoint_dir)
    sizes = _file_sizes(checkpoint_dir)
    for rel in sizes:  # durable before the marker says so (a crash of the node, not only of the process)
        fd = os.open(checkpoint_dir / rel, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    marker = checkpoint_dir / COMPLETE_MARKER
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(
        json.dumps({"global_step": global_step, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": sizes})
    )
    os.replace(tmp, marker)
    dir_fd = os.open(checkpoint_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return marker
