#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for tests and CI: munged, slurmctld and slurmd started
# by hand (no systemd), configured in /etc/slurm/slurm.conf (jobs submitted by the Snakemake plugin
# lose SLURM_CONF, so the default path is the only one that reaches them).
#
#   tests/slurm/cluster.sh start    install the packages if missing (root + apt), write the config,
#                                   start the daemons, wait until the node is idle; idempotent
#   tests/slurm/cluster.sh stop     stop the daemons this script started (and only those)
#   tests/slurm/cluster.sh status   print the daemons and the node; exit 0 when the node is usable
#
# Exit status: 0 ok; 1 failed (the message says why, with the daemons' log tails); 3 SLURM is not
# installed and cannot be (not root, or apt-get failed): callers may skip, except in CI.
#
# Environment:
#   DINO_SLURM_STATE   state, logs and pid files (default /var/lib/dino-slurm)
#   DINO_SLURM_CPUS    CPUs the node declares (default: the machine's); more than the machine has
#                      oversubscribes it, which lets more 1-CPU jobs run at once on a small CI box
#   DINO_SLURM_WAIT    seconds to wait for the node to become idle (default 30)
#
# Choices (measured on a 2-core machine: start ~1-1.5 s, stop ~2 s, sbatch --wait of `true` ~2 s):
#   * SelectType=select/cons_tres with CR_CPU: CPUs are the consumable, memory is not, so a job may
#     ask for --mem up to the node's RealMemory (95% of what slurmd -C reports) without memory
#     being booked: several jobs run at once, one per CPU (2 on a 2-core machine).
#   * SlurmdParameters=config_overrides: the node line states CPUs only and slurmd does not drain
#     the node when DINO_SLURM_CPUS exceeds the hardware.
#   * JobRequeue=1 (batch jobs are requeueable by default: `scontrol requeue` and preemption work),
#     KillWait=10 (SIGTERM, then SIGKILL 10 s later, on scancel/requeue/time limit).
#   * AuthInfo=cred_expire=10: a requeued job may start again only cred_expire+1 s after the
#     requeue (default 120 s, which made a requeue test take 2 minutes); and
#     SchedulerParameters=sched_interval=1,bf_interval=1 so that it, and any pending job, is looked
#     at every second instead of every 30-60 s. A requeue now reruns the job ~11 s later.
#   * Accounting is off: sacct fails, so Snakemake's slurm plugin needs a squeue status command.
#   * slurmctld starts with -c (fresh state): old test jobs never come back.
set -euo pipefail

STATE=${DINO_SLURM_STATE:-/var/lib/dino-slurm}
CONF=/etc/slurm/slurm.conf
MARKER="# written by tests/slurm/cluster.sh"
WAIT=${DINO_SLURM_WAIT:-30}
PACKAGES=(slurmctld slurmd slurm-client munge)

log() { echo "cluster.sh: $*" >&2; }

die() {
    log "error: $*"
    for f in "$STATE/slurmctld.log" "$STATE/slurmd.log"; do
        if [[ -s $f ]]; then
            echo "---- last lines of $f" >&2
            tail -n 15 "$f" >&2
        fi
    done
    exit 1
}

# pid from our pid file if that process is alive and is the named program, else empty.
our_pid() {
    local name=$1 pidfile=$STATE/$1.pid pid
    [[ -s $pidfile ]] || return 0
    pid=$(<"$pidfile")
    if [[ $pid =~ ^[0-9]+$ ]] && [[ -r /proc/$pid/comm ]] && [[ $(</proc/"$pid"/comm) == "$name" ]]; then
        echo "$pid"
    fi
}

# pids of processes named exactly $1 (without pgrep, which procps may not provide).
pids_named() {
    local d
    for d in /proc/[0-9]*; do
        [[ -r $d/comm ]] && [[ $(<"$d/comm" 2>/dev/null) == "$1" ]] && echo "${d#/proc/}"
    done
    return 0
}

install_if_missing() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return 0
    fi
    log "installing ${PACKAGES[*]}"
    if ! { DEBIAN_FRONTEND=noninteractive apt-get update -q \
            && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"; } >&2; then
        log "apt-get could not install ${PACKAGES[*]}"
        exit 3
    fi
}

start_munge() {
    if timeout 5 munge -n </dev/null >/dev/null 2>&1; then
        return 0   # a munged answers already (ours or the system's): use it
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge /etc/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        if command -v mungekey >/dev/null; then
            runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        fi
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    # 9>&-: the daemons must not inherit the lock (munged keeps its descriptors open).
    runuser -u munge -- munged --pid-file=/run/munge/munged.pid 9>&-
    cp /run/munge/munged.pid "$STATE/munged.pid"
    local i
    for i in $(seq 50); do
        timeout 5 munge -n </dev/null >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "munged does not answer (see /var/log/munge/munged.log)"
}

write_config() {
    local host cpus mem hw_cpus hw_mem
    host=$(hostname -s)
    read -r hw_cpus hw_mem < <(slurmd -C | awk '/^NodeName/ {
        for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
        print v["CPUs"], v["RealMemory"] }')
    [[ $hw_cpus =~ ^[0-9]+$ && $hw_mem =~ ^[0-9]+$ ]] || die "cannot read CPUs/RealMemory from slurmd -C"
    cpus=${DINO_SLURM_CPUS:-$hw_cpus}
    mem=$((hw_mem * 95 / 100))
    mkdir -p "$STATE/ctld" "$STATE/d" /etc/slurm
    cat >"$STATE/slurm.conf.new" <<EOF
$MARKER; a one-node test cluster
ClusterName=dino-test
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
JobRequeue=1
KillWait=10
SchedulerParameters=sched_interval=1,bf_interval=1
InactiveLimit=0
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

node_state() {
    timeout 5 sinfo -h -N -o '%T' 2>/dev/null | head -n 1 || true
}

wait_idle() {
    local deadline=$((SECONDS + WAIT)) state=""
    while ((SECONDS < deadline)); do
        state=$(node_state)
        case $state in
            idle | mixed | allocated | completing) return 0 ;;
        esac
        sleep 0.2
    done
    die "the node is not idle after ${WAIT}s (sinfo says '${state:-nothing}')"
}

# SIGTERM to the named daemons we started, all at once (each takes 1-2 s to exit), then wait;
# SIGKILL what is left after 10 s.
stop_daemons() {
    local name pid i pids=() names=()
    for name in "$@"; do
        pid=$(our_pid "$name")
        if [[ -n $pid ]]; then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
            names+=("$name($pid)")
        fi
        rm -f "$STATE/$name.pid"
    done
    ((${#pids[@]})) || return 0
    local alive
    for i in $(seq 100); do
        alive=0
        for pid in "${pids[@]}"; do
            [[ -d /proc/$pid ]] && alive=1
        done
        ((alive)) || break
        sleep 0.1
    done
    for pid in "${pids[@]}"; do
        [[ -d /proc/$pid ]] && kill -KILL "$pid" 2>/dev/null || true
    done
    log "stopped ${names[*]}"
}

# Kill the jobs still running, so that none outlives the daemons as an orphan.
kill_jobs() {
    [[ -n $(our_pid slurmctld) ]] || return 0
    local jobs i
    jobs=$(timeout 10 squeue -h -t RUNNING,COMPLETING,PENDING -o %A 2>/dev/null | tr '\n' ' ' || true)
    [[ -n ${jobs// /} ]] || return 0
    log "killing jobs $jobs"
    # shellcheck disable=SC2086
    timeout 10 scancel --full --signal=KILL $jobs 2>/dev/null || true
    # shellcheck disable=SC2086
    timeout 10 scancel $jobs 2>/dev/null || true
    for i in $(seq 50); do
        [[ -z $(pids_named slurmstepd) ]] && return 0
        sleep 0.1
    done
}

cmd_stop() {
    kill_jobs
    stop_daemons slurmd slurmctld munged
}

cmd_start() {
    install_if_missing
    local name foreign
    for name in slurmctld slurmd; do
        if [[ -z $(our_pid "$name") ]]; then
            foreign=$(pids_named "$name" | tr '\n' ' ')
            [[ -z $foreign ]] || die "a $name not started by this script is running (pid $foreign); stop it first"
        fi
    done
    write_config
    if [[ -n $(our_pid slurmctld) && -n $(our_pid slurmd) ]] && cmp -s "$STATE/slurm.conf.new" "$CONF"; then
        wait_idle
        log "already running"
        return 0
    fi
    kill_jobs
    stop_daemons slurmd slurmctld
    if [[ -e $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
        log "keeping the previous $CONF as $CONF.orig"
        cp -p "$CONF" "$CONF.orig"
    fi
    mv "$STATE/slurm.conf.new" "$CONF"
    start_munge
    : >"$STATE/slurmctld.log"
    : >"$STATE/slurmd.log"
    slurmctld -c 9>&- || die "slurmctld did not start"
    slurmd 9>&- || die "slurmd did not start"
    wait_idle
    log "running: node $(hostname -s) $(node_state), $(timeout 5 sinfo -h -N -o '%c CPUs %m MB')"
}

cmd_status() {
    local name pid ok=0
    for name in munged slurmctld slurmd; do
        pid=$(our_pid "$name")
        if [[ -n $pid ]]; then
            echo "$name: running (pid $pid)"
        elif [[ $name == munged ]] && timeout 5 munge -n </dev/null >/dev/null 2>&1; then
            echo "munged: running (not started by this script)"
        else
            echo "$name: not running"
            ok=1
        fi
    done
    local state=""
    # sinfo against a dead slurmctld blocks ~10 s: ask only when one runs.
    [[ -n $(pids_named slurmctld) ]] && state=$(node_state)
    echo "node: ${state:-unreachable}"
    case $state in idle | mixed | allocated | completing) ;; *) ok=1 ;; esac
    return $ok
}

# One caller at a time (two pytest sessions may start the cluster together).
lock() {
    mkdir -p "$STATE"
    exec 9>"$STATE/lock"
    flock -w 120 9 || die "another cluster.sh holds $STATE/lock"
}

case ${1:-} in
    start)
        # Installing packages, /etc/slurm and the daemons all need root.
        [[ $(id -u) -eq 0 ]] || { log "starting a SLURM cluster needs root (uid $(id -u))"; exit 3; }
        lock
        cmd_start
        ;;
    stop) lock; cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
