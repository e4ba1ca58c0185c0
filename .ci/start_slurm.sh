#!/usr/bin/env bash
# Start a single-node Slurm cluster on this machine (CI, or a dev box without a cluster).
#
# Installs Debian's slurm-wlm + munge, writes /etc/slurm/slurm.conf for this one host
# (CPUs = nproc, no GPUs, no cgroups, no accounting), starts munged, slurmctld and slurmd,
# then waits until the node is idle and a job runs. Safe to rerun: a working cluster is left
# alone. Needs root. Used by .ci/run before `make test`; tests marked `slurm` use the cluster.
#
# Env: SLURM_START_TIMEOUT  seconds to wait for the node and a test job (default 90)
#      SLURM_PARTITION      name of the default partition (default "debug")
set -euo pipefail

TIMEOUT=${SLURM_START_TIMEOUT:-90}
PARTITION=${SLURM_PARTITION:-debug}
CONF=/etc/slurm/slurm.conf
LOGDIR=/var/log/slurm
NODE=$(hostname -s)

log() { echo "[start_slurm] $*"; }
die() {
    echo "[start_slurm] ERROR: $*" >&2
    for f in "$LOGDIR/slurmctld.log" "$LOGDIR/slurmd.log"; do
        [ -f "$f" ] && { echo "--- tail $f" >&2; tail -n 20 "$f" >&2; }
    done
    exit 1
}

[ "$(id -u)" = 0 ] || die "must run as root (installs packages and starts daemons)"

# A job runs end to end: the cluster is up (also the success check after starting it).
cluster_works() {
    sinfo -h -N -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc)' \
        && timeout 30 srun -N1 -n1 -t 1 --quiet hostname >/dev/null 2>&1
}

# --- packages ---------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
    || ! command -v pgrep >/dev/null; then
    log "installing slurm-wlm, munge and procps"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge procps >/dev/null
fi

# --- munge --------------------------------------------------------------------------------------
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    log "generating /etc/munge/munge.key"
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    if [ -f /run/munge/munged.pid ]; then kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true; fi  # hung
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged --force
    for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
    munge -n | unmunge >/dev/null || die "munged does not answer"
fi

# --- slurm.conf ---------------------------------------------------------------------------------
CPUS=$(nproc)
# Slurm drains a node whose memory is below RealMemory: 90% of the total, in whole GiB (stable across reruns).
MEM_MB=$(awk '/MemTotal/ {printf "%d", int($2 / 1048576 * 0.9) * 1024}' /proc/meminfo)
install -d -m 0755 /etc/slurm /var/spool/slurmctld /var/spool/slurmd "$LOGDIR"
NEW_CONF=$(
    cat <<EOF
# Written by .ci/start_slurm.sh: single-node cluster for CI and development.
ClusterName=ci
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again once its old credential expired: 10 s instead of 120 s.
AuthInfo=cred_expire=10
# No cgroups: works in containers and VMs without a delegated cgroup tree.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
SchedulerType=sched/backfill
# Look for startable jobs every few seconds (defaults: 60 s, backfill 30 s): fast turnaround for tests.
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=${LOGDIR}/slurmctld.log
SlurmdLogFile=${LOGDIR}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# Accounting is off: sacct fails, submitit falls back to squeue/scontrol.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Short timeouts so a requeued or killed job turns around fast.
KillWait=10
MinJobAge=300
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM_MB} State=UNKNOWN
PartitionName=${PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
)
CONF_CHANGED=0
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$NEW_CONF" ]; then
    log "writing $CONF (node $NODE: $CPUS CPUs, ${MEM_MB} MB)"
    printf '%s\n' "$NEW_CONF" >"$CONF"
    CONF_CHANGED=1
fi

# --- daemons ------------------------------------------------------------------------------------
if [ "$CONF_CHANGED" = 0 ] && pgrep -x slurmctld >/dev/null && pgrep -x slurmd >/dev/null && cluster_works; then
    log "Slurm already running: $(sinfo -h -N -o '%N %P %t %c CPUs')"
    exit 0
fi
# Restart whatever runs but does not work (e.g. an older config), start what is missing.
for d in slurmd slurmctld; do
    if pid=$(pgrep -x "$d"); then
        log "stopping stale $d ($pid)"
        kill $pid 2>/dev/null || true
        for _ in $(seq 20); do pgrep -x "$d" >/dev/null || break; sleep 0.5; done
    fi
done
log "starting slurmctld and slurmd"
slurmctld || die "slurmctld did not start"
slurmd || die "slurmd did not start"

# --- wait until a job runs ----------------------------------------------------------------------
deadline=$((SECONDS + TIMEOUT))
until sinfo -h -N -o '%t' 2>/dev/null | grep -qE '^idle'; do
    state=$(sinfo -h -N -o '%t' 2>/dev/null || true)
    # A node left down/drained by an earlier run (e.g. a config change) is put back in service.
    if [[ $state =~ ^(down|drain|drng|fail)  ]]; then scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true; fi
    [ $SECONDS -lt $deadline ] || die "node $NODE not idle after ${TIMEOUT}s (state: ${state:-no answer})"
    sleep 1
done
timeout 60 srun -N1 -n1 -t 1 --quiet hostname >/dev/null || die "srun hostname failed"
out=$(mktemp -d)
chmod 0777 "$out"
timeout 60 sbatch --wait --quiet -t 1 -o "$out/%j.out" --wrap 'echo sbatch-ok' || die "sbatch --wait failed"
grep -q sbatch-ok "$out"/*.out || die "sbatch job wrote no output"
rm -rf "$out"
log "Slurm is up: $(sinfo -h -N -o '%N partition=%P state=%t cpus=%c mem=%mMB')"
