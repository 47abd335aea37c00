#!/usr/bin/env bash
# A one-node SLURM cluster on this machine: try the sbatch scripts here before a real cluster
# (the CI tests them this way, tests/test_slurm.py).
#
#   bash scripts/slurm/cluster.sh up              # installs slurm + munge if missing (apt-get), starts them
#   eval "$(bash scripts/slurm/cluster.sh env)"   # this shell's sbatch/squeue/scontrol use that cluster
#   sbatch --gres=none --cpus-per-task=1 --mem=1G scripts/slurm/reproduce.sbatch nano \
#       --config nano/configs/smoke.yaml          # a CPU node: override the script's GPU/cpu/memory request
#   bash scripts/slurm/cluster.sh status
#   bash scripts/slurm/cluster.sh down
#
# Everything it writes (slurm.conf, munge key and socket, controller state, logs, pid files) is in
# one private directory, ND_SLURM_DIR (default $XDG_RUNTIME_DIR/nd-slurm, else ~/.nd-slurm; made
# with mode 0700): nothing under /etc changes and the system's own slurm/munge services, if any,
# are left alone. A state folder that is a symbolic link, belongs to another user or is writable
# by group or others is refused (another user could have planted its config, key or pid files),
# and `down` signals only a process it can prove is the daemon it started (its owner, executable
# and start time, recorded by `up` in NAME.id). That is why sbatch and friends need
# SLURM_CONF (what `env` prints). The node has the machine's cores and no GPUs (no GRES), so a
# script's `#SBATCH --gres=gpu:1` / `--gpus-per-task=1` must be overridden on the command line:
# `sbatch --gres=none` and `sbatch --gpus-per-task=0` do that on SLURM 22.05. No accounting
# database: sacct does not work; `scontrol show job` does (for MinJobAge, 5 minutes, after the end).
# The daemons listen on ports ND_SLURMCTLD_PORT / ND_SLURMD_PORT (default 16817 / 16818, not the
# usual 6817 / 6818, so as not to meet a real installation). `up` and `down` are idempotent.
set -euo pipefail

if [ -n "${XDG_RUNTIME_DIR:-}" ] && [ -d "$XDG_RUNTIME_DIR" ]; then
  DIR="${ND_SLURM_DIR:-$XDG_RUNTIME_DIR/nd-slurm}"
else
  DIR="${ND_SLURM_DIR:-$HOME/.nd-slurm}"
fi
CTLD_PORT="${ND_SLURMCTLD_PORT:-16817}"
SLURMD_PORT="${ND_SLURMD_PORT:-16818}"
CONF="$DIR/slurm.conf"
NODE="$(hostname -s)"
PACKAGES=(slurmctld slurmd slurm-client munge)
POLICY=/usr/sbin/policy-rc.d

die() { echo "cluster.sh: $*" >&2; exit 1; }

private_dir() {  # private_dir [make]: the state folder (made 0700 if missing), refused unless plainly ours
  if [ ! -e "$DIR" ] && [ ! -L "$DIR" ]; then
    [ "${1:-}" = make ] || return 0
    mkdir -p -m 700 -- "$DIR"
  fi
  [ ! -L "$DIR" ] || die "state folder $DIR is a symbolic link; refusing it (set ND_SLURM_DIR to a folder of yours)"
  [ -d "$DIR" ] || die "state folder $DIR is not a folder"
  [ "$(stat -c %u -- "$DIR")" = "$(id -u)" ] \
    || die "state folder $DIR belongs to user $(stat -c %U -- "$DIR"), not to you; refusing it (set ND_SLURM_DIR)"
  [ $(( 0$(stat -c %a -- "$DIR") & 022 )) -eq 0 ] \
    || die "state folder $DIR is writable by group or others (mode $(stat -c %a -- "$DIR")); refusing it"
}

identity() {  # identity PID: "<owner uid> <executable> <start time>" of a live process, from /proc
  local pid="$1" stat
  [ -n "$pid" ] && [ -z "${pid//[0-9]/}" ] && [ "$pid" -gt 0 ] || return 1
  stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || return 1
  # Field 22, the start time in clock ticks since boot, counted after the ")" that ends the name.
  echo "$(stat -c %u "/proc/$pid") $(readlink "/proc/$pid/exe") $(echo "${stat##*) }" | cut -d' ' -f20)"
}

alive() {  # alive NAME: the daemon whose pid file is $DIR/NAME.pid runs, and is the one `up` started
  local pid
  pid="$(cat "$DIR/$1.pid" 2>/dev/null)" || return 1
  [ -s "$DIR/$1.id" ] && [ "$(identity "$pid")" = "$(cat "$DIR/$1.id")" ]
}

record() {  # record NAME: after starting daemon NAME, its identity, once its pid file names it
  local i pid id exe
  exe="$(readlink -f "$(command -v "$1")")"  # e.g. /usr/sbin/slurmctld -> /usr/sbin/slurmctld-wlm
  for i in $(seq 1 100); do
    pid="$(cat "$DIR/$1.pid" 2>/dev/null)" || pid=""
    id="$(identity "$pid")" || id=""
    if [ -n "$id" ] && [ "$id" != "${id#"$(id -u) $exe "}" ]; then
      echo "$id" >"$DIR/$1.id"
      return 0
    fi
    sleep 0.1
  done
  die "$1 started but $DIR/$1.pid does not name it: see $DIR/$1.log"
}

install_missing() {
  local missing=() cmd
  for cmd in slurmctld slurmd sbatch munged; do
    command -v "$cmd" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$cmd" >/dev/null 2>&1 \
      || missing+=("$cmd")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    die "missing ${missing[*]}: install them as root (apt-get install -y ${PACKAGES[*]}), then run up again"
  fi
  command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get here: install ${PACKAGES[*]}"
  echo "installing ${PACKAGES[*]} (apt-get)"
  # policy-rc.d 101: the packages must not start the system's own daemons (they would take
  # /etc/slurm and the default ports; ours run from $DIR).
  # Ours is removed on any exit, also when this script is killed (SIGTERM, SIGINT, SIGHUP).
  local made_policy=0
  if [ ! -e "$POLICY" ] && [ ! -L "$POLICY" ]; then
    trap 'rm -f "$POLICY"' EXIT
    trap 'exit 129' HUP; trap 'exit 130' INT; trap 'exit 143' TERM
    printf '#!/bin/sh\nexit 101\n' >"$POLICY"; chmod +x "$POLICY"
    made_policy=1
  fi
  # A fresh machine has no package lists yet.
  apt-get update -q >"$DIR/apt.log" 2>&1 || die "apt-get update failed: see $DIR/apt.log"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${PACKAGES[@]}" >>"$DIR/apt.log" 2>&1 \
    || die "apt-get install failed: see $DIR/apt.log"
  if [ "$made_policy" -eq 1 ]; then rm -f "$POLICY"; trap - EXIT HUP INT TERM; fi
  return 0
}

write_conf() {
  local user mem_mb
  user="$(id -un)"
  # RealMemory a little below the total: slurmd refuses to start a node with less than configured.
  mem_mb=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
  mkdir -p "$DIR/ctld" "$DIR/slurmd"
  # A new file renamed over the old: never written through a link.
  cat >"$CONF.tmp$$" <<EOF
# Written by scripts/slurm/cluster.sh: one node, this machine, no GPUs, no accounting, no cgroups.
ClusterName=nd
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge.socket
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/slurmd
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobRequeue=1
# Listen on the SlurmctldHost / NodeAddr address (127.0.0.1), not on every interface.
CommunicationParameters=NoInAddrAny
ReturnToService=2
MinJobAge=300
KillWait=30
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc) RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
  mv -f -- "$CONF.tmp$$" "$CONF"
}

start_munge() {
  alive munged && return 0
  if [ ! -s "$DIR/munge.key" ]; then
    (umask 077; dd if=/dev/urandom of="$DIR/munge.key" bs=1024 count=1 status=none)
  fi
  command -v munged >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin"
  # --force: munged wants its socket reachable by every user (o+x on each folder above it); it is
  # in the private state folder on purpose, for this user's daemons and commands only.
  munged --force --socket="$DIR/munge.socket" --key-file="$DIR/munge.key" --pid-file="$DIR/munged.pid" \
    --log-file="$DIR/munged.log" --seed-file="$DIR/munged.seed" \
    || die "munged did not start: see $DIR/munged.log"
  record munged
}

wait_idle() {
  local state="" i
  for i in $(seq 1 120); do
    state="$(SLURM_CONF="$CONF" sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n 1)" || true
    case "$state" in idle|mixed|allocated) return 0 ;; esac
    sleep 0.5
  done
  die "node $NODE is '${state:-unreachable}' after 60 s, not idle: see $DIR/slurmctld.log and $DIR/slurmd.log"
}

up() {
  private_dir make
  install_missing
  PATH="$PATH:/usr/sbin:/sbin"
  alive slurmctld && alive slurmd && alive munged && { wait_idle; echo "already up: $CONF"; return 0; }
  alive slurmctld || alive slurmd || write_conf
  start_munge
  # -i: start from the state saved in $DIR/ctld even if it is from another configuration.
  if ! alive slurmctld; then
    SLURM_CONF="$CONF" slurmctld -i || die "slurmctld did not start: see $DIR/slurmctld.log"
    record slurmctld
  fi
  if ! alive slurmd; then
    SLURM_CONF="$CONF" slurmd -N "$NODE" || die "slurmd did not start: see $DIR/slurmd.log"
    record slurmd
  fi
  wait_idle
  echo "up: node $NODE idle, $(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc) CPUs; run: export SLURM_CONF=$CONF"
}

down() {
  local name pid i
  private_dir
  for name in slurmd slurmctld munged; do
    alive "$name" || { rm -f "$DIR/$name.pid" "$DIR/$name.id"; continue; }
    pid="$(cat "$DIR/$name.pid")"
    kill -TERM "$pid"
    for i in $(seq 1 100); do alive "$name" || break; sleep 0.1; done
    alive "$name" && kill -KILL "$pid"
    rm -f "$DIR/$name.pid" "$DIR/$name.id"
    echo "stopped $name (pid $pid)"
  done
}

status() {
  local name rc=0
  private_dir
  for name in munged slurmctld slurmd; do
    if alive "$name"; then echo "$name: running (pid $(cat "$DIR/$name.pid"))"; else echo "$name: stopped"; rc=3; fi
  done
  if alive slurmctld; then SLURM_CONF="$CONF" sinfo; fi
  return "$rc"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: bash scripts/slurm/cluster.sh up|down|status|env (got '${1:-}')" >&2; exit 2 ;;
esac
