#!/usr/bin/env bash
# A real SLURM on one machine: slurmctld plus two slurmd "nodes" (n1, n2), to try the templates
# on a laptop and to test them in CI.
#
#   slurm/local-cluster.sh start      # installs slurm with apt if missing (root), starts, waits for idle nodes
#   export SLURM_CONF=/tmp/weatherkd-slurm/slurm.conf
#   sbatch --gpus-per-node=0 slurm/distill.sbatch --config configs/distill/demo.yaml objective=scratch
#   slurm/local-cluster.sh stop
#
# Everything (config, state, spool, logs, pids) lives under $WEATHERKD_SLURM_DIR
# (default /tmp/weatherkd-slurm). Needs root: slurmd runs jobs as their users, and the fake node
# names go into /etc/hosts. Settings are the ones known to work inside containers (no cgroups,
# no accounting, no munge).
set -euo pipefail

DIR=${WEATHERKD_SLURM_DIR:-/tmp/weatherkd-slurm}
NODES=(n1 n2)
CTLD_PORT=${WEATHERKD_SLURM_PORT:-16817}
# What each fake node advertises. The templates ask for real-cluster sizes (8 GPUs, 32 CPUs), so
# the nodes claim them (SlurmdParameters=config_overrides) and the templates schedule unedited;
# jobs run on this machine's real cores, on CPU.
CPUS=${WEATHERKD_SLURM_CPUS:-64}
GPUS=${WEATHERKD_SLURM_GPUS:-8}
MEM_MB=${WEATHERKD_SLURM_MEM_MB:-262144}

die() { echo "local-cluster: $*" >&2; exit 1; }

install_slurm() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null && return
    [ "$(id -u)" = 0 ] || die "slurm is not installed and this is not root: apt-get install slurmctld slurmd slurm-client"
    command -v apt-get >/dev/null || die "slurm is not installed and there is no apt-get to install it"
    echo "local-cluster: installing slurm with apt-get" >&2
    local apt=(apt-get -q -o Acquire::http::Timeout=20 -o Acquire::Retries=1)  # offline: fail fast, not hang
    DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y slurmctld slurmd slurm-client >"$DIR/apt.log" 2>&1 \
        || { "${apt[@]}" update >>"$DIR/apt.log" 2>&1 \
             && DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y slurmctld slurmd slurm-client >>"$DIR/apt.log" 2>&1; } \
        || die "apt-get could not install slurm; see $DIR/apt.log"
}

write_config() {
    local port=$((CTLD_PORT + 1)) nodes=""
    for n in "${NODES[@]}"; do
        nodes+="NodeName=$n NodeAddr=127.0.0.1 Port=$port CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:$GPUS State=UNKNOWN"$'\n'
        port=$((port + 1))
    done
    cat >"$DIR/slurm.conf" <<EOF
ClusterName=weatherkd-local
GresTypes=gpu
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmUser=root
AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmdParameters=config_overrides
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$((MEM_MB / CPUS))
SchedulerParameters=batch_sched_delay=0
KillWait=30
$nodes
PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
    echo "CgroupPlugin=cgroup/v1" >"$DIR/cgroup.conf"
    # Stand-in GPU devices: GPU requests schedule as written; nothing uses them.
    mkdir -p "$DIR/fake-gpu"
    for i in $(seq 0 $((GPUS - 1))); do  # char devices like /dev/null; plain files work too, with log noise
        [ -e "$DIR/fake-gpu/$i" ] || mknod "$DIR/fake-gpu/$i" c 1 3 2>/dev/null || touch "$DIR/fake-gpu/$i"
    done
    echo "Name=gpu File=$DIR/fake-gpu/[0-$((GPUS - 1))]" >"$DIR/gres.conf"
}

add_hosts() {
    for n in "${NODES[@]}"; do
        grep -qE "^127\.0\.0\.1[[:space:]].*\b$n\b" /etc/hosts || echo "127.0.0.1 $n" >>/etc/hosts \
            || die "cannot add '$n' to /etc/hosts (needs root)"
    done
}

start() {
    mkdir -p "$DIR/state" "$DIR/spool"
    if [ -f "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
        echo "local-cluster: already running; export SLURM_CONF=$DIR/slurm.conf"
        return
    fi
    install_slurm
    write_config
    add_hosts
    export SLURM_CONF=$DIR/slurm.conf
    slurmctld -D -i -f "$SLURM_CONF" >"$DIR/slurmctld.out" 2>&1 &
    for n in "${NODES[@]}"; do
        mkdir -p "$DIR/spool/$n"
        slurmd -D -N "$n" -f "$SLURM_CONF" >"$DIR/slurmd-$n.out" 2>&1 &
    done
    for _ in $(seq 60); do
        if [ "$(sinfo -h -N -o '%t' 2>/dev/null | grep -c idle)" = "${#NODES[@]}" ]; then
            echo "local-cluster: ${#NODES[*]} nodes idle; export SLURM_CONF=$SLURM_CONF"
            return
        fi
        sleep 1
    done
    stop >/dev/null 2>&1 || true
    die "nodes did not come up within 60 s; see $DIR/slurmctld.log and $DIR/slurmd-*.log"
}

stop() {
    export SLURM_CONF=$DIR/slurm.conf
    [ -f "$SLURM_CONF" ] && scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
    for pidfile in "$DIR"/slurmd-*.pid "$DIR/slurmctld.pid"; do
        [ -f "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$pidfile"
    done
    rm -rf "$DIR/state" "$DIR/spool"
    echo "local-cluster: stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) SLURM_CONF=$DIR/slurm.conf sinfo -N ;;
    *) die "usage: $0 start|stop|status" ;;
esac
