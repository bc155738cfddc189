#!/usr/bin/env bash
# slurm-minicluster.sh -- a real Slurm 22.05 cluster (Debian 12 packages) on ONE machine.
#
# Layout
#   controller  slurmctld in the host network namespace, on the address BRIDGE_NET.1 of a
#               bridge this script creates (127.0.0.1 can't be reached from the node
#               namespaces, so the controller listens on the bridge).
#   nodes       node1..nodeN: each one is a network namespace (<prefix>I, a veth into the
#               bridge, address BRIDGE_NET.(10+I)) plus a UTS namespace (hostname nodeI) that
#               runs its own `slurmd -N nodeI`.  Entered with `nsenter --net`, NOT
#               `ip netns exec` (which also unshares the mount namespace, and job tasks would
#               inherit it: CRIU would then have to dump a mount namespace).
#   auth        one munged for all nodes: its pathname unix socket (/run/munge/munge.socket.2)
#               is reachable from every network namespace.  A munged that already answers is
#               reused and never stopped.
#   state       everything (slurm.conf, spool, state, logs, pid files) under $CCR_SLURM_BASE;
#               /etc/slurm is not touched.
#
# Usage: slurm-minicluster.sh up | down | restart | status | env | install
#   up        install the packages if missing, then start whatever is not running yet, wait
#             until every node is idle and run `srun -N<nodes> true` (idempotent)
#   down      stop what `up` started, remove the namespaces and the bridge (idempotent; logs
#             and state stay in the base dir)
#   status    print the state of every piece; exit 0 if the cluster is up, 3 if not
#   env       print `export SLURM_CONF=...`; use: eval "$(slurm-minicluster.sh env)"
#   install   only install the Debian packages (slurmctld slurmd slurm-client munge)
#
# Environment:
#   CCR_SLURM_BASE        base dir (default /tmp/ccr-slurm)
#   CCR_SLURM_NODES       number of compute nodes (default 3)
#   CCR_SLURM_NET         first three octets of the bridge network (default 10.77.0)
#   CCR_SLURM_BRIDGE      bridge name (default ccrbr0)
#   CCR_SLURM_NS_PREFIX   netns name prefix (default ccr-node)
#   CCR_SLURM_CTLD_PORT   slurmctld port (default 6817)
#   CCR_SLURM_CRED_EXPIRE job credential lifetime in s (default 20; Slurm's is 120).  A
#                         requeued job is held this long (+1 s) before it may start again.
#   CCR_SLURM_TIMEOUT     seconds to wait for the nodes to become idle (default 60)
#
# Safety: only processes this script started are ever signalled, by PID: the pid files under
# the base dir (checked against the expected command name) and `ip netns pids` of the node
# namespaces this script created.  Nothing is ever killed by name.  Needs root.
set -euo pipefail

BASE=${CCR_SLURM_BASE:-/tmp/ccr-slurm}
NODES=${CCR_SLURM_NODES:-3}
NET=${CCR_SLURM_NET:-10.77.0}
BR=${CCR_SLURM_BRIDGE:-ccrbr0}
NSPFX=${CCR_SLURM_NS_PREFIX:-ccr-node}
CTLD_PORT=${CCR_SLURM_CTLD_PORT:-6817}
CRED_EXPIRE=${CCR_SLURM_CRED_EXPIRE:-20}
TIMEOUT=${CCR_SLURM_TIMEOUT:-60}

CONF=$BASE/etc/slurm.conf
RUN=$BASE/run
CTL_ADDR=$NET.1
PACKAGES=(slurmctld slurmd slurm-client munge)

T0=${EPOCHREALTIME/[.,]/}
log() {
    local us=$((${EPOCHREALTIME/[.,]/} - T0))
    printf 'slurm-minicluster [+%d.%03ds] %s\n' $((us / 1000000)) $((us % 1000000 / 1000)) "$*" >&2
}
die() {
    log "ERROR: $*"
    exit 1
}
need_root() { [ "$(id -u)" -eq 0 ] || die "must run as root"; }
slurm() { SLURM_CONF=$CONF "$@"; }

# The host-side veth of node I; interface names are limited to 15 characters.
veth() { printf '%.12sv%s' "$BR" "$1"; }

# ------------------------------------------------------------------ processes
# alive PID [COMM]: PID exists, is not a zombie, and (if given) its comm is COMM.
# (PID 1 of a container/VM without systemd may reap orphans late: a zombie counts as dead.)
alive() {
    local pid=${1:-} comm=${2:-} stat
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [ "${stat:0:1}" != Z ] || return 1
    [ -z "$comm" ] || [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ]
}
pidfile() {
    if [ -s "$1" ]; then tr -dc '0-9' <"$1" || true; fi
}

# stop COMM PID...: SIGTERM the PIDs whose comm is COMM, wait up to 10 s, then SIGKILL.
stop() {
    local comm=$1 pid left _
    shift
    for pid in "$@"; do
        if alive "$pid" "$comm"; then kill -TERM "$pid" 2>/dev/null || true; fi
    done
    for _ in $(seq 100); do
        left=()
        for pid in "$@"; do alive "$pid" "$comm" && left+=("$pid"); done
        [ ${#left[@]} -eq 0 ] && return 0
        sleep 0.1
    done
    log "$comm (${left[*]}) still running 10 s after SIGTERM: SIGKILL"
    for pid in "${left[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}

# ------------------------------------------------------------------ packages
have_packages() {
    local b
    for b in slurmctld slurmd srun sinfo scontrol sbatch munged munge unmunge; do
        command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || return 1
    done
}
cmd_install() {
    need_root
    have_packages && return 0
    command -v apt-get >/dev/null || die "packages missing and no apt-get: install ${PACKAGES[*]}"
    log "installing ${PACKAGES[*]}"
    # Don't let the packages start their system services (munge, slurmd, slurmctld): this
    # script runs its own daemons.  Only a policy-rc.d created here is removed again.
    local policy=/usr/sbin/policy-rc.d ours=0 rc=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 0755 "$policy"
        ours=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || log "apt-get update failed; trying the cached package lists"
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null || rc=$?
    [ "$ours" -eq 0 ] || rm -f "$policy"
    [ "$rc" -eq 0 ] || die "apt-get install ${PACKAGES[*]} failed (rc $rc)"
    have_packages || die "packages installed but binaries still missing"
    log "packages installed"
}

# ------------------------------------------------------------------ munge
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
munge_up() {
    if munge_ok; then
        log "munged already answers: using it"
        return 0
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
    if [ ! -s /etc/munge/munge.key ]; then
        log "creating /etc/munge/munge.key"
        if command -v mungekey >/dev/null; then
            runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        fi
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    # A munged that died leaves its socket and pid file behind, and a new one refuses to start.
    # Only reached when nothing answers on the socket.
    rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged
    local _
    for _ in $(seq 50); do
        munge_ok && break
        sleep 0.1
    done
    munge_ok || die "munged did not come up"
    pidfile /run/munge/munged.pid >"$RUN/munged.ours"
    log "munged started (pid $(cat "$RUN/munged.ours"))"
}
munge_down() {
    local pid
    pid=$(pidfile "$RUN/munged.ours")
    # never stop a munged this script did not start
    if [ -n "$pid" ] && [ "$(pidfile /run/munge/munged.pid)" = "$pid" ]; then
        stop munged "$pid"
    fi
    rm -f "$RUN/munged.ours"
}

# ------------------------------------------------------------------ network
our_netns() {
    ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${NSPFX}[0-9]+$" || true
}
net_up() {
    if ! ip link show "$BR" >/dev/null 2>&1; then
        ip link add "$BR" type bridge
    fi
    ip addr replace "$CTL_ADDR/24" dev "$BR"
    ip link set "$BR" up
    # with br_netfilter loaded, bridged frames would go through the host's iptables
    if [ -w /proc/sys/net/bridge/bridge-nf-call-iptables ]; then
        echo 0 >/proc/sys/net/bridge/bridge-nf-call-iptables
    fi
    local i ns v
    for i in $(seq "$NODES"); do
        ns=$NSPFX$i v=$(veth "$i")
        [ -e "/run/netns/$ns" ] || ip netns add "$ns"
        if ! ip link show "$v" >/dev/null 2>&1; then
            ip -n "$ns" link del eth0 2>/dev/null || true
            ip link add "$v" type veth peer name eth0 netns "$ns"
        fi
        ip link set "$v" master "$BR" up
        ip -n "$ns" link set lo up
        ip -n "$ns" addr replace "$NET.$((10 + i))/24" dev eth0
        ip -n "$ns" link set eth0 up
    done
    log "bridge $BR ($CTL_ADDR/24) and $NODES node namespaces ready"
}
net_down() {
    local ns
    for ns in $(our_netns); do
        ip netns del "$ns" || true # takes its veth pair along
    done
    if ip link show "$BR" >/dev/null 2>&1; then ip link del "$BR" || true; fi
}

# ------------------------------------------------------------------ slurm.conf
write_conf() {
    install -d "$BASE/etc" "$BASE/state" "$BASE/log" "$RUN"
    local i tmp=$CONF.tmp
    {
        cat <<EOF
# Generated by scripts/slurm-minicluster.sh; rewritten by every \`up\`.
ClusterName=ccr
SlurmctldHost=$(hostname -s)($CTL_ADDR)
SlurmctldPort=$CTLD_PORT
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# job credential lifetime (default 120 s); also the hold time of a requeued job
AuthInfo=cred_expire=$CRED_EXPIRE
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# All slurmd share one kernel and cgroup tree: no cgroup plugins.  linuxproc tracks every
# descendant of slurmstepd, CRIU-restored tasks under a waiter included.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# start batch jobs at once (default delay 3 s); main scheduler every 2 s (default 60 s)
SchedulerParameters=batch_sched_delay=0,sched_interval=2
# every slurmd sees the whole machine: don't drain nodes whose config differs from it
SlurmdParameters=config_overrides
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=10
InactiveLimit=0
KillWait=5
Waittime=0
# no accounting (no sacct): finished jobs stay in scontrol/squeue for 5 minutes
MinJobAge=300
MailProg=/bin/true
EOF
        for i in $(seq "$NODES"); do
            echo "NodeName=node$i NodeHostname=node$i NodeAddr=$NET.$((10 + i)) CPUs=2 RealMemory=1000 State=UNKNOWN"
        done
        echo "PartitionName=debug Nodes=node[1-$NODES] Default=YES MaxTime=INFINITE State=UP"
    } >"$tmp"
    CONF_CHANGED=0
    cmp -s "$tmp" "$CONF" || CONF_CHANGED=1
    mv "$tmp" "$CONF"
    for i in $(seq "$NODES"); do install -d "$BASE/spool/node$i"; done
}

# ------------------------------------------------------------------ daemons
ctld_pid() { pidfile "$RUN/slurmctld.pid"; }
slurmd_pid() { pidfile "$RUN/slurmd-node$1.pid"; }

ctld_up() {
    local pid _
    pid=$(ctld_pid)
    if alive "$pid" slurmctld; then
        log "slurmctld already running (pid $pid)"
        return 0
    fi
    # -c: start without the jobs and node states of an earlier `up` (job ids keep counting)
    slurm slurmctld -f "$CONF" -c
    for _ in $(seq 50); do
        pid=$(ctld_pid)
        alive "$pid" slurmctld && break
        sleep 0.1
    done
    if ! alive "$pid" slurmctld; then
        tail -n 20 "$BASE/log/slurmctld.log" >&2 || true
        die "slurmctld did not start"
    fi
    log "slurmctld started (pid $pid, $CTL_ADDR:$CTLD_PORT)"
}
slurmd_up() {
    local i pid _ started=()
    for i in $(seq "$NODES"); do
        pid=$(slurmd_pid "$i")
        if alive "$pid" slurmd; then
            log "slurmd node$i already running (pid $pid)"
            continue
        fi
        started+=("$i")
        # the daemon stays in the node's netns + UTS ns; the host mount ns is kept
        # shellcheck disable=SC2016 # $1/$2 are expanded by the inner sh
        nsenter --net="/run/netns/$NSPFX$i" -- unshare --uts -- \
            sh -c 'hostname "$1" && SLURM_CONF="$2" exec slurmd -f "$2" -N "$1"' \
            sh "node$i" "$CONF"
    done
    for i in "${started[@]}"; do
        for _ in $(seq 50); do
            pid=$(slurmd_pid "$i")
            alive "$pid" slurmd && break
            sleep 0.1
        done
        if ! alive "$pid" slurmd; then
            tail -n 20 "$BASE/log/slurmd-node$i.log" >&2 || true
            die "slurmd node$i did not start"
        fi
        log "slurmd node$i running (pid $pid, netns $NSPFX$i, $NET.$((10 + i)))"
    done
}
wait_idle() {
    local t0=$SECONDS n
    while :; do
        # a node that doesn't respond shows as idle* and doesn't count
        n=$(slurm sinfo -h -N -o '%N %t' 2>/dev/null | awk '$2 == "idle"' | sort -u | wc -l)
        if [ "$n" -ge "$NODES" ]; then
            log "all $NODES nodes idle"
            return 0
        fi
        if [ $((SECONDS - t0)) -ge "$TIMEOUT" ]; then
            slurm sinfo -N >&2 || true
            die "nodes not idle after ${TIMEOUT}s (logs: $BASE/log)"
        fi
        sleep 0.2
    done
}
daemons_down() {
    local ns p i pids=()
    # 1. cancel the jobs while the controller still runs
    if alive "$(ctld_pid)" slurmctld; then
        slurm timeout 5 scancel --full -u root 2>/dev/null || true
    fi
    # 2. the slurmd, then whatever is left in our node namespaces: slurmstepd, job tasks,
    #    tasks restored by CRIU -- all started through this script's slurmd
    for i in $(seq "$NODES"); do pids+=("$(slurmd_pid "$i")"); done
    for p in "$RUN"/slurmd-node*.pid; do [ -e "$p" ] && pids+=("$(pidfile "$p")"); done
    stop slurmd "${pids[@]}"
    for ns in $(our_netns); do
        for p in $(ip netns pids "$ns" 2>/dev/null || true); do
            kill -KILL "$p" 2>/dev/null || true
        done
    done
    # 3. the controller
    stop slurmctld "$(ctld_pid)"
    rm -f "$RUN"/slurmctld.pid "$RUN"/slurmd-node*.pid
}

# ------------------------------------------------------------------ commands
cmd_up() {
    need_root
    cmd_install
    install -d "$RUN"
    munge_up
    net_up
    write_conf
    if [ "$CONF_CHANGED" -eq 1 ] && alive "$(ctld_pid)" slurmctld; then
        log "slurm.conf changed: restarting the slurm daemons"
        daemons_down
    fi
    ctld_up
    slurmd_up
    wait_idle
    slurm timeout 30 srun -N"$NODES" -t 1 true || die "smoke test 'srun -N$NODES true' failed"
    log "smoke test 'srun -N$NODES true' ok"
    # the nodes are `completing` the smoke test for a moment: return with all of them idle
    wait_idle
    log "cluster up: export SLURM_CONF=$CONF"
}
cmd_down() {
    need_root
    daemons_down
    munge_down
    net_down
    log "cluster down (logs and state kept in $BASE)"
}
cmd_status() {
    local ok=0 i pid ns
    echo "SLURM_CONF=$CONF"
    if command -v munge >/dev/null && munge_ok; then echo "munged: ok"; else
        echo "munged: DOWN"
        ok=3
    fi
    pid=$(ctld_pid)
    if alive "$pid" slurmctld; then echo "slurmctld: pid $pid"; else
        echo "slurmctld: DOWN"
        ok=3
    fi
    for i in $(seq "$NODES"); do
        ns=$NSPFX$i pid=$(slurmd_pid "$i")
        if alive "$pid" slurmd; then echo "slurmd node$i: pid $pid (netns $ns)"; else
            echo "slurmd node$i: DOWN"
            ok=3
        fi
    done
    if ip link show "$BR" >/dev/null 2>&1; then echo "bridge $BR: up"; else
        echo "bridge $BR: absent"
        ok=3
    fi
    if [ "$ok" -eq 0 ]; then slurm sinfo -N 2>&1 || ok=3; fi
    return "$ok"
}

case "${1:-}" in
up) cmd_up ;;
down) cmd_down ;;
restart) cmd_down && cmd_up ;;
status) cmd_status ;;
env) echo "export SLURM_CONF=$CONF" ;;
install) cmd_install ;;
*)
    echo "usage: $0 up|down|restart|status|env|install" >&2
    exit 2
    ;;
esac
