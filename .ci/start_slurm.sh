#!/usr/bin/env bash
# Start a Slurm cluster on this machine (CI, or a dev box without a cluster): two nodes by default.
#
# Two nodes (SLURM_CI_NODES=2): each slurmd runs in its own network namespace (rlvr-n1, rlvr-n2) with its
# own hostname (a UTS namespace) and its own address on a private bridge that this script creates
# (rlvr-br0, 10.77.0.0/24: slurmctld on .1 in the root namespace, the nodes on .11 and .12). A node's
# namespace has loopback and its veth into the bridge, nothing else and no default route; its /etc/hosts
# (/etc/netns/<ns>/hosts) names the nodes. So Slurm sees two real nodes, and a job's processes run inside
# their node's namespace: torch.distributed between the nodes goes over the bridge, and nothing leaves it.
# Each node has all of this machine's CPUs (the nodes oversubscribe the cores) and RealMemory below its memory.
# One node (SLURM_CI_NODES=1): slurmd in the root namespace as this host, on 127.0.0.1.
#
# Installs Debian's slurm-wlm + munge (and iproute2), writes /etc/slurm/slurm.conf (no GPUs, no cgroups, no
# accounting), starts munged, slurmctld and the slurmds, then waits until every node is idle and jobs run
# (srun on every node, sbatch --wait). Safe to rerun: a working cluster with the same config is left alone;
# a different one (e.g. the older single-node layout) is stopped through its pid files and restarted.
# Needs root. Used by .ci/run before `make test`; tests marked `slurm` use the cluster.
#
# Env: SLURM_CI_NODES       nodes: 2 (default, network namespaces) or 1 (this host only)
#      SLURM_START_TIMEOUT  seconds to wait for the nodes and a test job (default 90)
#      SLURM_PARTITION      name of the default partition (default "debug")
set -Eeuo pipefail  # -E: the ERR trap around setup_network also fires inside it

NODES=${SLURM_CI_NODES:-2}
TIMEOUT=${SLURM_START_TIMEOUT:-90}
PARTITION=${SLURM_PARTITION:-debug}
CONF=/etc/slurm/slurm.conf
LOGDIR=/var/log/slurm
HOST=$(hostname -s)
# The private link of the two-node layout (only used there): a bridge in the root namespace, one veth per node.
BRIDGE=rlvr-br0
SUBNET=10.77.0
CTLD_ADDR=$SUBNET.1
NODE_IF=rlvr0  # the node's end of its veth, inside its namespace

log() { echo "[start_slurm] $*"; }
die() {
    echo "[start_slurm] ERROR: $*" >&2
    for f in "$LOGDIR"/slurmctld.log "$LOGDIR"/slurmd*.log; do
        [ -f "$f" ] && { echo "--- tail $f" >&2; tail -n 20 "$f" >&2; }
    done
    exit 1
}

[ "$(id -u)" = 0 ] || die "must run as root (installs packages, creates network namespaces, starts daemons)"
case $NODES in 1 | 2) ;; *) die "SLURM_CI_NODES=$NODES: 1 or 2" ;; esac

# Node i (1-based) of the two-node layout: its Slurm name (= hostname = namespace) and address.
node_name() { echo "rlvr-n$1"; }
node_addr() { echo "$SUBNET.$((10 + $1))"; }
if [ "$NODES" = 1 ]; then NODE_NAMES=("$HOST"); else NODE_NAMES=("$(node_name 1)" "$(node_name 2)"); fi

# --- packages ---------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
    || ! command -v pgrep >/dev/null || ! command -v ip >/dev/null || ! command -v unshare >/dev/null; then
    log "installing slurm-wlm, munge, procps and iproute2"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge procps iproute2 util-linux >/dev/null
fi

# --- munge --------------------------------------------------------------------------------------
# Its socket (/run/munge/munge.socket.2) is a file: the daemons in the node namespaces reach it too.
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

# --- network: bridge, one namespace + veth per node (two-node layout) ---------------------------
# Each step checks first, so a rerun changes nothing. Addresses go only on the links made here.
setup_network() {
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        log "creating bridge $BRIDGE ($CTLD_ADDR/24)"
        ip link add "$BRIDGE" type bridge
    fi
    # (the address lists are read first: `ip | grep -q` fails under pipefail when grep stops reading early)
    [[ $(ip addr show dev "$BRIDGE") == *"inet $CTLD_ADDR/24"* ]] || ip addr add "$CTLD_ADDR/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    local i ns addr host_if
    for i in 1 2; do
        ns=$(node_name "$i") addr=$(node_addr "$i") host_if="$(node_name "$i")-h"
        [ -e "/run/netns/$ns" ] || { log "creating network namespace $ns ($addr)"; ip netns add "$ns"; }
        if ! ip -n "$ns" link show "$NODE_IF" >/dev/null 2>&1; then
            ip link del "$host_if" 2>/dev/null || true  # a half-made pair from an interrupted run
            ip link add "$host_if" type veth peer name "$NODE_IF" netns "$ns"
        fi
        ip link set "$host_if" master "$BRIDGE" up
        ip -n "$ns" link set lo up
        [[ $(ip -n "$ns" addr show dev "$NODE_IF") == *"inet $addr/24"* ]] || ip -n "$ns" addr add "$addr/24" dev "$NODE_IF"
        ip -n "$ns" link set "$NODE_IF" up
        # The node's /etc/hosts (slurmd's mount namespace binds it over /etc/hosts; `ip netns exec` does the same).
        # No resolv.conf is needed: without a default route every other address is unreachable from the node.
        install -d -m 0755 "/etc/netns/$ns"
        {
            echo "# Written by .ci/start_slurm.sh: the hosts of the CI cluster, seen from node $ns."
            echo "127.0.0.1 localhost"
            echo "$CTLD_ADDR $HOST"
            echo "$(node_addr 1) $(node_name 1)"
            echo "$(node_addr 2) $(node_name 2)"
        } >"/etc/netns/$ns/hosts.new"
        if cmp -s "/etc/netns/$ns/hosts.new" "/etc/netns/$ns/hosts"; then rm "/etc/netns/$ns/hosts.new"; else
            mv "/etc/netns/$ns/hosts.new" "/etc/netns/$ns/hosts"
        fi
    done
}
if [ "$NODES" = 2 ]; then
    trap 'die "could not create the private network (needs CAP_NET_ADMIN; SLURM_CI_NODES=1 avoids it)"' ERR
    setup_network
    trap - ERR
fi

# --- slurm.conf ---------------------------------------------------------------------------------
CPUS=$(nproc)
# Slurm drains a node whose memory is below RealMemory: 90% of the total, in whole GiB (stable across reruns).
MEM_MB=$(awk '/MemTotal/ {printf "%d", int($2 / 1048576 * 0.9) * 1024}' /proc/meminfo)
install -d -m 0755 /etc/slurm /var/spool/slurmctld "$LOGDIR"
for n in "${NODE_NAMES[@]}"; do install -d -m 0755 "/var/spool/slurmd/$n"; done
if [ "$NODES" = 1 ]; then
    CTLD="${HOST}(127.0.0.1)"
    NODE_LINES="NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM_MB} State=UNKNOWN"
else
    CTLD="${HOST}(${CTLD_ADDR})"
    NODE_LINES="NodeName=$(node_name 1) NodeAddr=$(node_addr 1) CPUs=${CPUS} RealMemory=${MEM_MB} State=UNKNOWN
NodeName=$(node_name 2) NodeAddr=$(node_addr 2) CPUs=${CPUS} RealMemory=${MEM_MB} State=UNKNOWN"
fi
NEW_CONF=$(
    cat <<EOF
# Written by .ci/start_slurm.sh: ${NODES}-node cluster for CI and development.
ClusterName=ci
SlurmctldHost=${CTLD}
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
# %n: the node's name. Each slurmd has its own spool dir, pid file and log (the nodes share one filesystem).
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=${LOGDIR}/slurmctld.log
SlurmdLogFile=${LOGDIR}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# Accounting is off: sacct fails, submitit falls back to squeue/scontrol.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Short timeouts so a requeued or killed job turns around fast.
KillWait=10
MinJobAge=300
${NODE_LINES}
PartitionName=${PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
)

# The pid files a slurm.conf's daemons write: slurmctld's, then one per node (%n, %h expanded).
pid_files() {
    local conf=$1 ctld slurmd node
    ctld=$(grep -oP '^SlurmctldPidFile=\K\S+' "$conf" || echo /var/run/slurmctld.pid)
    slurmd=$(grep -oP '^SlurmdPidFile=\K\S+' "$conf" || echo /var/run/slurmd.pid)
    echo "slurmctld $ctld"
    for node in $(grep -oP '^NodeName=\K\S+' "$conf"); do
        echo "slurmd ${slurmd/\%n/$node}" | sed "s/%h/$node/"
    done
}

# The pid in FILE when that process is the daemon NAME, else nothing (a stale file, or a reused pid).
live_pid() {
    local name=$1 file=$2 pid
    pid=$(cat "$file" 2>/dev/null) || return 1
    [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] && echo "$pid"
}

# Every node is up, a job runs on all of them at once, and each reports its own hostname.
cluster_works() {
    local states hosts
    states=$(sinfo -h -N -o '%N %t' 2>/dev/null) || return 1
    [ "$(grep -cE ' (idle|mix|alloc)' <<<"$states")" = "$NODES" ] || return 1
    hosts=$(timeout 30 srun -N"$NODES" -n"$NODES" --ntasks-per-node=1 -t 1 --quiet hostname 2>/dev/null | sort)
    [ "$hosts" = "$(printf '%s\n' "${NODE_NAMES[@]}" | sort)" ]
}

CONF_CHANGED=0
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$NEW_CONF" ]; then CONF_CHANGED=1; fi

# --- daemons ------------------------------------------------------------------------------------
all_running() {
    local name file
    while read -r name file; do live_pid "$name" "$file" >/dev/null || return 1; done < <(pid_files "$CONF")
}
if [ "$CONF_CHANGED" = 0 ] && all_running && cluster_works; then
    log "Slurm already running: $(sinfo -h -N -o '%N %P %t %c CPUs' | paste -sd ';' -)"
    exit 0
fi
# Stop what the old config started (the single-node layout, or a cluster that does not work), by pid file.
if [ -f "$CONF" ]; then
    while read -r name file; do
        if pid=$(live_pid "$name" "$file"); then
            log "stopping $name ($pid, from $file)"
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 20); do [ -d "/proc/$pid" ] || break; sleep 0.5; done
        fi
    done < <(pid_files "$CONF")
fi
if [ "$CONF_CHANGED" = 1 ]; then
    log "writing $CONF ($NODES node(s): ${NODE_NAMES[*]}; $CPUS CPUs and ${MEM_MB} MB each)"
    printf '%s\n' "$NEW_CONF" >"$CONF"
fi
log "starting slurmctld"
slurmctld || die "slurmctld did not start"
for n in "${NODE_NAMES[@]}"; do
    log "starting slurmd $n"
    if [ "$NODES" = 1 ]; then
        slurmd || die "slurmd did not start"
    else
        # The node's network namespace, its own hostname (slurmd finds its NodeName from it) and its own
        # /etc/hosts in a private mount namespace. Not `ip netns exec`: that remounts /sys without the cgroup
        # mounts, and slurmd refuses to start without them.
        nsenter --net="/run/netns/$n" unshare --uts --mount --propagation slave \
            sh -c "mount --bind /etc/netns/$n/hosts /etc/hosts && hostname $n && exec slurmd" \
            || die "slurmd $n did not start"
    fi
done

# --- wait until jobs run ------------------------------------------------------------------------
deadline=$((SECONDS + TIMEOUT))
until [ "$(sinfo -h -N -o '%t' 2>/dev/null | grep -c '^idle')" = "$NODES" ]; do
    states=$(sinfo -h -N -o '%N=%t' 2>/dev/null | paste -sd ' ' - || true)
    # A node left down/drained by an earlier run (e.g. a config change) is put back in service.
    for entry in $states; do
        if [[ ${entry#*=} =~ ^(down|drain|drng|fail) ]]; then
            scontrol update NodeName="${entry%%=*}" State=RESUME 2>/dev/null || true
        fi
    done
    [ $SECONDS -lt $deadline ] || die "nodes not idle after ${TIMEOUT}s (states: ${states:-no answer})"
    sleep 1
done
if [ "$NODES" = 2 ]; then  # node to node over the bridge: rlvr-n2 reaches rlvr-n1's slurmd by name
    ip netns exec "$(node_name 2)" timeout 5 bash -c "echo >/dev/tcp/$(node_name 1)/6818" \
        || die "$(node_name 2) cannot reach $(node_name 1) over $BRIDGE"
fi
cluster_works || die "srun on all $NODES node(s) failed or reported the wrong hostnames"
out=$(mktemp -d)
chmod 0777 "$out"
timeout 60 sbatch --wait --quiet -t 1 -o "$out/%j.out" --wrap 'echo sbatch-ok' || die "sbatch --wait failed"
grep -q sbatch-ok "$out"/*.out || die "sbatch job wrote no output"
rm -rf "$out"
log "Slurm is up: $(sinfo -h -N -o '%N partition=%P state=%t cpus=%c mem=%mMB' | paste -sd ';' -)"
