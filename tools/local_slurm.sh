#!/usr/bin/env bash
# A real single-node SLURM on this machine, for the tests of the sbatch scripts.
#
#   tools/local_slurm.sh start     # installs slurmctld slurmd slurm-client munge if missing (root, apt), starts them
#   tools/local_slurm.sh status
#   tools/local_slurm.sh stop
#   eval "$(tools/local_slurm.sh env)"   # SLURM_CONF for sbatch/squeue/scontrol
#
# Config, state, spool and logs live in $UNET_DIST_SLURM_DIR (default /tmp/unet_dist_slurm).
# Daemons are started directly (no systemd): munged, then slurmctld, then slurmd.
set -euo pipefail
DIR=${UNET_DIST_SLURM_DIR:-/tmp/unet_dist_slurm}
CONF=$DIR/slurm.conf

say() { echo "local_slurm: $*" >&2; }

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
     && command -v munged >/dev/null; then
    return 0
  fi
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    say "SLURM is not installed and cannot be installed here (needs root and apt-get): install slurmctld slurmd slurm-client munge"
    exit 3
  fi
  say "installing slurmctld slurmd slurm-client munge (apt-get)"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
}

write_conf() {
  mkdir -p "$DIR/state" "$DIR/spool"
  local mem cpus
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  cpus=$(nproc)
  cat > "$CONF" <<CONF
ClusterName=unetdist
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# Also how long a requeued job waits before it may start again (default 120 s): short for tests.
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
SchedulerType=sched/backfill
# A requeued job becomes eligible cred_expire s after requeueing and is started by the backfill loop
# or the main one (every 30 and 60 s by default): a preempted test job waited 44-78 s in all.
SchedulerParameters=bf_interval=1,sched_interval=2
NodeName=localhost CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
}

running() { SLURM_CONF=$CONF timeout 10 sinfo -h -o '%T' 2>/dev/null | grep -qE 'idle|mix|alloc'; }

start() {
  install
  local before=""
  [ -f "$CONF" ] && before=$(cat "$CONF")
  write_conf
  # Running with this very config: nothing to do. A changed config (an update of this script)
  # restarts the daemons with it.
  if [ "$before" = "$(cat "$CONF")" ] && running; then say "already running: export SLURM_CONF=$CONF"; return 0; fi
  if ! pgrep -x munged >/dev/null; then
    [ -f /etc/munge/munge.key ] || { mkdir -p /etc/munge; dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
    chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge 2>/dev/null || true
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge && chown munge:munge /run/munge 2>/dev/null || true
    if id munge >/dev/null 2>&1; then
      runuser -u munge -- munged 2>/dev/null || munged --force
    else
      munged --force
    fi
  fi
  pkill -x slurmctld 2>/dev/null || true
  pkill -x slurmd 2>/dev/null || true
  sleep 1
  slurmctld -f "$CONF" -c
  sleep 1
  slurmd -f "$CONF" -N localhost -c
  for _ in $(seq 30); do
    if running; then say "running: export SLURM_CONF=$CONF"; return 0; fi
    sleep 1
  done
  say "SLURM did not come up; see $DIR/slurmctld.log and $DIR/slurmd.log"
  exit 4
}

stop() {
  pkill -x slurmd 2>/dev/null || true
  pkill -x slurmctld 2>/dev/null || true
  say "stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) if running; then echo "running (SLURM_CONF=$CONF)"; else echo "not running"; exit 1; fi ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
