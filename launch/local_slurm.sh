#!/usr/bin/env bash
# A one-node Slurm cluster on this machine (CI, laptops): `local_slurm.sh start|stop [STATE_DIR]`.
# Needs root and Debian's slurmctld slurmd slurm-client munge. Daemons are stopped by their pid files.
set -euo pipefail
cmd=${1:?usage: local_slurm.sh start|stop [STATE_DIR]}
state=${2:-/tmp/helios-slurm}
conf=/etc/slurm/slurm.conf

stop() {  # stop [munge]: the Slurm daemons, and munged when asked
  for pid in "$state"/slurmd.pid "$state"/slurmctld.pid ${1:+"$state"/munged.pid}; do
    [ -f "$pid" ] && kill "$(cat "$pid")" 2>/dev/null || true
  done
  sleep 1
}

backup="$state/slurm.conf.before-helios"  # the machine's own slurm.conf, put back by `stop`
if [ "$cmd" = stop ]; then
  stop munge
  if [ -f "$backup" ]; then mv -f "$backup" "$conf"; echo "restored $conf"; fi
  exit 0
fi
[ "$cmd" = start ] || { echo "unknown command $cmd (start|stop)" >&2; exit 2; }

host=$(hostname)
cpus=$(getconf _NPROCESSORS_ONLN)  # not nproc: it obeys OMP_NUM_THREADS
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
mkdir -p "$state"/spool "$state"/ctld /etc/slurm /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
[ -f /etc/munge/munge.key ] || { mkdir -p /etc/munge; dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null; }
chown munge:munge /etc/munge/munge.key 2>/dev/null || true
chmod 400 /etc/munge/munge.key
munge_up() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
if ! munge_up; then
  # A socket file with no munged behind it (a restored or restarted machine keeps /run) refuses every
  # connection and munged will not replace it by itself: remove what the dead daemon left, then start one.
  # the pid file may name a process that is gone, or, after a restart, another program: only a munged is stopped
  old=$(cat /run/munge/munged.pid 2>/dev/null || true)
  [ -n "$old" ] && [ "$(cat /proc/"$old"/comm 2>/dev/null)" = munged ] && kill "$old" && sleep 1
  rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock /run/munge/munged.pid
  su -s /bin/sh munge -c "munged --pid-file=/run/munge/munged.pid" 2>/dev/null || munged --force
  for _ in $(seq 20); do munge_up && break; sleep 0.5; done
  munge_up || { echo "munged did not start: munge -n | unmunge fails" >&2; exit 1; }
  cp /run/munge/munged.pid "$state"/munged.pid 2>/dev/null || true
fi

# a slurm.conf this script did not write is kept (once: a second start must not back up its own)
if [ -f "$conf" ] && ! grep -q '^ClusterName=helios-local$' "$conf" && [ ! -f "$backup" ]; then
  cp -p "$conf" "$backup"
  echo "kept the existing $conf as $backup (restored by: local_slurm.sh stop $state)"
fi
cat > "$conf" <<CONF
ClusterName=helios-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
JobRequeue=1
MpiDefault=none
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF

stop
slurmctld -c
slurmd
deadline=$(( $(date +%s) + 60 ))  # bounded: a controller that cannot authenticate makes each sinfo wait
while [ "$(date +%s)" -lt "$deadline" ]; do
  if timeout 5 sinfo -h -o %T 2>/dev/null | grep -q -E "idle|mixed|alloc"; then
    echo "local Slurm up: $(sinfo -h -o '%P %D %T %C')"
    exit 0
  fi
  sleep 1
done
echo "Slurm did not come up; logs in $state" >&2
tail -n 20 "$state"/slurmctld.log "$state"/slurmd.log >&2 || true
exit 1
