"""The run dir (rlvr_vocab/rundir.py): finished runs, config changes on resume, the lock, nothing written on refusal.

Real runs of the tiny model (experiment=debug, 2-3 steps), in-process through train(cfg) and, where Hydra's
part matters (exit code, .hydra/, a second process), through grpo_train.py as a user runs it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

from rlvr_vocab import rundir
from rlvr_vocab.config import ConfigError
from rlvr_vocab.logging_utils import MetricsFileCallback
from rlvr_vocab.train import train

RUN = ["experiment=debug", "training.max_steps=2", "training.save_steps=1"]
ENV = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def snapshot(directory: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under ``directory`` with its mtime and bytes (to prove a refused start changed nothing)."""
    return {
        p.relative_to(directory).as_posix(): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def steps_logged(directory: Path) -> list[int]:
    rows = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


def forbid_model_load(monkeypatch) -> None:
    """From now on, loading the model fails the test (a refusal must come before it)."""
    import rlvr_vocab.models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the run dir was checked")

    monkeypatch.setattr(rlvr_vocab.models, "load_model_and_tokenizer", refuse)


# ------------------------------------------------------------------------------------------ finished runs
def test_a_finished_run_rerun_trains_nothing_and_keeps_its_final_model(make_cfg):
    cfg = make_cfg(*RUN)
    out = Path(cfg.output_dir)
    assert train(cfg)["global_step"] == 2
    before = snapshot(out)
    assert json.loads((out / rundir.FINISHED).read_text())["global_step"] == 2

    again = train(make_cfg(*RUN))
    assert again == {"global_step": 2, "already_finished": True}
    assert snapshot(out) == before  # no checkpoint-3, the final model untouched, no lock left behind
    assert not (out / rundir.LOCK_FILE).exists()

    # killed during the final save: the last checkpoint becomes the final model, without training a step
    for name in (rundir.FINISHED, "model.safetensors", "trainer_state.json"):
        (out / name).unlink()
    assert train(make_cfg(*RUN))["global_step"] == 2
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert (out / "model.safetensors").read_bytes() == (out / "checkpoint-2" / "model.safetensors").read_bytes()
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    assert steps_logged(out) == [1, 2]

    # raising max_steps extends the run
    assert train(make_cfg(*RUN[:1], "training.max_steps=3", "training.save_steps=1"))["global_step"] == 3
    assert steps_logged(out) == [1, 2, 3]


# ------------------------------------------------------------------------------------- config on resume
def test_a_resume_that_changes_training_is_refused_naming_the_keys(make_cfg, monkeypatch):
    cfg = make_cfg(*RUN)
    out = Path(cfg.output_dir)
    train(cfg)
    (out / rundir.FINISHED).unlink()  # as if stopped at step 2 of a longer run
    forbid_model_load(monkeypatch)
    before = snapshot(out)

    longer = ["training.max_steps=4"]
    with pytest.raises(ConfigError, match=r"Resume refused: .*training.beta: 0.0 -> 0.1.*resume.allow_config_change"):
        train(make_cfg(*RUN, *longer, "training.beta=0.1"))
    with pytest.raises(ConfigError, match=r"model.reasoning.init: 'first_n' -> 'frequent'"):
        train(make_cfg(*RUN, *longer, "model.reasoning.init=frequent"))
    for fixed in ("training.learning_rate=5e-2", "model.reasoning_vocab_size=8"):  # not even with the override
        with pytest.raises(ConfigError, match=r"cannot continue.*" + fixed.split("=")[0].replace(".", r"\.")):
            train(make_cfg(*RUN, *longer, fixed, "resume.allow_config_change=true"))
    assert snapshot(out) == before  # config.yaml, metrics.jsonl, checkpoints: untouched
    assert not (out / rundir.LOCK_FILE).exists()

    # a dir from before config.yaml was recorded: the checkpoint's own files still refuse a new shape
    (out / "config.yaml").unlink()
    (out / rundir.STARTED_CONFIG).unlink()
    with pytest.raises(ConfigError, match="model.reasoning_vocab_size=8 but checkpoint-2 holds 0 reasoning rows"):
        train(make_cfg(*RUN, *longer, "model.reasoning_vocab_size=8"))


def test_allowed_changes_resume_and_the_override_is_recorded(make_cfg):
    cfg = make_cfg(*RUN)
    out = Path(cfg.output_dir)
    train(cfg)
    # keys that do not change training: more steps, checkpoint and log intervals, logging, names
    train(make_cfg(*RUN[:1], "training.max_steps=3", "training.save_steps=2", "training.logging_steps=1",
                   "exp_name=renamed", "eval.batch_size=2"))  # fmt: skip
    assert steps_logged(out) == [1, 2, 3]
    train(make_cfg(*RUN[:1], "training.max_steps=4", "training.beta=0.1", "resume.allow_config_change=true"))
    assert steps_logged(out) == [1, 2, 3, 4]
    changes = [json.loads(line) for line in (out / rundir.CHANGES).read_text().splitlines()]
    assert changes[0]["forced"] == [] and changes[0]["changes"]["training.max_steps"] == [2, 3]
    assert changes[1]["forced"] == ["training.beta"] and changes[1]["changes"]["training.beta"] == [0.0, 0.1]
    assert "beta: 0.1" in (out / "config.yaml").read_text()  # what the checkpoints are now trained with
    assert "beta: 0.0" in (out / rundir.STARTED_CONFIG).read_text()  # what the run started with


def test_diff_ignores_new_schema_keys_at_their_default():
    recorded = {"training": {"beta": 0.0}, "seed": 1}
    assert rundir.diff_configs(recorded, {"training": {"beta": 0.0, "epsilon": 0.2}, "seed": 1}).training == {}
    assert list(rundir.diff_configs(recorded, {"training": {"beta": 0.0, "epsilon": 0.3}, "seed": 1}).training) == [
        "training.epsilon"
    ]
    secret = rundir.diff_configs(
        {"training": {"extra": {"hub_token": "a"}}}, {"training": {"extra": {"hub_token": "b"}}}
    )
    assert not secret.training and not secret.fixed


# ------------------------------------------------------------------------------------------- metrics.jsonl
def test_a_torn_last_metrics_line_does_not_stop_the_resume(make_cfg):
    cfg = make_cfg(*RUN)
    out = Path(cfg.output_dir)
    train(cfg)
    (out / rundir.FINISHED).unlink()
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 0.1, "rew')  # killed mid-write
    train(make_cfg(*RUN[:1], "training.max_steps=3"))
    assert steps_logged(out) == [1, 2, 3]
    assert all(line.endswith("}") for line in (out / "metrics.jsonl").read_text().splitlines())


def test_truncate_after_drops_torn_lines_and_later_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\nnot json\n{"step": 3}\n{"step": 4, "lo')
    MetricsFileCallback.truncate_after(path, 3)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 3}\n'
    MetricsFileCallback.truncate_after(path, -1)  # a fresh start in a dir with an earlier attempt's metrics
    assert path.read_text() == ""


# ---------------------------------------------------------------------------------------------------- lock
def holder(**fields) -> dict:
    base = {"host": socket.gethostname(), "pid": os.getpid(), "process_start": None, "started": "2026-01-01 10:00:00",
            "slurm_job_id": None, "slurm_restart_count": "0", "token": "other"}  # fmt: skip
    return {**base, **fields}


def write_lock(directory: Path, **fields) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / rundir.LOCK_FILE).write_text(json.dumps(holder(**fields)))


def test_a_held_lock_refuses_at_once_naming_the_holder(make_cfg, monkeypatch):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        cfg = make_cfg(*RUN)
        out = Path(cfg.output_dir)
        write_lock(out, pid=sleeper.pid, slurm_job_id="4242")
        forbid_model_load(monkeypatch)
        started = time.monotonic()
        with pytest.raises(
            ConfigError, match=rf"is in use by another run: pid {sleeper.pid} on host .*Slurm job 4242"
        ):
            train(cfg)
        assert time.monotonic() - started < 10
        assert sorted(p.name for p in out.iterdir()) == [rundir.LOCK_FILE]  # nothing written, the lock kept
        # a lock from another host without Slurm: nobody here can tell whether it still runs
        write_lock(out, host="elsewhere", pid=1)
        with pytest.raises(ConfigError, match="on host elsewhere"):
            train(cfg)
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("case", ["dead_pid", "slurm_requeue", "reused_pid"])
def test_a_stale_lock_does_not_block_the_resume(make_cfg, monkeypatch, case):
    cfg = make_cfg(*RUN[:1], "training.max_steps=1")
    out = Path(cfg.output_dir)
    if case == "dead_pid":
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        write_lock(out, pid=gone.pid)
    elif case == "slurm_requeue":  # the same job id, requeued: on another node, its previous run is gone
        monkeypatch.setenv("SLURM_JOB_ID", "777")
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
        write_lock(out, host="node-elsewhere", pid=1, slurm_job_id="777", slurm_restart_count="0")
    else:  # the pid is alive but belongs to another process now
        write_lock(out, pid=1, process_start="0")
    assert train(cfg)["global_step"] == 1
    assert not (out / rundir.LOCK_FILE).exists()


def test_only_rank_0_locks_and_writes(make_cfg, monkeypatch):
    """Under accelerate every rank runs train(); ranks > 0 check the dir but neither lock nor write."""
    cfg = make_cfg(*RUN)
    out = Path(cfg.output_dir)
    write_lock(out, host="elsewhere", pid=1)  # rank 0 of this run holds it
    monkeypatch.setenv("RANK", "1")
    run = rundir.open_run(cfg, out)
    run.commit({"overrides.yaml": "[]"})
    run.release()
    assert sorted(p.name for p in out.iterdir()) == [rundir.LOCK_FILE]


# --------------------------------------------------------------------------------------- as a user runs it
def grpo_train(run: Path, *overrides: str, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, str(REPO / "grpo_train.py"), *RUN, f"hydra.run.dir={run}", *overrides]
    return subprocess.Popen(cmd, cwd=REPO, env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


SECRET = "hf_" + "Secret0Token1Value2Never3Written4x"  # the shape of a Hugging Face token
API_KEY = "k" * 40


def test_no_secret_in_any_file_and_a_refused_resume_changes_nothing(tmp_path):
    """A token on the command line and a wandb key in the environment appear in no file of the run dir (configs,
    .hydra/, training_args.bin, checkpoints, the wandb offline run); then a resume with a new shape is refused
    with rc 2 and leaves every file, .hydra/ and config.yaml included, as it was."""
    run = tmp_path / "run"
    env = {**ENV, "WANDB_API_KEY": API_KEY}
    first = grpo_train(run, "logging=wandb", "logging.mode=offline", f"+training.extra.hub_token={SECRET}", env=env)
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out[-3000:]
    files = snapshot(run)
    assert {".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "config.yaml"} <= set(files)
    assert "checkpoint-1/training_args.bin" in files and any(name.startswith("wandb/") for name in files)
    leaks = [name for name, (_, data) in files.items() if SECRET.encode() in data or API_KEY.encode() in data]
    assert leaks == []
    assert "hub_token=***" in (run / ".hydra" / "overrides.yaml").read_text()

    refused = grpo_train(run, "training.max_steps=3", "model.reasoning_vocab_size=8", env=env)
    out, _ = refused.communicate(timeout=300)
    assert refused.returncode == 2, out[-3000:]
    assert "Resume refused: checkpoint-2" in out and "model.reasoning_vocab_size" in out
    assert snapshot(run) == files


def test_two_runs_into_one_dir_the_second_stops_and_ctrl_c_saves(tmp_path):
    """The lock against a real second process; Ctrl-C (SIGINT) on the first saves at the step boundary (rc 75)."""
    run = tmp_path / "run"
    long = ["training.max_steps=100000", "training.save_steps=100000"]  # runs until stopped; saves only then
    first = grpo_train(run, *long)
    try:
        deadline = time.monotonic() + 240
        while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text():
            assert first.poll() is None, first.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no step logged after 240 s"
            time.sleep(0.1)
        second = grpo_train(run, *long)
        out, _ = second.communicate(timeout=300)
        assert second.returncode == 2, out[-3000:]
        assert f"is in use by another run: pid {first.pid} on host {socket.gethostname()}, started " in out
        first.send_signal(signal.SIGINT)
        out, _ = first.communicate(timeout=300)
        assert first.returncode == 75, out[-3000:]
        assert "Received SIGINT: saving a checkpoint" in out and "Traceback" not in out
    finally:
        if first.poll() is None:  # a failed assertion must not leave it training
            first.kill()
            first.wait()
    (checkpoint,) = run.glob("checkpoint-*")  # saved at the step Ctrl-C landed in; test_resume.py resumes such a stop
    assert (checkpoint / "checkpoint_complete.json").is_file() and not (run / rundir.LOCK_FILE).exists()
