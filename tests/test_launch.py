"""The launch command of the sbatch scripts (rlvr_vocab/launch.py) and the bash around it (slurm/_common.sh).

No cluster needed: a fake ``srun`` starts one task per "node" with that node's SLURM_NODEID, a fake
Python records the argv it was given, a fake ``scontrol`` records requeues. tests/test_slurm.py runs the
same scripts on a real Slurm.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlvr_vocab import launch

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["slurm/train_baseline.sh", "slurm/train_reasoning.sh"]


# ------------------------------------------------------------------------------------------------
# build_command: pure
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "gpus"),
    [
        ({"SLURM_GPUS_ON_NODE": "4", "SLURM_GPUS_PER_NODE": "8"}, 4),  # what this node got wins
        ({"SLURM_GPUS_PER_NODE": "h100:8"}, 8),
        ({"SLURM_GPUS_PER_NODE": "gpu:a100:2(IDX:0-1)"}, 2),
        ({"SLURM_GPUS_PER_NODE": "0"}, 0),  # sbatch --gpus-per-node=0 on a CPU cluster
        ({"CUDA_VISIBLE_DEVICES": "0,1,2"}, 3),
        ({}, 0),
    ],
)
def test_gpus_per_node(env, gpus):
    assert launch.gpus_per_node(env) == gpus


def test_one_gpu_runs_plain_python_in_a_run_dir_named_after_the_job():
    env = {"SLURM_JOB_ID": "123", "SLURM_JOB_NUM_NODES": "1", "SLURM_GPUS_ON_NODE": "1"}
    assert launch.build_command(["experiment=baseline", "a=b c"], env, python="py") == [
        "py",
        "grpo_train.py",
        "experiment=baseline",
        "a=b c",
        "hydra.run.dir=${paths.output_root}/${exp_name}/slurm-123",
    ]
    # an explicit run dir wins; outside Slurm nothing is added
    assert launch.build_command(["hydra.run.dir=/x"], env, python="py") == ["py", "grpo_train.py", "hydra.run.dir=/x"]
    assert launch.build_command(["a=1"], {}, python="py") == ["py", "grpo_train.py", "a=1"]


def test_run_dir_override_composes(tmp_path):
    """The run dir launch.py adds is a valid override for the real config."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    override = launch.build_command([], {"SLURM_JOB_ID": "42"}, python="py")[-1]
    out = subprocess.run(
        [sys.executable, "grpo_train.py", "experiment=baseline", override, "--cfg", "all", "--resolve"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "dir: outputs/baseline/slurm-42" in out


def test_accelerate_configs_resolve():
    assert launch.accelerate_config("ddp").endswith("slurm/accelerate/ddp.yaml")
    assert launch.accelerate_config("fsdp2").endswith("slurm/accelerate/fsdp2.yaml")
    with pytest.raises(ValueError, match=r"\['ddp', 'fsdp2'\]"):
        launch.accelerate_config("zero3")


def test_several_gpus_use_srun_and_accelerate():
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "1", "SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_PER_TASK": "16"}
    cmd = launch.build_command(["x=1"], env, hostnames=["gpu01"], python="py")
    assert cmd[:6] == [
        "srun",
        "--nodes=1",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
        "--cpus-per-task=16",
        "bash",
    ]
    task = cmd[-1]
    assert task.startswith('trap "" USR1; exec py -m accelerate.commands.launch')
    assert "--num_processes 4 " in task and "--main_process_port 29507 " in task
    assert '--machine_rank "$SLURM_NODEID" grpo_train.py x=1' in task  # expanded per task, not here


# ------------------------------------------------------------------------------------------------
# Several nodes through a fake srun: every node gets its own rank
# ------------------------------------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def _fake_srun(bin_dir: Path) -> None:
    """srun --nodes=N ... CMD...: run CMD once per node, as Slurm does, with SLURM_NODEID/SLURM_PROCID set."""
    _write(
        bin_dir / "srun",
        """#!/usr/bin/env bash
nodes=1
while [[ $1 == --* ]]; do [[ $1 == --nodes=* ]] && nodes=${1#--nodes=}; shift; done
pids=()
for ((i = 0; i < nodes; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i "$@" & pids+=($!); done
for pid in "${pids[@]}"; do wait "$pid" || exit 1; done
""",
    )


def _recording_python(path: Path, out_dir: Path) -> Path:
    """A 'python' that records its argv (one JSON file per call) and exits."""
    record = path.with_suffix(".py")
    record.write_text(
        "import json, sys, uuid\n"
        f"json.dump(sys.argv[1:], open({str(out_dir)!r} + '/' + uuid.uuid4().hex + '.json', 'w'))\n"
    )
    return _write(path, f'#!/usr/bin/env bash\nexec {sys.executable} {record} "$@"\n')


def test_each_node_gets_its_own_machine_rank(tmp_path):
    """The upstream bug: SLURM_NODEID expanded once in the batch script (node 0) gave every node rank 0."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    calls.mkdir()
    _fake_srun(bin_dir)
    python = _recording_python(bin_dir / "python", calls)
    env = {"SLURM_JOB_ID": "99", "SLURM_JOB_NUM_NODES": "3", "SLURM_GPUS_PER_NODE": "a100:2"}
    cmd = launch.build_command(["experiment=reasoning"], env, hostnames=["n1", "n2", "n3"], python=str(python))
    # The batch script itself runs on node 0: its SLURM_NODEID must not leak into the tasks.
    run_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_NODEID": "0"}
    subprocess.run(cmd, env=run_env, check=True, timeout=60)

    argvs = [json.loads(p.read_text()) for p in calls.glob("*.json")]
    assert len(argvs) == 3
    ranks = sorted(int(a[a.index("--machine_rank") + 1]) for a in argvs)
    assert ranks == [0, 1, 2]
    for argv in argvs:
        assert argv[:2] == ["-m", "accelerate.commands.launch"]
        opts = dict(zip(argv[2:-3:2], argv[3:-3:2], strict=False))
        assert opts["--num_machines"] == "3" and opts["--num_processes"] == "6"
        assert opts["--main_process_ip"] == "n1"  # first host of the allocation
        assert argv[-3:] == [
            "grpo_train.py",
            "experiment=reasoning",
            "hydra.run.dir=${paths.output_root}/${exp_name}/slurm-99",
        ]


def test_several_nodes_need_the_hostnames():
    with pytest.raises(ValueError, match="2 nodes"):
        launch.build_command([], {"SLURM_JOB_NUM_NODES": "2"}, hostnames=["n1"])


# ------------------------------------------------------------------------------------------------
# The bash scripts, run directly (no sbatch)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    out = subprocess.run(["bash", script, "--help"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert f"sbatch {script}" in out
    for name in (
        "SBATCH_PARTITION",
        "SBATCH_GPUS_PER_NODE",
        "ACCELERATE_CONFIG",
        "RLVR_PYTHON",
        "conf/local/slurm.env",
    ):
        assert name in out
    assert "#SBATCH --" not in out


def test_dry_run_prints_the_command():
    env = {**os.environ, "RLVR_DRY_RUN": "1", "SLURM_JOB_ID": "5", "SLURM_JOB_NUM_NODES": "2"}
    env.update(SLURM_JOB_NODELIST="n[1-2]", SLURM_GPUS_ON_NODE="8", ACCELERATE_CONFIG="fsdp2")
    if subprocess.run(["which", "scontrol"], capture_output=True).returncode:
        pytest.skip("scontrol (expands SLURM_JOB_NODELIST) is not installed")
    out = subprocess.run(
        ["bash", "slurm/train_reasoning.sh", "seed=3"], cwd=REPO, env=env, capture_output=True, text=True, check=True
    ).stdout
    assert out.startswith("srun --nodes=2 ")
    assert "slurm/accelerate/fsdp2.yaml" in out and "--num_processes 16" in out and "--main_process_ip n1" in out
    assert "grpo_train.py experiment=reasoning seed=3" in out


def _fake_job(tmp_path: Path, training: str) -> tuple[dict, Path]:
    """Environment where slurm/_common.sh runs ``training`` (Python code) as the 'training' and a fake scontrol."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _write(bin_dir / "scontrol", f'#!/usr/bin/env bash\necho "$@" >> {tmp_path}/scontrol.log\n')
    (tmp_path / "training.py").write_text(training)
    # rlvr_vocab/launch.py runs for real; what it builds ("python grpo_train.py ...") runs training.py instead.
    python = _write(
        bin_dir / "python",
        f"""#!/usr/bin/env bash
[ "$1" = rlvr_vocab/launch.py ] && exec {sys.executable} "$@"
exec {sys.executable} {tmp_path}/training.py "$@"
""",
    )
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RLVR_PYTHON": str(python), "OUT": str(tmp_path)}
    env["RLVR_SITE_ENV"] = str(tmp_path / "site.env")
    return env, tmp_path


def test_arguments_reach_training_intact_and_its_exit_code_comes_back(tmp_path):
    env, out = _fake_job(
        tmp_path,
        "import json, os, sys\njson.dump(sys.argv[1:], open(os.environ['OUT'] + '/argv.json', 'w'))\nsys.exit(3)\n",
    )
    (out / "site.env").write_text("export SITE_LOADED=yes\n")
    overrides = ["a=b c", "x='q'", 'y="$HOME"', "z=${oc.env:USER}", "+w=[1,2]"]
    proc = subprocess.run(
        ["bash", "slurm/train_baseline.sh", *overrides], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert json.loads((out / "argv.json").read_text()) == ["grpo_train.py", "experiment=baseline", *overrides]
    assert "sourcing site file" in proc.stdout
    assert not (out / "scontrol.log").exists()


SIGNALLED_TRAINING = """
import os, signal, sys, time
signal.signal(signal.SIGUSR1, lambda *a: open(os.environ['OUT'] + '/got', 'w').write('USR1'))
signal.signal(signal.SIGTERM, lambda *a: open(os.environ['OUT'] + '/got', 'w').write('TERM'))
open(os.environ['OUT'] + '/ready', 'w').close()
for _ in range(600):
    if os.path.exists(os.environ['OUT'] + '/got'):
        time.sleep(0.5)  # "saving a checkpoint"
        sys.exit(75)
    time.sleep(0.05)
sys.exit(1)
"""


@pytest.mark.parametrize(("signum", "requeued"), [(signal.SIGUSR1, True), (signal.SIGTERM, False)])
def test_time_limit_signal_is_forwarded_then_the_job_requeues(tmp_path, signum, requeued):
    env, out = _fake_job(tmp_path, SIGNALLED_TRAINING)
    env.update(SLURM_JOB_ID="31", SLURM_RESTART_COUNT="2")
    proc = subprocess.Popen(["bash", "slurm/train_baseline.sh"], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (out / "ready").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signum)  # what Slurm does: --signal=B:USR1@120 (batch shell only), or SIGTERM
    stdout, _ = proc.communicate(timeout=30)
    assert proc.returncode == 75, stdout
    assert (out / "got").read_text() == signal.Signals(signum).name[3:]
    if requeued:
        assert (out / "scontrol.log").read_text() == "requeue 31\n"
        assert "requeueing job 31 (restart 3 of at most 20)" in stdout
    else:
        assert not (out / "scontrol.log").exists()


def test_requeues_stop_at_the_limit(tmp_path):
    env, out = _fake_job(tmp_path, SIGNALLED_TRAINING)
    env.update(SLURM_JOB_ID="31", SLURM_RESTART_COUNT="3", RLVR_MAX_REQUEUE="3")
    proc = subprocess.Popen(["bash", "slurm/train_baseline.sh"], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    while not (out / "ready").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    stdout, _ = proc.communicate(timeout=30)
    assert proc.returncode == 75
    assert "not requeueing: 3 restarts reached RLVR_MAX_REQUEUE=3" in stdout
    assert not (out / "scontrol.log").exists()


# ------------------------------------------------------------------------------------------------
# Sweep launchers (conf/hydra/launcher/): site settings from the environment, typed
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("launcher", ["submitit_slurm", "submitit_local"])
def test_launcher_configs_compose_with_settings_from_the_environment(launcher, monkeypatch):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    import rlvr_vocab.config  # noqa: F401  (registers the schema)

    monkeypatch.setenv("SBATCH_PARTITION", "gpu-long")
    monkeypatch.setenv("SBATCH_GPUS_PER_NODE", "0")
    monkeypatch.setenv("RLVR_SLURM_TIMEOUT_MIN", "90")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}", "experiment=debug"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert params["_target_"].endswith("SlurmLauncher" if launcher == "submitit_slurm" else "LocalLauncher")
    launcher_cfg = cfg.hydra.launcher
    assert launcher_cfg.timeout_min == 90
    if launcher == "submitit_slurm":
        assert launcher_cfg.partition == "gpu-long" and launcher_cfg.gpus_per_node == 0
        assert launcher_cfg.account is None and launcher_cfg.max_num_timeout == 20
        assert launcher_cfg.additional_parameters == {"requeue": True}
    else:
        assert launcher_cfg.gpus_per_node == 0
