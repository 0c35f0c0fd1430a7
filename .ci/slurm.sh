#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, for the study tests (tests/test_study_slurm.py).
#   bash .ci/slurm.sh start   # install slurm-wlm + munge if needed, configure, start; idempotent
#   bash .ci/slurm.sh stop    # stop the daemons (leaves packages and configuration in place)
#   bash .ci/slurm.sh status  # sinfo
# Debian's packages; munged runs as the munge user; slurmctld and slurmd as root (no accounting:
# submitit's sacct warnings are harmless). One node (this host, `nproc` CPUs, its memory), one
# partition `debug`.
set -euo pipefail
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
as_munge() { $SUDO runuser -u munge -- "$@"; }
STATE=/var/spool/slurmctld
SPOOL=/var/spool/slurmd
LOG=/var/log/slurm

install_packages() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null && return
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq slurm-wlm munge >/dev/null
}

start_munge() {
  for d in /run/munge /var/log/munge /var/lib/munge /etc/munge; do
    $SUDO mkdir -p "$d" && $SUDO chown munge:munge "$d"
  done
  $SUDO chmod 0755 /run/munge
  [ -s /etc/munge/munge.key ] || as_munge /usr/sbin/mungekey --create 2>/dev/null \
    || $SUDO sh -c 'dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null && chown munge:munge /etc/munge/munge.key'
  $SUDO chmod 0400 /etc/munge/munge.key
  if ! munge -n >/dev/null 2>&1; then
    as_munge /usr/sbin/munged --force
    for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
  fi
  munge -n >/dev/null
}

write_config() {
  local host cpus mem
  host=$(hostname -s)
  cpus=$(nproc)
  # leave 1 GiB to the system
  mem=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) - 1024 ))
  $SUDO mkdir -p /etc/slurm "$STATE" "$SPOOL" "$LOG"
  $SUDO tee /etc/slurm/slurm.conf >/dev/null <<EOF
# written by robustify's .ci/slurm.sh: a single-node cluster for tests
ClusterName=robustify
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
StateSaveLocation=$STATE
SlurmdSpoolDir=$SPOOL
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
ReturnToService=2
SchedulerType=sched/backfill
MinJobAge=600
KillWait=5
InactiveLimit=0
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

running() { pgrep -x "$1" >/dev/null; }

start_slurm() {
  running slurmctld || $SUDO /usr/sbin/slurmctld
  running slurmd || $SUDO /usr/sbin/slurmd
  local host; host=$(hostname -s)
  for _ in $(seq 60); do
    sinfo -h -N -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc)' && break
    $SUDO scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
    sleep 0.5
  done
  sinfo
  sinfo -h -N -o '%t' | grep -qE '^(idle|mix|alloc)' || { echo "slurm node not ready" >&2; exit 1; }
}

stop_all() {
  for d in slurmd slurmctld; do running "$d" && $SUDO pkill -x "$d" || true; done
  running munged && $SUDO pkill -x munged || true
  for _ in $(seq 50); do running slurmctld || running slurmd || break; sleep 0.1; done
}

case "${1:-start}" in
  start) install_packages; start_munge; write_config; start_slurm ;;
  stop) stop_all ;;
  status) sinfo ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
