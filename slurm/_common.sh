# shellcheck shell=bash
# Shared body of the sbatch scripts slurm/train_*.sh (sourced, not run): site setup, Python, launch,
# signal forwarding and requeue. The scripts hold only their #SBATCH lines and their experiment.
#
# What a job does:
#   1. sources the site file (conf/local/slurm.env, gitignored; template: slurm/site.env.example)
#   2. picks the Python: RLVR_PYTHON, else the submitting shell's venv/conda env, else ./.venv
#   3. builds the command with rlvr_vocab/launch.py (plain python on one GPU; srun + accelerate
#      launch over several GPUs/nodes) and runs it in the background
#   4. on SIGUSR1 (sent by Slurm 120 s before the time limit: --signal=B:USR1@120) or SIGTERM, forwards
#      the signal to training, which saves a checkpoint at the end of its step and exits 75
#   5. after USR1, requeues the job (scontrol requeue); the rerun resumes from the newest complete checkpoint
set -euo pipefail

RLVR_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

_log() { echo "[$(date '+%F %T')] [slurm] $*"; }

# Prints the calling script's header comment, then what every script shares.
_usage() {
    local script=$1
    awk 'NR > 1 && /^#SBATCH/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$script"
    cat <<EOF

Usage:
  sbatch [sbatch options] $script [hydra overrides...]   submit (from the repository root)
  bash $script --help                                    this text
  RLVR_DRY_RUN=1 bash $script [overrides...]             print the training command, run nothing

Every argument is a Hydra override for grpo_train.py (training.max_steps=200 model=qwen3_0.6b ...).
sbatch options on the command line override the #SBATCH lines: e.g. --time=12:00:00 --nodes=2.

Resources and site (read by sbatch at submission; command-line options win over these, these win over #SBATCH):
  SBATCH_ACCOUNT, SBATCH_PARTITION, SBATCH_QOS    your cluster's account, partition, QoS
  SBATCH_GPUS_PER_NODE   GPUs per node (script default 1; 0 on a CPU-only cluster)
  SBATCH_CPUS_PER_TASK   CPU cores per node (the default is the partition's, often 1)
  SBATCH_TIMELIMIT       wall time per job (script default 04:00:00; the job requeues itself at the limit)

In the job (export before sbatch, or set in the site file):
  RLVR_SITE_ENV          site file sourced at job start (default: conf/local/slurm.env) for module loads,
                         conda activate, HF_HOME, HF_HUB_OFFLINE, NCCL settings, ...
  RLVR_PYTHON            interpreter to use (default: \$VIRTUAL_ENV, \$CONDA_PREFIX, ./.venv, python3)
  ACCELERATE_CONFIG      ddp (default) | fsdp2 | path: how several GPUs/nodes share the model
  RLVR_NPROC_PER_NODE    processes per node (default: the node's GPUs)
  MASTER_PORT            rendezvous port for several GPUs (default: derived from the job id)
  NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME   interface between nodes (NCCL on GPUs, gloo on CPU) where the default is wrong
  RLVR_MAX_REQUEUE       stop requeueing after this many restarts (default 20)
  RLVR_DRY_RUN=1         print the command instead of running it

Several nodes (sbatch --nodes=N): srun starts one task per node; each runs accelerate launch with its own
--machine_rank (\$SLURM_NODEID, read inside the task) and the first node as rendezvous. The run dir must be on
a filesystem all nodes share. Every rank appends where it ran and a hash of its weights to <run dir>/ranks/.

Preemption: the job gets SIGUSR1 120 s before its time limit; training saves a checkpoint after the
current step and exits 75; the job requeues itself and the rerun resumes from that checkpoint. A job keeps
its id across requeues, so its run dir is outputs/<exp_name>/slurm-<job id> unless you pass hydra.run.dir.
With several processes, accelerate's launcher reports the ranks' exit 75 as a ChildFailedError and srun exits
non-zero: expected; "Stopped at step N" from every rank is what tells that the checkpoint was saved.
  scancel --signal=USR1 --batch JOBID   checkpoint now and requeue (e.g. to pick up new code)
  scancel --signal=TERM --full JOBID    checkpoint now and stop (exit 75; rerun the job's command to resume)
Logs: logs/<job name>-<job id>.out (Slurm does not create logs/: mkdir -p logs once).
EOF
}

# Picks the interpreter: explicit, then the environment the job was submitted from, then the repo's venv.
_python() {
    if [ -n "${RLVR_PYTHON:-}" ]; then
        echo "$RLVR_PYTHON"
    elif [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
        echo "$VIRTUAL_ENV/bin/python"
    elif [ -n "${CONDA_PREFIX:-}" ] && [ -x "$CONDA_PREFIX/bin/python" ]; then
        echo "$CONDA_PREFIX/bin/python"
    elif [ -x "$RLVR_ROOT/.venv/bin/python" ]; then
        echo "$RLVR_ROOT/.venv/bin/python"
    else
        command -v python3 || command -v python
    fi
}

# run_training SCRIPT OVERRIDES...: the whole job. SCRIPT is the calling script (for --help).
run_training() {
    local script=$1
    shift
    local arg
    for arg in "$@"; do
        case $arg in -h | --help) _usage "$script"; return 0 ;; esac
    done

    local site=${RLVR_SITE_ENV:-$RLVR_ROOT/conf/local/slurm.env}
    if [ -f "$site" ]; then
        _log "sourcing site file $site"
        set +u  # module/conda scripts read unset variables
        # shellcheck disable=SC1090
        source "$site"
        set -u
    fi
    local python
    python=$(_python) || { _log "no Python found: set RLVR_PYTHON"; return 1; }
    cd "$RLVR_ROOT"
    export PYTHONUNBUFFERED=1

    # launch.py runs as a plain script: no package import (torch), so this takes milliseconds.
    local -a cmd
    local built shown
    built=$("$python" rlvr_vocab/launch.py --python "$python" --format=nul -- "$@" | base64 -w0) && [ -n "$built" ] \
        || { _log "rlvr_vocab/launch.py failed (python: $python)"; return 1; }
    mapfile -d '' -t cmd < <(base64 -d <<<"$built")  # NUL-separated argv: any override survives intact
    shown=$("$python" rlvr_vocab/launch.py --python "$python" --format=shell -- "$@")
    if [ -n "${RLVR_DRY_RUN:-}" ]; then
        echo "$shown"
        return 0
    fi

    _log "job ${SLURM_JOB_ID:-none} (${SLURM_JOB_NAME:-}) restart ${SLURM_RESTART_COUNT:-0}" \
        "on ${SLURM_JOB_NODELIST:-$(hostname)}: ${SLURM_JOB_NUM_NODES:-1} node(s)," \
        "GPUs/node ${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}, CPUs/task ${SLURM_CPUS_PER_TASK:-default}"
    _log "repo $RLVR_ROOT at $(git -C "$RLVR_ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')" \
        "$(git -C "$RLVR_ROOT" diff --quiet HEAD 2>/dev/null || echo '(uncommitted changes)')"
    _log "python $python"
    _log "running: $shown"

    # Run in the background: bash runs a trap only between commands, and `wait` returns on a trapped signal.
    local child="" got_usr1=0 rc=0
    _forward() {
        [ "$1" = USR1 ] && got_usr1=1
        _log "received SIG$1: forwarding to training (pid ${child:-none}) to checkpoint and stop"
        [ -n "$child" ] && kill -s "$1" "$child" 2>/dev/null || true
    }
    trap '_forward USR1' USR1
    trap '_forward TERM' TERM
    "${cmd[@]}" &
    child=$!
    while :; do
        wait "$child" && rc=0 || rc=$?
        kill -0 "$child" 2>/dev/null || break  # exited; otherwise wait was cut short by a trapped signal
    done
    wait "$child" && rc=0 || rc=$?  # bash keeps the status: this is the child's, even after an interrupted wait
    trap - USR1 TERM
    _log "training exited with $rc"

    if [ "$got_usr1" = 1 ] && [ "$rc" != 0 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
        local restarts=${SLURM_RESTART_COUNT:-0} max=${RLVR_MAX_REQUEUE:-20}
        if [ "$restarts" -lt "$max" ]; then
            _log "requeueing job $SLURM_JOB_ID (restart $((restarts + 1)) of at most $max)"
            scontrol requeue "$SLURM_JOB_ID"
        else
            _log "not requeueing: $restarts restarts reached RLVR_MAX_REQUEUE=$max"
        fi
    fi
    return "$rc"
}
