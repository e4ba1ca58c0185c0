"""Training across two Slurm nodes (CI: .ci/start_slurm.sh runs each slurmd in its own network namespace).

Real jobs, CPU only: ``sbatch --nodes=2`` runs one ``accelerate launch`` per node (DDP over gloo), the Hydra
submitit launcher runs one two-node job per sweep point. Every rank writes ``ranks/rank-<r>.jsonl``
(rlvr_vocab/distributed.py): where it ran, the steps it took and a hash of its parameters, which the tests
compare with each other and with the saved weights. Skipped without a cluster of at least two idle nodes,
except the first test, which needs no Slurm.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rlvr_vocab import checkpoints
from rlvr_vocab.distributed import params_sha256, read_rank_records

REPO = Path(__file__).resolve().parents[1]
# A reward that varies with the completion's length (the tiny random model never gets an answer right), so
# the gradients are not zero and the weights move: equal replicas then mean the ranks really synchronised.
LEARNS = [
    "debug=default",
    "reward.funcs=[soft_overlong]",
    "reward.weights=[1.0]",
    "+reward.kwargs.soft_overlong={max_completion_length:12,soft_cache_length:12}",
    "training.max_completion_length=12",
]
LR = "training.learning_rate=5e-3"  # large enough that 2 steps visibly move the tiny model


# ------------------------------------------------------------------------------------------------
# No cluster: the checkpoint barrier, with two real gloo processes
# ------------------------------------------------------------------------------------------------

_SAVE_WITH_SLOW_MARKER = """
import json, sys, time
from pathlib import Path
from types import SimpleNamespace

import torch.distributed as dist

from rlvr_vocab import checkpoints, resume

dist.init_process_group("gloo")
rank, out = dist.get_rank(), Path(sys.argv[1])
checkpoint = out / "checkpoint-3"
if rank == 0:  # the Trainer wrote the checkpoint; flushing it to disk takes a while (a big model, a slow filesystem)
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"weights")
    mark_complete = checkpoints.mark_complete
    checkpoints.mark_complete = lambda *args: (time.sleep(3), mark_complete(*args))[1]
dist.barrier()  # the Trainer's save is over on every rank
state = SimpleNamespace(global_step=3, is_world_process_zero=rank == 0)
resume.PreemptionCallback().on_save(SimpleNamespace(output_dir=str(out)), state, SimpleNamespace())
print(json.dumps({"rank": rank, "marker_on_disk": (checkpoint / checkpoints.COMPLETE_MARKER).exists()}))
dist.destroy_process_group()
"""


def test_no_rank_leaves_a_save_before_its_checkpoint_is_marked_complete(tmp_path):
    """After a stop every rank exits right after the save; the first exit makes srun --kill-on-bad-exit (and
    torchrun) terminate the others. So no rank may return from on_save while rank 0 still writes the marker."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "save.py"
    script.write_text(_SAVE_WITH_SLOW_MARKER)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    env["PYTHONPATH"] = str(REPO)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path)],
            env={**env, "RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert results == [{"rank": 0, "marker_on_disk": True}, {"rank": 1, "marker_on_disk": True}]


# ------------------------------------------------------------------------------------------------
# Two nodes of a real cluster
# ------------------------------------------------------------------------------------------------


def _two_nodes_missing() -> str | None:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "Slurm is not installed (CI starts a two-node cluster with .ci/start_slurm.sh)"
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 20 s: slurmctld is down"
    up = {line.split()[0] for line in out.stdout.splitlines() if re.search(r" (idle|mix|alloc)", line)}
    if out.returncode != 0 or len(up) < 2:
        return f"needs two Slurm nodes up, found {sorted(up)} (sudo bash .ci/start_slurm.sh starts two)"
    return None


_MISSING = _two_nodes_missing()
needs_two_nodes = pytest.mark.skipif(_MISSING is not None, reason=str(_MISSING))


def _job_env(**extra: str) -> dict[str, str]:
    """What the jobs inherit (sbatch exports the submitting environment): this interpreter, offline, no GPU."""
    env = {**os.environ, "RLVR_PYTHON": sys.executable, "SBATCH_GPUS_PER_NODE": "0"}
    env.update(WANDB_MODE="offline", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def _job(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    return dict(kv.split("=", 1) for kv in out.stdout.split() if "=" in kv) if out.returncode == 0 else {}


def _hostnames(nodelist: str) -> list[str]:
    return subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True).stdout.split()


def _wait_for(predicate, timeout: float, what: str, log: Path, job_id: str) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            job = _job(job_id)
            state = {k: job.get(k) for k in ("JobState", "Reason", "Restarts", "NodeList")}
            tail = log.read_text()[-3000:] if log.exists() else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; job {state}\n{tail}")
        time.sleep(0.5)


def _wait_for_end(job_id: str, timeout: float, log: Path) -> None:
    ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", None)
    _wait_for(lambda: _job(job_id).get("JobState") in ended, timeout, "the end", log, job_id)


def _train_steps(run_dir: Path) -> tuple[list[int], list[int]]:
    """Steps of the training-step records in metrics.jsonl and in trainer_state.json (not the final summary)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    state = json.loads((run_dir / "trainer_state.json").read_text())
    return [r["step"] for r in lines if "loss" in r], [e["step"] for e in state["log_history"] if "loss" in e]


def _saved_sha256(directory: Path) -> str:
    return params_sha256(load_file(directory / "model.safetensors").items())


def _events(records: dict[int, list[dict]], event: str, restart: int) -> dict[int, dict]:
    """Rank -> its record of ``event`` in attempt ``restart`` of the job."""
    found = {}
    for rank, lines in records.items():
        for record in lines:
            if record["event"] == event and record["slurm_restart"] == restart:
                found[rank] = record
    return found


def _check_two_ranks_on_two_nodes(begin: dict[int, dict], nodes: list[str]) -> None:
    assert sorted(begin) == [0, 1], begin
    assert {r["world_size"] for r in begin.values()} == {2}
    assert sorted(r["node_rank"] for r in begin.values()) == [0, 1]  # each node its own machine rank
    assert sorted(r["hostname"] for r in begin.values()) == sorted(nodes)  # one rank per node of the job
    assert begin[0]["hostname"] == nodes[0]  # rank 0 on the first node: the rendezvous host
    assert {r["backend"] for r in begin.values()} == {"gloo"}
    assert [r["is_world_process_zero"] for _, r in sorted(begin.items())] == [True, False]


@pytest.mark.slurm
@needs_two_nodes
def test_two_node_job_trains_one_replica_per_node(tmp_path):
    run_dir, log, max_steps = tmp_path / "run", tmp_path / "job.out", 4
    cmd = ["sbatch", "--parsable", "--nodes=2", "--gpus-per-node=0", f"--output={log}"]
    cmd += ["slurm/train_baseline.sh", *LEARNS, LR, f"training.max_steps={max_steps}", f"hydra.run.dir={run_dir}"]
    job_id = subprocess.run(cmd, cwd=REPO, env=_job_env(), capture_output=True, text=True, check=True).stdout.strip()
    _wait_for_end(job_id, 300, log)  # as sbatch --wait, which polls with growing gaps (10-15 s lost here)
    job_log = log.read_text() if log.exists() else "(no job log)"
    assert _job(job_id).get("JobState") == "COMPLETED", job_log[-3000:]
    assert "srun --nodes=2 --ntasks-per-node=1" in job_log and "--num_machines 2 --num_processes 2" in job_log
    assert "training exited with 0" in job_log

    records = read_rank_records(run_dir)
    begin, end = _events(records, "train_begin", 0), _events(records, "train_end", 0)
    _check_two_ranks_on_two_nodes(begin, _hostnames(_job(job_id)["NodeList"]))
    # Both ranks trained every step; the replicas are equal, moved, and are what was saved.
    assert [(r["global_step"], r["steps_run"]) for r in end.values()] == [(max_steps, max_steps)] * 2
    final = _saved_sha256(run_dir)
    assert end[0]["params_sha256"] == end[1]["params_sha256"] == final
    assert begin[0]["params_sha256"] == begin[1]["params_sha256"] != final
    # One writer: each step logged once (two writers would log it twice), one set of checkpoints, in which
    # each rank's RNG state sits next to the single copy of the weights.
    metrics_steps, state_steps = _train_steps(run_dir)
    assert metrics_steps == state_steps == list(range(1, max_steps + 1))
    saved = checkpoints.checkpoint_dirs(run_dir)
    assert [step for step, _ in saved] == list(range(1, max_steps + 1))
    for _, checkpoint in saved:
        assert checkpoints.is_complete_checkpoint(checkpoint, require_marker=True), checkpoint
        assert sorted(p.name for p in checkpoint.glob("rng_state*")) == ["rng_state_0.pth", "rng_state_1.pth"]
    assert _saved_sha256(saved[-1][1]) == final


@pytest.mark.slurm
@needs_two_nodes
@pytest.mark.parametrize("how", ["time_limit_signal", pytest.param("scontrol_requeue", marks=pytest.mark.slow)])
def test_two_node_job_stops_together_requeues_and_resumes(tmp_path, how):
    """time_limit_signal: what --signal=B:USR1@120 does at the time limit, sent now to the batch shell, which
    forwards USR1 to srun, srun to the task on each node. scontrol_requeue: Slurm sends SIGTERM to every process
    of the job and requeues it (preemption by requeue). Either way both ranks stop at the same step, one
    checkpoint is saved, the job requeues, the two-node rerun resumes from it and finishes, each step logged once."""
    # No periodic checkpoint: the only one before the end is the one the signal asks for.
    run_dir, log, max_steps = tmp_path / "run", tmp_path / "job.out", 12
    cmd = ["sbatch", "--parsable", "--nodes=2", "--gpus-per-node=0", f"--output={log}", "slurm/train_baseline.sh"]
    cmd += [*LEARNS, LR, f"training.max_steps={max_steps}", "training.save_steps=1000", f"hydra.run.dir={run_dir}"]
    job_id = subprocess.run(cmd, cwd=REPO, env=_job_env(), capture_output=True, text=True, check=True).stdout.strip()
    metrics = run_dir / "metrics.jsonl"
    signal = "USR1" if how == "time_limit_signal" else "TERM"
    try:
        _wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 2, 240, "step 2", log, job_id)
        if how == "time_limit_signal":
            subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
        else:
            subprocess.run(["scontrol", "requeue", job_id], check=True)
        _wait_for(lambda: _job(job_id).get("Restarts") == "1", 120, "the job to requeue", log, job_id)
        _wait_for_end(job_id, 300, log)
    finally:
        subprocess.run(["scancel", job_id], check=False)
    job_log = log.read_text()
    assert _job(job_id).get("JobState") == "COMPLETED", job_log[-3000:]
    if how == "time_limit_signal":  # the job requeues itself; after scontrol requeue Slurm does
        assert job_log.count("received SIGUSR1") == 1 and f"requeueing job {job_id}" in job_log
    stops = re.findall(rf"Stopped at step (\d+) after SIG{signal}", job_log)
    assert len(stops) == 2 and len(set(stops)) == 1, job_log[-3000:]  # both ranks, the same step
    stop = int(stops[0])
    assert 2 <= stop < max_steps
    assert job_log.count(f"Resuming from {run_dir}/checkpoint-{stop}") == 2  # both ranks of the rerun
    assert job_log.rstrip().endswith("training exited with 0")

    records = read_rank_records(run_dir)
    nodes = _hostnames(_job(job_id)["NodeList"])
    stopped, resumed, end = (
        _events(records, e, r) for e, r in [("train_end", 0), ("train_begin", 1), ("train_end", 1)]
    )
    _check_two_ranks_on_two_nodes(resumed, nodes)
    # Before the rerun (which saves at max_steps) one checkpoint was written: the stop step's, holding what both
    # ranks held when they stopped.
    assert sorted(checkpoints.checkpoint_step(p) for p in run_dir.glob("checkpoint-*")) == [stop, max_steps]
    assert checkpoints.is_complete_checkpoint(run_dir / f"checkpoint-{stop}", require_marker=True)
    at_stop = _saved_sha256(run_dir / f"checkpoint-{stop}")
    assert [(r["global_step"], r["params_sha256"]) for r in stopped.values()] == [(stop, at_stop)] * 2
    assert [(r["global_step"], r["params_sha256"]) for r in resumed.values()] == [(stop, at_stop)] * 2
    final = _saved_sha256(run_dir)
    assert [(r["global_step"], r["steps_run"], r["params_sha256"]) for r in end.values()] == [
        (max_steps, max_steps - stop, final)
    ] * 2
    metrics_steps, state_steps = _train_steps(run_dir)
    assert metrics_steps == state_steps == list(range(1, max_steps + 1))


@pytest.mark.slurm
@needs_two_nodes
def test_submitit_sweep_runs_one_two_node_job_per_point(tmp_path):
    """One point (tests/test_slurm.py shows one job per point for two points): its job spans both nodes."""
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "grpo_train.py", "-m", "hydra/launcher=submitit_slurm", "hydra.launcher.nodes=2"]
    cmd += [*LEARNS, "training.learning_rate=1e-3", f"hydra.sweep.dir={sweep_dir}"]
    done = subprocess.run(cmd, cwd=REPO, env=_job_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    run_dirs = [p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(run_dirs) == 1 and run_dirs[0].name.startswith("0_"), run_dirs
    run_dir = run_dirs[0]
    submitted = [p.read_text() for p in sweep_dir.glob(".submitit/*/*_submission.sh")]
    assert len(submitted) == 1 and "#SBATCH --nodes=2" in submitted[0]
    records = read_rank_records(run_dir)
    begin, end = _events(records, "train_begin", 0), _events(records, "train_end", 0)
    job_id = begin[0]["slurm_job_id"]
    assert begin[1]["slurm_job_id"] == job_id  # both ranks in the point's one job
    _check_two_ranks_on_two_nodes(begin, _hostnames(_job(job_id)["NodeList"]))
    final = _saved_sha256(run_dir)
    assert [(r["global_step"], r["params_sha256"]) for r in end.values()] == [(2, final)] * 2
    assert begin[0]["params_sha256"] != final
    metrics_steps, _ = _train_steps(run_dir)
    assert metrics_steps == [1, 2]  # one writer
    state = json.loads((run_dir / "trainer_state.json").read_text())
    assert state["log_history"][0]["learning_rate"] == 1e-3  # the point's override
