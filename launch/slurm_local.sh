#!/usr/bin/env bash
# A real single-node Slurm on this machine, for the tests and for trying `ldm-train slurm` locally.
#   bash launch/slurm_local.sh start DIR   # config, state, logs and PIDs go to DIR; prints the env to use
#   bash launch/slurm_local.sh stop DIR    # cancels its jobs, stops only the daemons it started (by PID)
# Needs root (slurmd runs jobs as their user) and Debian's slurmctld slurmd slurm-client munge
# (launch/setup.sh installs them). Use it with `export SLURM_CONF=DIR/slurm.conf` (DIR/env does so).
# It runs its own munged (key and socket in DIR), so it needs no system munge service.
# The ports are picked free at start, so it does not clash with another Slurm on the machine.
set -euo pipefail
cmd="${1:-}"
dir="${2:-}"
if [ -z "$cmd" ] || [ -z "$dir" ]; then
  echo "usage: bash launch/slurm_local.sh start|stop DIR" >&2
  exit 2
fi
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
export SLURM_CONF="$dir/slurm.conf"
timeout_s="${SLURM_LOCAL_TIMEOUT:-120}"  # a ceiling for a hung daemon, not an estimate
cred_expire="${SLURM_LOCAL_CRED_EXPIRE:-20}"  # the requeue hold is this + 1 s

# Poll a command until it succeeds or the deadline passes (no fixed sleeps).
wait_for() {
  local what="$1"; shift
  local deadline=$((SECONDS + timeout_s))
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "slurm_local: timed out after ${timeout_s}s waiting for $what (logs in $dir)" >&2
      return 1
    fi
    sleep 0.2
  done
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

write_conf() {
  local ctld_port slurmd_port
  ctld_port="$(free_port)"
  slurmd_port="$(free_port)"
  while [ "$slurmd_port" = "$ctld_port" ]; do slurmd_port="$(free_port)"; done
  mkdir -p "$dir/state" "$dir/spool" "$dir/log"
  cat >"$SLURM_CONF" <<EOF
# Written by launch/slurm_local.sh: one node, no accounting, no cgroups.
ClusterName=ldmlocal
SlurmctldHost=localhost
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire (default 120 s) is also how long Slurm holds a requeued job (EligibleTime = the
# requeue + cred_expire + 1 s); a short one keeps the tests' requeues quick. A launch must use its
# credential within that time: local launches take well under a second.
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=$cred_expire
# A job whose hold has passed starts at the next scheduling pass: make that every second.
SchedulerParameters=bf_interval=1,sched_interval=2
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pidfile
SlurmdPidFile=$dir/slurmd.pidfile
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 RealMemory=20000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  # A private munged (own key, socket, pid) so that this cluster depends on nothing else running
  # here and stopping it cannot break another one. Root, hence --force (files are root's only).
  mkdir -p "$dir/munge"
  chmod 0700 "$dir/munge"
  [ -f "$dir/munge/munge.key" ] || mungekey --create --keyfile="$dir/munge/munge.key" >/dev/null
  munged --foreground --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
    --pid-file="$dir/munge/munged.pid" --seed-file="$dir/munge/munged.seed" \
    --log-file="$dir/log/munged.log" >"$dir/log/munged.out" 2>&1 &
  echo $! >"$dir/munged.pid"
  wait_for "munged" bash -c "munge -n --socket='$dir/munge/munge.socket' | unmunge --socket='$dir/munge/munge.socket'"
}

node_idle() {
  scontrol ping | grep -q UP && [ "$(sinfo -h -N -o %T)" = "idle" ]
}

start() {
  if [ -f "$dir/slurmctld.pid" ] && alive "$(cat "$dir/slurmctld.pid")"; then
    echo "slurm_local: already running in $dir" >&2
    exit 1
  fi
  for tool in slurmctld slurmd sbatch munged mungekey; do
    command -v "$tool" >/dev/null || { echo "slurm_local: $tool not installed (apt-get install slurmctld slurmd slurm-client munge)" >&2; exit 3; }
  done
  write_conf
  start_munge
  slurmctld -D -i >"$dir/log/slurmctld.out" 2>&1 &
  echo $! >"$dir/slurmctld.pid"
  slurmd -D -N localhost >"$dir/log/slurmd.out" 2>&1 &
  echo $! >"$dir/slurmd.pid"
  if ! wait_for "the node to be idle" node_idle; then
    tail -n 20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
    stop
    exit 1
  fi
  echo "export SLURM_CONF=$SLURM_CONF" >"$dir/env"
  echo "export SLURM_CONF=$SLURM_CONF"
}

# Running and not a zombie (the daemons outlive the shell that started them, so their exit is
# reaped by init, maybe later; kill -0 alone would wait for that).
alive() {
  local stat
  stat="$(ps -o stat= -p "$1" 2>/dev/null)" && [ "${stat:0:1}" != Z ]
}

stop_pid() {
  local file="$dir/$1.pid" pid
  [ -f "$file" ] || return 0
  pid="$(cat "$file")"
  if alive "$pid"; then
    kill "$pid"
    if ! wait_for "$1 (pid $pid) to exit" bash -c "$(declare -f alive); ! alive $pid"; then
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$file"
}

no_jobs() {
  [ -z "$(squeue -h -o %i)" ]
}

stop() {
  # Cancel this cluster's jobs first so that no slurmstepd or task outlives the daemons.
  if [ -f "$dir/slurmctld.pid" ] && alive "$(cat "$dir/slurmctld.pid")"; then
    squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null || true
    wait_for "jobs to end" no_jobs || true
  fi
  stop_pid slurmd
  stop_pid slurmctld
  stop_pid munged
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: bash launch/slurm_local.sh start|stop DIR" >&2; exit 2 ;;
esac
