#!/usr/bin/env bash
# Start a single-node SLURM cluster on this machine, for the tests marked `slurm`.
#
#   sudo .ci/slurm_setup.sh            # install (if needed), configure, start
#   .ci/slurm_setup.sh --no-install    # configure and start only
#
# What works on these machines (Debian 12, slurm-wlm 22.05, containers without
# a usable cgroup hierarchy): proctrack/linuxproc, task/none, select/cons_tres,
# one node named after `hostname` with the CPUs and memory `slurmd -C` reports,
# munged as the munge user, slurmctld and slurmd as root.
#
# Exit status 0 once `srun true` works, 1 otherwise. A failure here must not
# fail CI by itself: the slurm tests then skip with the reason.
set -uo pipefail

LOG=${SLURM_SETUP_LOG:-/tmp/ckapipe-slurm-setup.log}
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf

say() { echo "slurm_setup: $*" | tee -a "$LOG" >&2; }
fail() { say "FAILED: $*  (details in $LOG)"; exit 1; }

install_packages() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null && return 0
    say "installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >>"$LOG" 2>&1 || fail "apt-get update"
    apt-get install -y -qq slurm-wlm munge >>"$LOG" 2>&1 || fail "apt-get install slurm-wlm munge"
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
    [ -s /etc/munge/munge.key ] || { mungekey --create >>"$LOG" 2>&1 || \
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=128 2>>"$LOG"; }
    chown munge:munge /etc/munge/munge.key && chmod 600 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- munged >>"$LOG" 2>&1 || munged --force >>"$LOG" 2>&1 || fail "munged did not start"
    for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0; sleep 0.25; done
    fail "munge credentials do not round-trip"
}

write_conf() {
    local host node
    host=$(hostname)
    # "NodeName=vm CPUs=2 Boards=1 ... RealMemory=24105": keep CPUs and memory (minus a margin).
    node=$(slurmd -C | head -1)
    local cpus mem
    cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$node")
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
    mem=$(( mem * 9 / 10 ))
    mkdir -p "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
    cat >"$CONF" <<EOF
# Written by ckapipe .ci/slurm_setup.sh: a one-node cluster for the tests.
ClusterName=ckapipe-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SchedulerParameters=defer_batch=0
MailProg=/bin/true
MinJobAge=300
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    say "wrote $CONF (node $host, $cpus CPUs, $mem MB)"
}

start_daemons() {
    if timeout 30 srun -t 1 true >/dev/null 2>&1; then
        scontrol reconfigure >>"$LOG" 2>&1
        say "SLURM already running (configuration reloaded)"
        return 0
    fi
    pgrep -x slurmctld >/dev/null || slurmctld >>"$LOG" 2>&1 || fail "slurmctld did not start"
    pgrep -x slurmd >/dev/null || slurmd >>"$LOG" 2>&1 || fail "slurmd did not start"
    for _ in $(seq 60); do
        if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then break; fi
        scontrol update nodename="$(hostname)" state=resume >/dev/null 2>&1
        sleep 0.5
    done
    timeout 60 srun -t 1 true >>"$LOG" 2>&1 || fail "srun true does not run (sinfo: $(sinfo -h 2>&1 | head -1))"
}

[ "$(id -u)" = 0 ] || fail "must run as root (munged, slurmctld and slurmd)"
[ "${1:-}" = "--no-install" ] || install_packages
start_munge
write_conf
start_daemons
say "SLURM is up: $(sinfo -h 2>&1 | head -1)"
