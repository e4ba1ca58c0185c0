"""The run dir: one run at a time, the config it was trained with, finished runs, and which resumes are allowed.

``train()`` opens the run dir before it loads any data or model, and writes into it only once every check
has passed (the lock excepted):

    run = rundir.open_run(cfg, output_dir)   # lock; finished? compatible resume? raises ConfigError otherwise
    ...                                      # data (still nothing written)
    run.commit(hydra_files)                  # config_started.yaml, config.yaml, .hydra/, metrics.jsonl trimmed
    ...                                      # model, trainer, train, save
    run.mark_finished(step, max_steps)       # run_finished.json
    run.release()                            # in a finally

Files (next to the checkpoints):

``run.lock``              who runs in the dir now: host, pid, start time, Slurm job (created with O_EXCL, so
                          it works on NFS); a second run into the dir stops at once naming the holder. A lock
                          whose holder is gone (a dead pid on this host, a Slurm requeue of the same job, a
                          Slurm job that no longer runs) is removed with a warning.
``config_started.yaml``   the resolved config of the start that trained the first step (written by a start
                          into a dir without checkpoints; a resume never touches it).
``config.yaml``           the resolved config the checkpoints were last trained with; a resume compares to it.
``config_changes.jsonl``  one line per resume with differing keys (old and new values).
``run_finished.json``     written after the final model: step, max_steps, epochs, time.

A resume whose config differs from ``config.yaml`` in a key that changes what is trained is refused (rc 2)
naming the keys, unless ``resume.allow_config_change=true``. ``MAY_DIFFER`` lists the keys that never
matter (steps to train, checkpointing, logging, evaluation, paths, names); ``NEVER_DIFFER`` those that
cannot change even with the override (the shapes and the reasoning map the checkpoint holds, and what
the checkpoint's optimizer state restores anyway).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger
from omegaconf import DictConfig, OmegaConf

from rlvr_vocab.checkpoints import COMPLETE_MARKER, checkpoint_step, latest_complete_checkpoint
from rlvr_vocab.config import Config, ConfigError
from rlvr_vocab.redact import is_secret_key, scrub_secrets

LOCK_FILE = "run.lock"
STARTED_CONFIG = "config_started.yaml"
CONFIG = "config.yaml"
CHANGES = "config_changes.jsonl"
FINISHED = "run_finished.json"
OVERRIDE = "resume.allow_config_change=true"

# Keys that may differ on resume: they change how long, how often something is saved or logged, or where;
# not what a step computes (dotted keys, fnmatch patterns).
MAY_DIFFER = (
    "training.max_steps",  # extend a run (a decaying lr schedule stretches over the new length)
    "training.num_train_epochs",
    "training.save_*",
    "training.logging_steps",
    "training.log_completions",
    "training.num_completions_to_print",
    "training.eval_strategy",
    "training.eval_steps",
    "training.per_device_eval_batch_size",
    "training.dataloader_num_workers",
    "training.gradient_checkpointing",  # same gradients, less memory
    "training.logprob_chunk_size",  # same log-probs, chunked differently
    "training.extra.hub_*",
    "training.extra.push_to_hub",
    "training.extra.logging_*",
    "training.extra.save_*",
    "training.extra.disable_tqdm",
    "training.extra.report_to",
    "model.reasoning.keep_initial_checkpoint",  # only a fresh start saves checkpoint-0
    "model.reasoning.span_check_steps",  # when the span guard warns
    "dataset.eval_path",
    "dataset.eval_split",
    "dataset.max_eval_samples",
    "logging.*",
    "eval.*",
    "paths.*",
    "resume.*",
    "output_dir",
    "exp_name",
    "output_file",
    "question",
    "input_file",
    "check_rewards.*",
)
# Keys a resume can never change: the checkpoint's tensor shapes and reasoning map depend on them, or its
# optimizer state brings the old value back (torch's load_state_dict restores lr and weight decay).
NEVER_DIFFER = (
    "model.name_or_path",
    "model.source",
    "model.revision",
    "model.gguf_package",
    "model.gguf_file",
    "model.tiny.*",
    "model.reasoning_vocab_size",
    "model.reasoning.init",
    "model.reasoning.frequency_corpus",
    "model.reasoning.repeat_policy",
    "model.think_open",  # the span tags are rows of the model and tokens of its tokenizer
    "model.think_close",
    "model.tag_init",
    "model.lora.enabled",
    "model.lora.r",
    "model.lora.target_modules",
    "model.lora.modules_to_save",
    "model.lora.load_in_4bit",
    "training.learning_rate",
    "training.weight_decay",
    "training.optim",
)
_NOT_WEIGHTS = ("optimizer*", "scheduler*", "rng_state*", COMPLETE_MARKER)  # what a final model lacks


# ------------------------------------------------------------------------------------------ config diffs
def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"a.b": value}`` (lists stay values).

    Example:
        >>> flatten({"model": {"tiny": {"hidden_size": 64}, "tags": [1]}, "seed": 1})
        {'model.tiny.hidden_size': 64, 'model.tags': [1], 'seed': 1}
    """
    if not isinstance(obj, dict):
        return {prefix: obj}
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


@dataclass
class ConfigDiff:
    """How a resume's config differs from the run dir's: keys -> (recorded value, new value)."""

    fixed: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # NEVER_DIFFER: always refused
    training: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # refused unless resume.allow_config_change
    allowed: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # MAY_DIFFER and secrets: fine

    @staticmethod
    def describe(changes: dict[str, tuple[Any, Any]]) -> str:
        """``key: old -> new`` for each key, comma-separated."""
        missing = "(not set)"
        return ", ".join(
            f"{k}: {missing if a is _ABSENT else a!r} -> {missing if b is _ABSENT else b!r}"
            for k, (a, b) in changes.items()
        )


_ABSENT = object()


def _schema_defaults() -> dict[str, Any]:
    return flatten(OmegaConf.to_container(OmegaConf.structured(Config), resolve=False))


def diff_configs(recorded: dict[str, Any], current: dict[str, Any]) -> ConfigDiff:
    """Compare two resolved configs (as saved in ``config.yaml``) key by key.

    A key the recorded config lacks (added to the schema since) counts as unchanged when the new value is the
    schema default; one the current config lacks (removed since) is ignored.

    Example:
        >>> d = diff_configs({"training": {"learning_rate": 1e-3, "max_steps": 4, "beta": 0.0}},
        ...                  {"training": {"learning_rate": 5e-2, "max_steps": 8, "beta": 0.1}})
        >>> sorted(d.fixed), sorted(d.training), sorted(d.allowed)
        (['training.learning_rate'], ['training.beta'], ['training.max_steps'])
    """
    old, new = flatten(scrub_secrets(recorded)), flatten(scrub_secrets(current))
    defaults = None
    diff = ConfigDiff()
    for key, value in new.items():
        before = old.get(key, _ABSENT)
        if before is _ABSENT:
            defaults = defaults if defaults is not None else _schema_defaults()
            if key in defaults and defaults[key] == value:
                continue
        if before == value:
            continue
        if _matches(key, NEVER_DIFFER):
            diff.fixed[key] = (before, value)
        elif _matches(key, MAY_DIFFER) or is_secret_key(key):
            diff.allowed[key] = (before, value)
        else:
            diff.training[key] = (before, value)
    return diff


# --------------------------------------------------------------------------------------------------- lock
def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot; tells a reused pid apart), None off Linux."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _slurm_job_running(job_id: str) -> bool | None:
    """Whether Slurm still runs ``job_id`` (None: no squeue here, or it did not answer)."""
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=15, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return False if "Invalid job id" in out.stderr else None
    return bool(out.stdout.strip())


def _me() -> dict[str, Any]:
    env = os.environ
    job = env.get("SLURM_JOB_ID")
    if env.get("SLURM_ARRAY_JOB_ID"):  # an array task: requeued under the same array_task name
        job = f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '')}"
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "process_start": _process_start(os.getpid()),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "started_unix": round(time.time(), 3),
        "slurm_job_id": job,
        "slurm_restart_count": env.get("SLURM_RESTART_COUNT", "0"),
        "token": uuid.uuid4().hex,
    }


def describe_holder(holder: dict[str, Any]) -> str:
    """One line naming a lock's holder.

    Example:
        >>> describe_holder({"host": "n1", "pid": 7, "started": "2026-01-01 10:00:00 +0000", "slurm_job_id": "42"})
        'pid 7 on host n1, started 2026-01-01 10:00:00 +0000, Slurm job 42'
    """
    text = f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
    if holder.get("slurm_job_id"):
        text += f", Slurm job {holder['slurm_job_id']}"
    return text


def stale_reason(holder: dict[str, Any], me: dict[str, Any]) -> str | None:
    """Why the holder of a lock is gone (so the lock may be removed), or None while it may still run."""
    job = holder.get("slurm_job_id")
    if job and job == me.get("slurm_job_id") and holder.get("slurm_restart_count") != me.get("slurm_restart_count"):
        return f"Slurm requeued job {job} (restart {holder.get('slurm_restart_count')} -> {me['slurm_restart_count']})"
    if holder.get("host") == me["host"]:
        pid = int(holder.get("pid", -1))
        if pid == me["pid"] and holder.get("process_start") == me["process_start"]:
            return "left by an earlier run in this same process"
        if not _alive(pid):
            return f"pid {pid} is not running on this host"
        started = holder.get("process_start")
        if started is not None and _process_start(pid) not in (None, started):
            return f"pid {pid} now belongs to another process"
        return None
    if job and job != me.get("slurm_job_id") and _slurm_job_running(job.split("_")[0]) is False:
        return f"Slurm job {job} is no longer running"
    return None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class RunLock:
    """An exclusive lock on a run dir: a file created with O_EXCL that names its holder (works on NFS)."""

    def __init__(self, path: Path, holder: dict[str, Any]):
        self.path, self.holder = path, holder

    @classmethod
    def acquire(cls, directory: Path, key: str = "hydra.run.dir") -> RunLock:
        """Take the lock of ``directory`` (which must exist), removing a stale one; ConfigError when it is held."""
        path = directory / LOCK_FILE
        me = _me()
        for _ in range(5):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_json(path)
                if holder is None:  # being written right now, or left empty by a kill between create and write
                    time.sleep(0.5)
                    holder = _read_json(path)
                    if holder is None:
                        with contextlib.suppress(OSError):
                            if time.time() - path.stat().st_mtime > 30:
                                cls._remove_stale(path, None, "an empty lock file older than 30 s")
                        continue
                why = stale_reason(holder, me)
                if why is None:
                    raise ConfigError(
                        f"{key}={directory} is in use by another run: {describe_holder(holder)}. Wait for it to "
                        f"finish, or choose another {key}. If that process is gone, delete {path}."
                    ) from None
                cls._remove_stale(path, holder, why)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
            if (_read_json(path) or {}).get("token") != me["token"]:  # another run replaced it in between
                continue
            return cls(path, me)
        raise ConfigError(f"{key}={directory}: could not take {path} (other runs keep replacing it); try again.")

    @staticmethod
    def _remove_stale(path: Path, holder: dict[str, Any] | None, why: str) -> None:
        aside = path.with_name(f".{LOCK_FILE}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(path, aside)  # atomic: of several runs removing the same stale lock, one wins
        except FileNotFoundError:
            return
        moved = _read_json(aside)
        if holder is not None and (moved or {}).get("token") != holder.get("token"):
            with contextlib.suppress(OSError):  # that was a fresh lock taken in between: put it back
                os.link(aside, path)
        else:
            who = describe_holder(holder) if holder else "unknown holder"
            logger.warning(f"Removed a stale lock {path} ({why}; it was held by {who})")
        aside.unlink(missing_ok=True)

    def release(self) -> None:
        """Remove the lock if it is still this run's."""
        if (_read_json(self.path) or {}).get("token") == self.holder["token"]:
            self.path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------- the run dir
def process_rank() -> int:
    """This process's global rank under accelerate / torchrun (0 without them)."""
    return int(os.environ.get("RANK", "0") or 0)


def _read_yaml(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:  # noqa: BLE001 -- an unreadable record is reported, not fatal
        logger.warning(f"{path} is not readable YAML: the resume is not compared against it")
        return None
    return data if isinstance(data, dict) else None


@dataclass
class RunDir:
    """What ``open_run`` found in the run dir, and the writes that follow once every check passed."""

    path: Path
    config: dict[str, Any]  # the resolved config, secrets scrubbed (what config.yaml holds)
    checkpoint: str | None  # resume from this checkpoint (None: a fresh start)
    finished_step: int | None = None  # the run had already finished at this step: nothing to train
    diff: ConfigDiff | None = None
    lock: RunLock | None = None

    def commit(self, hydra_files: dict[str, str] | None = None) -> None:
        """Write the config record (and ``.hydra/``), trim ``metrics.jsonl`` to the checkpoint: rank 0 only."""
        if process_rank() != 0:
            return
        from rlvr_vocab.logging_utils import MetricsFileCallback

        self.path.mkdir(parents=True, exist_ok=True)
        text = OmegaConf.to_yaml(OmegaConf.create(self.config))
        if self.checkpoint is None:
            _write_atomic(self.path / STARTED_CONFIG, text)
        _write_atomic(self.path / CONFIG, text)
        if self.diff is not None and (self.diff.training or self.diff.allowed):
            record = {
                "time": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                "resumed_from": Path(self.checkpoint).name if self.checkpoint else None,
                "changes": {
                    k: [_plain(a), _plain(b)] for k, (a, b) in {**self.diff.allowed, **self.diff.training}.items()
                },
                "forced": sorted(self.diff.training),
            }
            with (self.path / CHANGES).open("a") as f:
                f.write(json.dumps(record) + "\n")
        for name, content in (hydra_files or {}).items():
            (self.path / ".hydra").mkdir(exist_ok=True)
            _write_atomic(self.path / ".hydra" / name, content)
        step = checkpoint_step(self.checkpoint) if self.checkpoint else -1
        MetricsFileCallback.truncate_after(self.path / "metrics.jsonl", step)

    def mark_finished(self, global_step: int, max_steps: int, epochs: float) -> None:
        """Record that the final model is saved (a rerun then exits without training)."""
        if process_rank() == 0:
            record = {"global_step": global_step, "max_steps": max_steps, "num_train_epochs": epochs}
            record["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
            _write_atomic(self.path / FINISHED, json.dumps(record))

    def release(self) -> None:
        """Give the lock back (always call this, in a ``finally``)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def _plain(value: Any) -> Any:
    return None if value is _ABSENT else value


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _finished_step(output_dir: Path, cfg: DictConfig, recorded: dict[str, Any] | None) -> int | None:
    """The step the run finished at, when it finished for this config's length; else None."""
    max_steps, epochs = cfg.training.max_steps, cfg.training.num_train_epochs
    marker = _read_json(output_dir / FINISHED)
    if marker is not None:
        step = int(marker.get("global_step", -1))
        if max_steps > 0:
            return step if step >= max_steps else None
        return step if epochs <= float(marker.get("num_train_epochs", 0)) else None
    state = _read_json(output_dir / "trainer_state.json")  # a run finished before run_finished.json existed
    has_model = any(output_dir.glob("*.safetensors")) or any(output_dir.glob("*.bin"))
    if state is not None and has_model and max_steps > 0 and int(state.get("global_step", -1)) >= max_steps:
        return int(state["global_step"])
    return None


def _finish_from_checkpoint(output_dir: Path, checkpoint: str) -> None:
    """The run was trained to its last step but killed before the final save: that checkpoint is the final model."""
    for file in Path(checkpoint).iterdir():
        if file.is_file() and not any(fnmatch.fnmatch(file.name, p) for p in _NOT_WEIGHTS):
            shutil.copy2(file, output_dir / file.name)


def _shape_problem(checkpoint: str, cfg: DictConfig) -> str | None:
    """Why the checkpoint's tensors cannot hold this config's model (judged from its files, before any load)."""
    vocab = _read_json(Path(checkpoint) / "reasoning_vocab.json")
    size = int(vocab.get("size", 0)) if vocab else 0
    if size != cfg.model.reasoning_vocab_size:
        return (
            f"model.reasoning_vocab_size={cfg.model.reasoning_vocab_size} but {Path(checkpoint).name} holds "
            f"{size} reasoning rows"
        )
    adapter = (Path(checkpoint) / "adapter_config.json").is_file()
    if adapter != bool(cfg.model.lora.enabled):
        return f"model.lora.enabled={cfg.model.lora.enabled} but {Path(checkpoint).name} " + (
            "holds a LoRA adapter" if adapter else "holds full weights, no adapter"
        )
    return None


def open_run(cfg: DictConfig, output_dir: Path) -> RunDir:
    """Lock ``output_dir`` and decide what this start does; raises ConfigError (nothing written) when it may not run.

    Returns a RunDir with ``finished_step`` set when the run had already finished (the caller exits without
    training), else with the checkpoint to resume from (or None).
    """
    from rlvr_vocab.logging_utils import resolved_config

    output_dir = Path(output_dir)
    created = not output_dir.exists()
    lock = None
    if process_rank() == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock.acquire(output_dir)
    try:
        run = _inspect(cfg, output_dir, resolved_config(cfg), latest_complete_checkpoint(output_dir))
    except BaseException:
        if lock is not None:
            lock.release()
        if created:
            remove_if_empty(output_dir)
        raise
    run.lock = lock
    return run


def _inspect(cfg: DictConfig, output_dir: Path, config: dict[str, Any], checkpoint: str | None) -> RunDir:
    recorded = _read_yaml(output_dir / CONFIG) or _read_yaml(output_dir / STARTED_CONFIG)
    diff = diff_configs(recorded, config) if recorded is not None else None
    finished = _finished_step(output_dir, cfg, recorded)
    if (
        finished is None
        and checkpoint
        and cfg.training.max_steps > 0
        and checkpoint_step(checkpoint) >= cfg.training.max_steps
    ):
        if process_rank() == 0:
            _finish_from_checkpoint(output_dir, checkpoint)
            RunDir(output_dir, config, checkpoint).mark_finished(
                checkpoint_step(checkpoint), cfg.training.max_steps, cfg.training.num_train_epochs
            )
        logger.info(f"{checkpoint} is at training.max_steps={cfg.training.max_steps}: saved it as the final model")
        finished = checkpoint_step(checkpoint)
    if finished is not None:
        note = ""
        if diff is not None and (diff.fixed or diff.training):
            note = f" (this config differs in {', '.join([*diff.fixed, *diff.training])}: that needs a new run dir)"
        logger.info(
            f"Run in {output_dir} already finished at step {finished} (training.max_steps="
            f"{cfg.training.max_steps}): nothing to train{note}. To train further raise training.max_steps; "
            "to start over choose a new hydra.run.dir."
        )
        return RunDir(output_dir, config, checkpoint, finished_step=finished, diff=diff)
    if checkpoint is None:
        return RunDir(output_dir, config, None, diff=None)
    problems = [p for p in (_shape_problem(checkpoint, cfg), diff and ConfigDiff.describe(diff.fixed)) if p]
    if recorded is None:
        logger.warning(f"{output_dir} has no {CONFIG}: the resume from {checkpoint} is not checked against it")
    if problems:
        raise ConfigError(
            f"Resume refused: {Path(checkpoint).name} in {output_dir} cannot continue with this model or optimizer "
            f"setup ({'; '.join(problems)}); even {OVERRIDE} cannot change these. Restore them, or start a new run "
            "in another hydra.run.dir."
        )
    if diff is not None and diff.training and not cfg.resume.allow_config_change:
        raise ConfigError(
            f"Resume refused: this config differs from the one {output_dir} was trained with ({CONFIG}) in keys "
            f"that change training: {ConfigDiff.describe(diff.training)}. Restore them to resume, start a new "
            f"run in another hydra.run.dir, or add {OVERRIDE} to continue with the new values."
        )
    if diff is not None and diff.training and cfg.resume.allow_config_change:
        logger.warning(
            f"Resuming {checkpoint} with changed training keys ({OVERRIDE}): {ConfigDiff.describe(diff.training)}"
        )
    return RunDir(output_dir, config, checkpoint, diff=diff)


def remove_if_empty(directory: Path) -> None:
    """Remove a run dir that a refused start left empty (Hydra may have put an empty job log in it)."""
    with contextlib.suppress(OSError):
        entries = list(directory.iterdir())
        if all(e.is_file() and e.suffix == ".log" and e.stat().st_size == 0 for e in entries):
            for e in entries:
                e.unlink()
            directory.rmdir()
