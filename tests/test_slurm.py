"""The sbatch scripts and the submitit sweep launcher on a real Slurm cluster (CI: .ci/start_slurm.sh).

Jobs ask for no GPU (``--gpus-per-node=0`` / ``SBATCH_GPUS_PER_NODE=0``) so they run on a CPU cluster too.
Skipped when ``sinfo`` is missing or no node is up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import logged_steps

from rlvr_vocab import checkpoints

REPO = Path(__file__).resolve().parents[1]


def _cluster_down_reason() -> str | None:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "Slurm is not installed (sinfo not on PATH; CI starts one with .ci/start_slurm.sh)"
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 20 s: slurmctld is down"
    if states.returncode != 0:
        return f"sinfo failed: {states.stderr.strip()} (start the cluster: sudo bash .ci/start_slurm.sh)"
    if not re.search(r"^(idle|mix|alloc)", states.stdout, re.MULTILINE):
        return f"no Slurm node is up (states: {states.stdout.split()})"
    return None


pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(_cluster_down_reason() is not None, reason=str(_cluster_down_reason())),
]


def _job_env(**extra: str) -> dict[str, str]:
    """What the jobs inherit (sbatch exports the submitting environment): this interpreter, offline, no GPU."""
    env = {**os.environ, "RLVR_PYTHON": sys.executable, "SBATCH_GPUS_PER_NODE": "0"}
    env.update(WANDB_MODE="offline", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def _job(job_id: str) -> dict[str, str]:
    """``scontrol show job`` as a dict ({} once Slurm forgot the job)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    return dict(kv.split("=", 1) for kv in out.stdout.split() if "=" in kv) if out.returncode == 0 else {}


def _wait_for(predicate, timeout: float, what: str, log: Path | None = None, job_id: str | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            job = _job(job_id) if job_id else {}
            state = {k: job.get(k) for k in ("JobState", "Reason", "Restarts", "EligibleTime", "StartTime")}
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; job {state}\n{tail}")
        time.sleep(0.5)


_ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", None)  # JobState at the end


def _trainer_state(run_dir: Path) -> dict:
    return json.loads((run_dir / "trainer_state.json").read_text())


def test_sbatch_script_trains(tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    cmd = ["sbatch", "--parsable", "--gpus-per-node=0", f"--output={log}", "slurm/train_baseline.sh"]
    cmd += ["debug=default", "training.max_steps=2", f"hydra.run.dir={run_dir}"]
    job_id = subprocess.run(cmd, cwd=REPO, env=_job_env(), capture_output=True, text=True, check=True).stdout.strip()
    # As sbatch --wait, which polls with growing gaps (it returned ~10 s after the job ended).
    _wait_for(lambda: _job(job_id).get("JobState") in _ENDED, 240, "the end", log, job_id)
    job_log = log.read_text() if log.exists() else "(no job log)"
    assert _job(job_id).get("JobState") == "COMPLETED", job_log[-3000:]
    assert "training exited with 0" in job_log
    assert "grpo_train.py experiment=baseline debug=default" in job_log
    state = _trainer_state(run_dir)
    assert state["global_step"] == 2
    assert (run_dir / "config.yaml").exists()


def test_time_limit_signal_checkpoints_requeues_and_resumes(tmp_path):
    """What --signal=B:USR1@120 does at the time limit, sent now: save, requeue, resume, finish."""
    # Enough steps that the signal lands well before the end, even on a loaded machine (~0.3 s a step).
    run_dir, log, max_steps = tmp_path / "run", tmp_path / "job.out", 24
    cmd = ["sbatch", "--parsable", "--gpus-per-node=0", f"--output={log}", "slurm/train_baseline.sh"]
    cmd += ["debug=default", f"training.max_steps={max_steps}", "training.save_steps=1", f"hydra.run.dir={run_dir}"]
    job_id = subprocess.run(cmd, cwd=REPO, env=_job_env(), capture_output=True, text=True, check=True).stdout.strip()
    try:
        _wait_for(
            lambda: (run_dir / "checkpoint-2" / checkpoints.COMPLETE_MARKER).exists(), 180, "checkpoint-2", log, job_id
        )
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
        _wait_for(lambda: _job(job_id).get("Restarts") == "1", 120, "the job to requeue itself", log, job_id)
        # A requeued job waits for its old credential to expire: AuthInfo=cred_expire (120 s by default;
        # .ci/start_slurm.sh sets 10 s) before it can start again.
        _wait_for(
            lambda: _job(job_id).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", None), 240, "the end", log
        )
    finally:
        subprocess.run(["scancel", job_id], check=False)
    job_log = log.read_text()
    assert _job(job_id).get("JobState") in ("COMPLETED", None), job_log[-3000:]
    assert "received SIGUSR1" in job_log and f"requeueing job {job_id}" in job_log
    assert "training exited with 75" in job_log and "training exited with 0" in job_log
    stopped = re.search(r"Stopped at step (\d+) after SIGUSR1", job_log)
    assert stopped and 2 <= int(stopped.group(1)) < max_steps, job_log[-3000:]
    assert f"Resuming from {run_dir}/checkpoint-{stopped.group(1)}" in job_log
    state = _trainer_state(run_dir)
    assert state["global_step"] == max_steps
    assert logged_steps(state) == list(range(1, max_steps + 1))


def test_submitit_sweep_runs_one_job_per_point(tmp_path):
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "grpo_train.py", "-m", "hydra/launcher=submitit_slurm", "experiment=debug"]
    cmd += ["training.learning_rate=1e-6,3e-6", f"hydra.sweep.dir={sweep_dir}"]
    done = subprocess.run(cmd, cwd=REPO, env=_job_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    run_dirs = sorted(p for p in sweep_dir.iterdir() if (p / "trainer_state.json").exists())
    assert [p.name for p in run_dirs] == ["0_training.learning_rate=1e-06", "1_training.learning_rate=3e-06"]
    for run_dir in run_dirs:
        assert _trainer_state(run_dir)["global_step"] == 2
    learning_rates = {
        json.loads((p / "trainer_state.json").read_text())["log_history"][0]["learning_rate"] for p in run_dirs
    }
    assert learning_rates == {1e-6, 3e-6}
    job_ids = {p.name.split("_")[0] for p in (sweep_dir / ".submitit").iterdir() if p.name[0].isdigit()}
    assert len(job_ids) == 1  # one Slurm array, one task per point


@pytest.mark.slow
def test_two_processes_stop_together_and_resume(tmp_path):
    """srun + accelerate launch (DDP over gloo on CPU): USR1 reaches both ranks through srun while the
    launcher ignores it; both stop at the same step, the job requeues, resumes and finishes."""
    run_dir, log, max_steps = tmp_path / "run", tmp_path / "job.out", 30  # the signal lands well before the end
    cmd = [
        "sbatch",
        "--parsable",
        "--gpus-per-node=0",
        "--cpus-per-task=2",
        f"--output={log}",
        "slurm/train_baseline.sh",
    ]
    cmd += ["debug=default", f"training.max_steps={max_steps}", "training.save_steps=1", f"hydra.run.dir={run_dir}"]
    env = _job_env(RLVR_NPROC_PER_NODE="2")
    job_id = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout.strip()
    try:
        _wait_for(
            lambda: (run_dir / "checkpoint-3" / checkpoints.COMPLETE_MARKER).exists(), 240, "checkpoint-3", log, job_id
        )
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
        _wait_for(
            lambda: _job(job_id).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", None), 300, "the end", log
        )
    finally:
        subprocess.run(["scancel", job_id], check=False)
    job_log = log.read_text()
    assert "accelerate.commands.launch" in job_log and "--num_processes 2" in job_log
    stops = re.findall(r"Stopped at step (\d+) after SIGUSR1", job_log)
    assert len(stops) == 2 and len(set(stops)) == 1, job_log[-3000:]  # both ranks, same step
    assert f"requeueing job {job_id}" in job_log and "training exited with 0" in job_log
    state = _trainer_state(run_dir)
    assert state["global_step"] == max_steps
    assert logged_steps(state) == list(range(1, max_steps + 1))
