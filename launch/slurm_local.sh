#!/usr/bin/env bash
# A real Slurm on this machine, for the tests and for trying `ldm-train slurm` locally.
#   bash launch/slurm_local.sh start DIR             # one node; config, state, logs, PIDs in DIR
#   bash launch/slurm_local.sh start DIR --hosts 2   # two nodes, each its own network namespace
#   bash launch/slurm_local.sh stop DIR              # cancels its jobs, stops only what it started
# Needs root (slurmd runs jobs as their user) and Debian's slurmctld slurmd slurm-client munge
# (launch/setup.sh installs them). Use it with `export SLURM_CONF=DIR/slurm.conf` (DIR/env does so).
# It runs its own munged (key and socket in DIR), so it needs no system munge service.
# The ports are picked free at start, so it does not clash with another Slurm on the machine.
#
# --hosts 2 (needs iproute2 and CAP_NET_ADMIN): node K is the network namespace ldm<N>a / ldm<N>b
# holding one end of a veth pair, named ldm0 there, at 10.77.<N>.K; the other ends join a bridge
# here (the login/head host) at 10.77.<N>.254, where munged and slurmctld run and from where
# sbatch and scontrol reach them. Each node's slurmd runs inside its namespace, and so do its jobs,
# with DIR/hosts (the nodes' names) bound over /etc/hosts in a private mount namespace (not
# `ip netns exec`: it remounts /sys, hiding the cgroup tree slurmd needs). <N> is the first
# subnet no interface uses. Jobs talk over ldm0 (e.g. GLOO_SOCKET_IFNAME=ldm0).
#   bash launch/slurm_local.sh exec DIR K CMD...     # run CMD as on node K (1 or 2), like ssh
set -euo pipefail
usage="usage: bash launch/slurm_local.sh start|stop DIR [--hosts 1|2] | exec DIR K CMD..."
cmd="${1:-}"
dir="${2:-}"
hosts=1
[ "$cmd" = start ] && [ "${3:-}" = --hosts ] && hosts="${4:-}"
if [ -z "$cmd" ] || [ -z "$dir" ] || { [ "$hosts" != 1 ] && [ "$hosts" != 2 ]; }; then
  echo "$usage" >&2
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
  python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}

# The nodes, one "name address" line each; with --hosts 2 (DIR/netns holds <N>) the namespaces'.
nodes() {
  if [ -f "$dir/netns" ]; then
    echo "ldmnode1 10.77.$(cat "$dir/netns").1"
    echo "ldmnode2 10.77.$(cat "$dir/netns").2"
  else
    echo "localhost 127.0.0.1"
  fi
}

node_netns() {  # the namespace of node K (1 or 2)
  if [ "$1" = 1 ]; then echo "ldm$(cat "$dir/netns")a"; else echo "ldm$(cat "$dir/netns")b"; fi
}

write_conf() {
  local ctld_port slurmd_port head=localhost name addr
  ctld_port="$(free_port)"
  slurmd_port="$(free_port)"
  while [ "$slurmd_port" = "$ctld_port" ]; do slurmd_port="$(free_port)"; done
  # slurmctld runs here either way; the namespaces reach it at the bridge's address.
  [ -f "$dir/netns" ] && head="localhost(10.77.$(cat "$dir/netns").254)"
  mkdir -p "$dir/state" "$dir/log"
  nodes | while read -r name addr; do mkdir -p "$dir/spool/$name"; done
  cat >"$SLURM_CONF" <<EOF
# Written by launch/slurm_local.sh: $hosts node(s), no accounting, no cgroups.
ClusterName=ldmlocal
SlurmctldHost=$head
SlurmctldPort=$ctld_port
# Job ids (and so the jobs' rendezvous ports, slurm.port + id % 1000) start at a place of this
# cluster's own, so that two local clusters on one machine do not hand out the same ports.
FirstJobId=$(( 100 + ctld_port % 800 ))
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire (default 120 s) is also how long Slurm holds a requeued job (EligibleTime = the
# job's end + cred_expire + 1 s); a short one keeps the tests' requeues quick. A launch must use
# its credential within that time: local launches take well under a second.
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
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pidfile
SlurmdPidFile=$dir/slurmd-%n.pidfile
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
EOF
  while read -r name addr; do
    echo "NodeName=$name NodeAddr=$addr CPUs=2 RealMemory=10000 State=UNKNOWN" >>"$SLURM_CONF"
  done < <(nodes)
  echo "PartitionName=debug Nodes=$(nodes | cut -d' ' -f1 | paste -sd,) Default=YES MaxTime=INFINITE State=UP" >>"$SLURM_CONF"
}

# --hosts 2: take the first free subnet (under a lock: two clusters may start at once), then the
# bridge here and, per node, its namespace, veth pair and hosts file.
start_netns() {
  command -v ip >/dev/null || { echo "slurm_local: --hosts 2 needs iproute2 (apt-get install iproute2)" >&2; exit 3; }
  local n subnet="" k ns
  exec 9>/run/lock/ldm-slurm-local-netns.lock
  flock 9
  for n in $(seq 0 254); do
    if ! ip -o -4 addr show | grep -q " 10\.77\.$n\." && ! ip link show "ldm${n}br" >/dev/null 2>&1; then
      subnet="$n"; break
    fi
  done
  [ -n "$subnet" ] || { echo "slurm_local: no free subnet 10.77.N.0/24 left" >&2; exit 1; }
  if ! ip link add "ldm${subnet}br" type bridge 2>"$dir/log/netns.err"; then
    echo "slurm_local: --hosts 2 cannot create network devices: $(cat "$dir/log/netns.err")" >&2
    exit 4
  fi
  echo "$subnet" >"$dir/netns"
  ip addr add "10.77.$subnet.254/24" dev "ldm${subnet}br"
  flock -u 9
  ip link set "ldm${subnet}br" up
  for k in 1 2; do
    ns="$(node_netns "$k")"
    ip netns add "$ns"
    ip link add "${ns}0" type veth peer name ldm0 netns "$ns"
    ip link set "${ns}0" master "ldm${subnet}br" up
    ip -n "$ns" addr add "10.77.$subnet.$k/24" dev ldm0
    ip -n "$ns" link set ldm0 up
    ip -n "$ns" link set lo up
  done
  { echo "127.0.0.1 localhost"; nodes | awk '{print $2, $1}'; echo "10.77.$subnet.254 ldmhead"; } >"$dir/hosts"
}

# Run a command as on node K: in its network namespace, with DIR/hosts as /etc/hosts. exec all
# the way down, so that $! of a background on_node is the command's own PID.
on_node() {
  local k="$1"; shift
  exec nsenter --net="/run/netns/$(node_netns "$k")" unshare --mount --propagation private \
    sh -c 'mount --bind "$0" /etc/hosts && exec "$@"' "$dir/hosts" "$@"
}

stop_netns() {
  [ -f "$dir/netns" ] || return 0
  local k ns
  for k in 1 2; do
    ns="$(node_netns "$k")"
    ip netns del "$ns" 2>/dev/null || true  # takes its veth pair with it
  done
  ip link del "ldm$(cat "$dir/netns")br" 2>/dev/null || true
  rm -f "$dir/netns"
}

start_munge() {
  # A private munged (own key, socket, pid) so that this cluster depends on nothing else running
  # here and stopping it cannot break another one. Root, hence --force (files are root's only).
  # The namespaces' slurmds reach its socket by path (a file, not a network address).
  mkdir -p "$dir/munge"
  chmod 0700 "$dir/munge"
  [ -f "$dir/munge/munge.key" ] || mungekey --create --keyfile="$dir/munge/munge.key" >/dev/null
  munged --foreground --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
    --pid-file="$dir/munge/munged.pid" --seed-file="$dir/munge/munged.seed" \
    --log-file="$dir/log/munged.log" >"$dir/log/munged.out" 2>&1 &
  echo $! >"$dir/munged.pid"
  wait_for "munged" bash -c "munge -n --socket='$dir/munge/munge.socket' | unmunge --socket='$dir/munge/munge.socket'"
}

nodes_idle() {
  scontrol ping | grep -q UP && [ "$(sinfo -h -N -o %T | sort -u)" = idle ] \
    && [ "$(sinfo -h -N -o %N | wc -l)" = "$(nodes | wc -l)" ]
}

start_slurmds() {
  local k=0 name addr
  while read -r name addr; do
    k=$((k + 1))
    if [ -f "$dir/netns" ]; then
      (on_node "$k" slurmd -D -N "$name") >"$dir/log/slurmd-$name.out" 2>&1 &
    else
      slurmd -D -N "$name" >"$dir/log/slurmd-$name.out" 2>&1 &
    fi
    echo $! >"$dir/slurmd-$name.pid"
  done < <(nodes)
}

start() {
  if [ -f "$dir/slurmctld.pid" ] && alive "$(cat "$dir/slurmctld.pid")"; then
    echo "slurm_local: already running in $dir" >&2
    exit 1
  fi
  for tool in slurmctld slurmd sbatch munged mungekey; do
    command -v "$tool" >/dev/null || { echo "slurm_local: $tool not installed (apt-get install slurmctld slurmd slurm-client munge)" >&2; exit 3; }
  done
  mkdir -p "$dir/log"
  if [ "$hosts" = 2 ]; then start_netns; fi
  write_conf
  start_munge
  slurmctld -D -i >"$dir/log/slurmctld.out" 2>&1 &
  echo $! >"$dir/slurmctld.pid"
  start_slurmds
  if ! wait_for "the nodes to be idle" nodes_idle; then
    tail -n 20 "$dir"/log/slurmctld.log "$dir"/log/slurmd-*.log >&2 || true
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
  local name _
  while read -r name _; do stop_pid "slurmd-$name"; done < <(nodes)
  stop_pid slurmctld
  stop_pid munged
  stop_netns
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  exec)
    [ -f "$dir/netns" ] && [ $# -ge 4 ] || { echo "slurm_local: exec needs a --hosts 2 cluster in $dir, a node and a command" >&2; exit 2; }
    shift 2
    on_node "$@" ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
