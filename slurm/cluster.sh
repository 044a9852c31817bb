#!/usr/bin/env bash
# A real Slurm "cluster" on this one machine, for tests and for trying the sbatch scripts:
# slurmctld plus two slurmd daemons posing as nodes n1 and n2 (Debian's build allows several
# slurmd on one host). Run as root.
#
#   slurm/cluster.sh start    # install (apt-get) if missing, write the config, start daemons
#   slurm/cluster.sh status   # daemons and node states
#   slurm/cluster.sh stop     # stop the daemons (the state folder stays for post-mortems)
#   export SLURM_CONF=$(slurm/cluster.sh conf)   # for sbatch/squeue/scontrol in your shell
#
# Idempotent: `start` on a running cluster only checks it; `stop` on a stopped one does nothing.
# No systemd and no munge: the daemons are started directly and authenticate with auth/none,
# which is fine on a single host nobody else logs into and never acceptable on a real cluster.
# SLURM_LOCAL_STATE (default /tmp/ddp-train-slurm) holds the config, state, spool and logs.
set -euo pipefail

STATE=${SLURM_LOCAL_STATE:-/tmp/ddp-train-slurm}
CONF=$STATE/slurm.conf
NODES=(n1 n2)
HOSTS_LINE="127.0.0.1 n1 n2 # ddp-train slurm/cluster.sh"
export SLURM_CONF=$CONF

die() { echo "cluster.sh: $*" >&2; exit 1; }

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch \
    >/dev/null && return 0
  [[ $(id -u) == 0 ]] || die "Slurm is not installed and installing it needs root"
  command -v apt-get >/dev/null || die "Slurm is not installed and there is no apt-get"
  # --no-install-recommends keeps it to the daemons and the client (~16 s); a failure with an
  # outdated package index is retried once after `apt-get update`.
  local pkgs=(slurmctld slurmd slurm-client)
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${pkgs[@]}" \
    >"$STATE/apt.log" 2>&1 \
    || { apt-get update >>"$STATE/apt.log" 2>&1 && DEBIAN_FRONTEND=noninteractive \
         apt-get install -y --no-install-recommends "${pkgs[@]}" >>"$STATE/apt.log" 2>&1; } \
    || die "apt-get install ${pkgs[*]} failed, see $STATE/apt.log"
}

write_conf() {
  # Rewritten on every start so a changed script takes effect; the daemons read it at start.
  local cpus
  cpus=$(nproc)
  cat >"$CONF.tmp" <<EOF
# Written by slurm/cluster.sh; see the comments there. Single host, two fake nodes.
ClusterName=ddptrain
SlurmctldHost=localhost
# Root runs everything: no slurm user and no munge daemon on a throw-away test host.
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
# A requeued job may start only once its old credential expired (default 120 s): 10 s here,
# plus a 5 s scheduler pass, brings a requeue-to-rerun delay of ~2 min down to ~15 s.
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=5,bf_interval=5
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool-%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd-%n.log
# No cgroups in a container: track job processes through the process tree.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
MailProg=/bin/true
# A node whose slurmd restarts comes back on its own instead of staying DOWN.
ReturnToService=2
# Finished jobs stay visible to \`scontrol show job\` for 10 minutes (tests read them).
MinJobAge=600
# Both fake nodes are this host; each slurmd listens on its own port.
NodeName=n[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[17001-17002] CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
  mv "$CONF.tmp" "$CONF"
}

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_nodes_idle() {
  # slurmd registers within a second or two; a node left DOWN by an earlier run is resumed.
  local state
  for _ in $(seq 1 60); do
    state=$(sinfo -h -N -o '%N %T' 2>/dev/null | sort -u || true)
    if [[ $(grep -cE ' (idle|mixed|allocated)$' <<<"$state") == "${#NODES[@]}" ]]; then
      return 0
    fi
    if grep -qE ' (down|drained|draining)' <<<"$state"; then
      scontrol update nodename=n[1-2] state=resume 2>/dev/null || true
    fi
    sleep 0.5
  done
  die "nodes did not become idle: $state (logs in $STATE)"
}

start() {
  [[ $(id -u) == 0 ]] || die "must run as root (starts slurmctld/slurmd)"
  mkdir -p "$STATE/ctld"
  install_packages
  # The rendezvous address of the multi-node script is the first node's name: it must resolve.
  if ! grep -q "ddp-train slurm/cluster.sh" /etc/hosts; then
    echo "$HOSTS_LINE" >>/etc/hosts
  fi
  # Commands in other shells find this cluster without SLURM_CONF; never replace a real config.
  if [[ ! -e /etc/slurm/slurm.conf ]]; then
    mkdir -p /etc/slurm && ln -s "$CONF" /etc/slurm/slurm.conf
  fi
  if ! pid_alive "$STATE/slurmctld.pid"; then
    write_conf
    slurmctld -f "$CONF"  # daemonises; -c is not used so queued jobs survive a restart
  fi
  for node in "${NODES[@]}"; do
    mkdir -p "$STATE/spool-$node"
    pid_alive "$STATE/slurmd-$node.pid" || slurmd -f "$CONF" -N "$node"
  done
  wait_nodes_idle
  echo "Slurm up: nodes ${NODES[*]}; export SLURM_CONF=$CONF"
}

stop() {
  local pidfile pid pids=()
  # TERM all daemons at once (each takes ~2 s to shut down), then wait, then KILL stragglers.
  for pidfile in "$STATE"/slurmd-*.pid "$STATE/slurmctld.pid"; do
    [[ -f $pidfile ]] || continue
    pid=$(cat "$pidfile")
    kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
    rm -f "$pidfile"
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  # Job steps outlive a stopped slurmd (slurmstepd is its own process): end ours only.
  pkill_steps
  [[ -L /etc/slurm/slurm.conf && $(readlink /etc/slurm/slurm.conf) == "$CONF" ]] \
    && rm -f /etc/slurm/slurm.conf
  if grep -q "ddp-train slurm/cluster.sh" /etc/hosts 2>/dev/null; then
    # Rewrite in place: /etc/hosts is often a bind mount that cannot be replaced by rename.
    local kept
    kept=$(grep -v "ddp-train slurm/cluster.sh" /etc/hosts)
    printf '%s\n' "$kept" >/etc/hosts
  fi
  echo "Slurm stopped (state kept in $STATE)"
}

pkill_steps() {
  # slurmstepd processes whose spool folder is ours, found by their command line's config.
  local pid
  for pid in $(pgrep -x slurmstepd || true); do
    if tr '\0' ' ' <"/proc/$pid/environ" 2>/dev/null | grep -q "SLURM_CONF=$CONF"; then
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
}

status() {
  local name pidfile
  for pidfile in "$STATE/slurmctld.pid" "$STATE"/slurmd-*.pid; do
    name=$(basename "$pidfile" .pid)
    if pid_alive "$pidfile"; then echo "$name: running (pid $(cat "$pidfile"))"
    else echo "$name: stopped"; fi
  done
  pid_alive "$STATE/slurmctld.pid" && sinfo -N -o '%N %T %C' && squeue
  return 0
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) status ;;
  conf) echo "$CONF" ;;
  *) echo "usage: $0 start|stop|status|conf" >&2; exit 2 ;;
esac
