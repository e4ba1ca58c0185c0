"""Preemption and resume: stop at a step boundary on a signal, save, and find the newest complete checkpoint.

How a run survives a Slurm time limit or preemption (train.py wires the three pieces):

    ckpt = resume.latest_complete_checkpoint(output_dir)      # None on a fresh run
    trainer.add_callback(resume.PreemptionCallback())
    with resume.signal_handlers():                            # SIGTERM, SIGUSR1, SIGUSR2, SIGINT
        trainer.train(resume_from_checkpoint=ckpt)

1. A signal only sets a flag. At the end of the current optimizer step ``PreemptionCallback`` asks the
   Trainer to save a checkpoint and stop (in a multi-process run the flag is all-reduced first, so every
   rank stops at the same step).
2. ``on_save`` runs after the Trainer has written every file of ``checkpoint-N``; the callback then writes
   ``checkpoint-N/checkpoint_complete.json`` listing each file and its size. A checkpoint killed mid-save
   has no marker (or a file whose size no longer matches it) and is never resumed from.
3. Leaving ``signal_handlers()`` after such a stop raises :class:`Preempted`, a ``SystemExit`` with code
   ``EXIT_PREEMPTED`` (75, ``EX_TEMPFAIL``: "try again"). A handler that was installed before ours for that
   signal (submitit's requeue handler under the Hydra submitit launcher) is called first, now that the
   model is safe on disk.
4. The sbatch scripts (slurm/_common.sh) forward the time-limit signal to Python and ``scontrol requeue``
   the job when it came from the time limit; the requeued job reruns the same command, which resumes here.

Nothing here deletes files: an incomplete checkpoint is skipped, not removed (the Trainer overwrites it
when it reaches that step again).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from loguru import logger
from transformers import TrainerCallback

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: stopped early with a checkpoint saved; rerun to resume
COMPLETE_MARKER = "checkpoint_complete.json"  # written last, after every other file of the checkpoint
DEFAULT_SIGNALS = (
    signal.SIGTERM,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGINT,
)  # Slurm kill, sbatch time limit, submitit, Ctrl-C

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
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


class Preempted(SystemExit):
    """Raised when training stopped on a signal after saving a checkpoint; exits with ``EXIT_PREEMPTED``."""

    def __init__(self, signum: int, global_step: int) -> None:
        super().__init__(EXIT_PREEMPTED)
        self.signum = signum
        self.global_step = global_step


# ------------------------------------------------------------------------------------------------
# Finding the checkpoint to resume from
# ------------------------------------------------------------------------------------------------


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step N of a ``checkpoint-N`` directory name, else None.

    Example:
        >>> checkpoint_step("outputs/run/checkpoint-40"), checkpoint_step("outputs/run/final")
        (40, None)
    """
    match = _CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


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
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    # Step 0 (the untrained model some runs keep, weights only) has nothing to resume: a fresh start is the same.
    candidates = sorted(
        (step, path) for path in output_dir.iterdir() if (step := checkpoint_step(path)) and path.is_dir()
    )
    newest_first = [path for _, path in reversed(candidates)]
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


# ------------------------------------------------------------------------------------------------
# Stopping on a signal
# ------------------------------------------------------------------------------------------------


@dataclass
class _StopState:
    """Process-wide: signal handlers are process-wide too."""

    signum: int | None = None  # the first stop signal received
    armed: tuple[int, ...] = ()  # the signals signal_handlers() turned into stop requests (re-armed each step)
    stopped_at: int | None = None  # the step the callback stopped training at, with a checkpoint saved
    finished: bool = False  # the stop step was the last one anyway


_state = _StopState()


def stop_requested() -> int | None:
    """The signal number that asked this process to stop, or None."""
    return _state.signum


def request_stop(signum: int = signal.SIGTERM, frame: object = None) -> None:
    """Signal handler (and test hook): stop at the end of the current optimizer step.

    Ctrl-C (SIGINT) is a stop request like the others; a second Ctrl-C quits at once (KeyboardInterrupt,
    no checkpoint of the current step).
    """
    name = signal.Signals(signum).name
    if _state.signum is None:
        _state.signum = signum
        again = " (Ctrl-C again to quit at once, without saving)" if signum == signal.SIGINT else ""
        logger.warning(f"Received {name}: saving a checkpoint at the end of this step, then exiting{again}")
    elif signum == signal.SIGINT:
        logger.warning("Received SIGINT again: quitting now, without saving this step")
        raise KeyboardInterrupt
    else:
        logger.warning(f"Received {name} again: already stopping after this step")


def rearm() -> None:
    """Install ``request_stop`` again for the armed signals, and unblock them, in the main thread.

    Measured on an H100 machine: after ``torch.compile`` had run (the fast sampler compiles its decode
    step in the first training step), a SIGUSR1 sent with ``timeout -s USR1`` no longer reached Python's
    handler in 3 runs of 3, so the runs trained on past the signal; calling ``signal.signal`` again
    restored delivery. PreemptionCallback calls this at the start of every step.
    """
    if not _state.armed or threading.current_thread() is not threading.main_thread():
        return
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _state.armed)
    for sig in _state.armed:
        signal.signal(sig, request_stop)


def _max_over_ranks(value: int) -> int:
    """The largest ``value`` over all ranks (``value`` itself without torch.distributed)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    device = "cuda" if "nccl" in str(dist.get_backend()) and torch.cuda.is_available() else "cpu"
    tensor = torch.tensor([value], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


class PreemptionCallback(TrainerCallback):
    """Save and stop at the end of the step in which a stop signal arrived; mark finished checkpoints complete.

    Use together with :func:`signal_handlers`, which installs the handlers and exits after the save.
    """

    def on_step_begin(self, args, state, control, **kwargs):
        rearm()  # a library (torch.compile, seen on the GPU) can leave the stop signals undelivered
        return control

    def on_step_end(self, args, state, control, **kwargs):
        # Every rank takes part in this all-reduce at every step, so all stop at the same step (a rank
        # that saves while another trains would hang both), and each learns which signal arrived.
        signum = _max_over_ranks(_state.signum or 0)
        if signum:
            _state.signum = _state.signum or signum
            control.should_save = True
            control.should_training_stop = True
            _state.stopped_at = state.global_step
            _state.finished = state.max_steps > 0 and state.global_step >= state.max_steps
        return control

    def on_save(self, args, state, control, **kwargs):
        # The Trainer calls on_save after _save_checkpoint has written every file (and, in GRPOTrainer,
        # entropy_ctrl_state.json after trainer_state.json), so this is the first moment the directory is whole.
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # sharded (FSDP) checkpoints: every rank has written its part
        if state.is_world_process_zero:
            checkpoint_dir = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if checkpoint_dir.is_dir():
                mark_complete(checkpoint_dir, state.global_step)
        if dist.is_available() and dist.is_initialized():
            # No rank moves on (after a stop: exits) before the marker is on disk: on several nodes the first
            # rank to exit makes srun --kill-on-bad-exit terminate the others, rank 0 mid-fsync included.
            dist.barrier()
        return control


@contextlib.contextmanager
def signal_handlers(signals: Iterable[int] = DEFAULT_SIGNALS) -> Iterator[None]:
    """Turn ``signals`` into a stop request for the duration of the block; exit after a signal-triggered save.

    On leaving the block after PreemptionCallback stopped training early, raises :class:`Preempted`
    (``SystemExit(EXIT_PREEMPTED)``), after calling the handler installed before ours for that signal, if
    any (e.g. submitit's, which requeues the job). Previous handlers are restored in every case. Outside
    the main thread (where Python cannot install handlers) the block runs unchanged.
    """
    signals = tuple(signals)
    if threading.current_thread() is not threading.main_thread():
        logger.warning("Not in the main thread: no preemption signal handlers installed")
        yield
        return
    _state.signum, _state.stopped_at, _state.finished = None, None, False
    previous = {sig: signal.getsignal(sig) for sig in signals}
    _state.armed = signals
    rearm()  # installs request_stop and unblocks the signals
    try:
        yield
    finally:
        _state.armed = ()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        signum, stopped_at, finished = _state.signum, _state.stopped_at, _state.finished
        _state.signum, _state.stopped_at, _state.finished = None, None, False
    # Only reached when the block did not raise.
    if signum is None or stopped_at is None or finished:
        if signum is not None:
            logger.warning(f"{signal.Signals(signum).name} arrived but training had finished: exiting normally")
        return
    logger.warning(f"Stopped at step {stopped_at} after {signal.Signals(signum).name}; checkpoint saved")
    handler = previous.get(signum)
    if callable(handler) and handler not in (request_stop, signal.default_int_handler):  # (that one: Ctrl-C = raise)
        logger.info(f"Calling the previous {signal.Signals(signum).name} handler {handler!r}")
        handler(signum, None)
    raise Preempted(signum, stopped_at)
