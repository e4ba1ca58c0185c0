"""Build the command a Slurm batch job runs: plain ``python grpo_train.py`` or ``srun`` + ``accelerate launch``.

slurm/_common.sh runs this file as a script (standard library only: no torch import) and runs what it prints:

    python rlvr_vocab/launch.py --format=shell -- experiment=baseline training.max_steps=100

* The Hydra run dir is ``outputs/<exp_name>/slurm-<job id>`` unless ``hydra.run.dir=`` is given, so a
  requeued job (same id) resumes from its own checkpoints.
* One process (one node, at most one GPU): ``<python> grpo_train.py <overrides>``.
* Several GPUs or nodes: one ``srun`` task per node, each running
  ``accelerate launch --machine_rank "$SLURM_NODEID" ...``. The rank is expanded by ``bash -c`` inside each
  task, so every node gets its own; expanding ``$SLURM_NODEID`` in the batch script (which runs on the first
  node only) would hand rank 0 to every node. The main process is the first host of the allocation.
  ``trap "" USR1`` makes the accelerate launcher ignore the time-limit signal that srun forwards to every
  process of the step; the training processes inherit the ignore but install their own handler
  (rlvr_vocab.resume.signal_handlers), so they checkpoint while the launcher keeps waiting for them.

The logic is Python rather than bash so the tests can call :func:`build_command` with a fake environment
(tests/test_launch.py); tests/test_multinode.py runs the same command on a real two-node cluster.

Environment (read at job start; sbatch exports the submitting shell's environment):
    ACCELERATE_CONFIG     ddp (default) | fsdp2 | a path to an accelerate config file
    RLVR_NPROC_PER_NODE   processes per node; default: the GPUs Slurm gave this node (on CPU nodes a value > 1
                          runs DDP over gloo: the trainer sets use_cpu, accelerate then picks MULTI_CPU)
    MASTER_PORT           rendezvous port; default 29500 + SLURM_JOB_ID % 20000 (jobs sharing a node differ)
    SLURM_JOB_NUM_NODES, SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE, SLURM_CPUS_PER_TASK, SLURM_JOB_NODELIST,
    CUDA_VISIBLE_DEVICES  read as Slurm sets them
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIG_DIR = REPO / "slurm" / "accelerate"
TRAIN_SCRIPT = "grpo_train.py"
RUN_DIR = "${{paths.output_root}}/${{exp_name}}/slurm-{job_id}"  # Hydra run dir of a batch job (conf/config.yaml keys)
NODE_RANK = '"$SLURM_NODEID"'  # expanded by bash inside each srun task, never in the batch script


def _count(value: str | None) -> int | None:
    """GPUs in a Slurm GPU spec: ``"4"``, ``"a100:4"``, ``"gpu:a100:2(IDX:0-1)"`` -> 4, 4, 2; None if unset.

    Example:
        >>> _count("4"), _count("a100:4"), _count("gpu:a100:2(IDX:0-1)"), _count(""), _count(None)
        (4, 4, 2, None, None)
    """
    if not value:
        return None
    counts = []
    for part in value.split(","):  # heterogeneous specs: "a100:2,v100:1"
        last = part.split("(")[0].split(":")[-1]
        if not last.isdigit():
            return None
        counts.append(int(last))
    return sum(counts)


def gpus_per_node(env: Mapping[str, str]) -> int:
    """GPUs of this job on one node, from what Slurm exported (0 on a CPU node).

    Example:
        >>> gpus_per_node({"SLURM_GPUS_ON_NODE": "4"}), gpus_per_node({"SLURM_GPUS_PER_NODE": "h100:8"})
        (4, 8)
        >>> gpus_per_node({"CUDA_VISIBLE_DEVICES": "0,1"}), gpus_per_node({})
        (2, 0)
    """
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        count = _count(env.get(key))
        if count is not None:
            return count
    visible = env.get("CUDA_VISIBLE_DEVICES", "")
    return len([d for d in visible.split(",") if d.strip()]) if visible.strip() else 0


def accelerate_config(name: str) -> str:
    """Path of an accelerate config: a name in slurm/accelerate/ (``ddp``, ``fsdp2``) or a path."""
    candidate = ACCELERATE_CONFIG_DIR / f"{name}.yaml"
    if candidate.is_file():
        return str(candidate)
    if Path(name).is_file():
        return str(Path(name).resolve())
    names = sorted(p.stem for p in ACCELERATE_CONFIG_DIR.glob("*.yaml"))
    raise ValueError(f"ACCELERATE_CONFIG={name!r} is neither one of {names} nor an existing file")


def build_command(
    overrides: Sequence[str],
    env: Mapping[str, str],
    hostnames: Sequence[str] = (),
    python: str = sys.executable,
    script: str = TRAIN_SCRIPT,
) -> list[str]:
    """The argv that trains with ``overrides`` in the Slurm allocation described by ``env``.

    Args:
        overrides: Hydra overrides passed through unchanged.
        env: the job's environment (``os.environ`` in a job; a dict in tests).
        hostnames: the allocation's hosts in order (``scontrol show hostnames``); needed for several nodes.
        python: the interpreter that runs training on every node.
        script: the training entry point.

    Example:
        >>> build_command(["experiment=debug"], {"SLURM_JOB_NUM_NODES": "1"}, python="python")
        ['python', 'grpo_train.py', 'experiment=debug']
    """
    overrides = list(overrides)
    if env.get("SLURM_JOB_ID") and not any(o.lstrip("+").startswith("hydra.run.dir=") for o in overrides):
        # A requeued job keeps its id: the rerun finds the checkpoints of the first attempt (a timestamped
        # dir would differ, and could differ between the ranks of one job).
        overrides.append(f"hydra.run.dir={RUN_DIR.format(job_id=env['SLURM_JOB_ID'])}")
    nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    gpus = gpus_per_node(env)
    procs_per_node = int(env.get("RLVR_NPROC_PER_NODE") or max(gpus, 1))
    if nodes == 1 and procs_per_node == 1:
        return [python, script, *overrides]

    if nodes > 1 and len(hostnames) < nodes:
        raise ValueError(f"{nodes} nodes but hostnames={list(hostnames)}: pass the allocation's hosts")
    main_host = hostnames[0] if hostnames else "127.0.0.1"
    port = env.get("MASTER_PORT") or str(29500 + int(env.get("SLURM_JOB_ID") or 0) % 20000)
    launcher = [
        python,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        accelerate_config(env.get("ACCELERATE_CONFIG") or "ddp"),
        "--num_machines",
        str(nodes),
        "--num_processes",
        str(nodes * procs_per_node),
        "--main_process_ip",
        main_host,
        "--main_process_port",
        port,
    ]
    task = f'trap "" USR1; exec {shlex.join(launcher)} --machine_rank {NODE_RANK} {shlex.join([script, *overrides])}'
    srun = ["srun", f"--nodes={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    if env.get("SLURM_CPUS_PER_TASK"):  # Slurm >= 22.05: srun no longer inherits it from sbatch
        srun.append(f"--cpus-per-task={env['SLURM_CPUS_PER_TASK']}")
    return [*srun, "bash", "-c", task]


def _hostnames(env: Mapping[str, str]) -> list[str]:
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        return []
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True)
    return out.stdout.split()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--format", choices=["nul", "shell"], default="nul", help="nul: for bash mapfile -d ''")
    parser.add_argument("--python", default=sys.executable, help="interpreter for training (default: this one)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (put them after --)")
    args = parser.parse_args(argv)
    env = os.environ
    nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    command = build_command(args.overrides, env, _hostnames(env) if nodes > 1 else (), python=args.python)
    if args.format == "shell":
        print(shlex.join(command))
    else:
        sys.stdout.write("".join(arg + "\0" for arg in command))


if __name__ == "__main__":
    main()
