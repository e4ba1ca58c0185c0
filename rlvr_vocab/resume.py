"""Preemption: stop at a step boundary on a signal, save, mark the checkpoint complete, exit to be rerun.

How a run survives a Slurm time limit or preemption (train.py wires the three pieces; finding the checkpoint
to resume from, and judging it complete, is rlvr_vocab/checkpoints.py):

    ckpt = checkpoints.latest_complete_checkpoint(output_dir)  # None on a fresh run
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
import signal
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from loguru import logger
from transformers import TrainerCallback

from rlvr_vocab import checkpoints

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: stopped early with a checkpoint saved; rerun to resume
DEFAULT_SIGNALS = (
    signal.SIGTERM,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGINT,
)  # Slurm kill, sbatch time limit, submitit, Ctrl-C


class Preempted(SystemExit):
    """Raised when training stopped on a signal after saving a checkpoint; exits with ``EXIT_PREEMPTED``."""

    def __init__(self, signum: int, global_step: int) -> None:
        super().__init__(EXIT_PREEMPTED)
        self.signum = signum
        self.global_step = global_step


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
    import torch as th
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    device = "cuda" if "nccl" in str(dist.get_backend()) and th.cuda.is_available() else "cpu"
    tensor = th.tensor([value], device=device)
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
            checkpoint_dir = Path(args.output_dir) / checkpoints.checkpoint_name(state.global_step)
            if checkpoint_dir.is_dir():
                checkpoints.mark_complete(checkpoint_dir, state.global_step)
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
