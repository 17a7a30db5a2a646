#!/usr/bin/env bash
# Start a real one-node SLURM cluster on this machine (Debian packages), for the tests and for
# trying the launchers. Idempotent: installs what is missing, starts only daemons not running.
# Needs root. Several slurmd on one host do not work with Debian's build, so a multi-node launch
# is tested as several tasks on this one node.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then echo "local_slurm_cluster.sh: needs root (apt-get, daemons)" >&2; exit 1; fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
fi

node=$(hostname -s)
cpus=$(nproc)
free_mb=$(awk '/MemAvailable/ {print int($2/1024)}' /proc/meminfo)
mem_mb=$(( free_mb * 8 / 10 ))

mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
if [ ! -s /etc/munge/munge.key ]; then mungekey -c -f >/dev/null 2>&1 || mungekey -c; fi
chown -R munge:munge /etc/munge /run/munge 2>/dev/null || true
pgrep -x munged >/dev/null || su -s /bin/sh munge -c munged 2>/dev/null || munged --force

conf=/etc/slurm/slurm.conf
cat > "$conf.new" <<CONF
ClusterName=gigavideo-local
SlurmctldHost=$node
SlurmUser=root
AuthType=auth/munge
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
KillWait=10
NodeName=$node CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
# Keep the running config when only RealMemory would change, so daemons need no restart.
if [ -f "$conf" ] && diff <(grep -v '^NodeName' "$conf") <(grep -v '^NodeName' "$conf.new") >/dev/null; then
  rm "$conf.new"
else
  mv "$conf.new" "$conf"
  pkill -x slurmctld 2>/dev/null || true; pkill -x slurmd 2>/dev/null || true; sleep 1
fi

pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd

for _ in $(seq 1 30); do
  state=$(sinfo -h -N -o '%T' 2>/dev/null | head -n1)
  case "$state" in idle|mixed|allocated) echo "local SLURM cluster up: node $node ($cpus CPUs) is $state"; exit 0;; esac
  if [ "$state" = "down" ] || [ "$state" = "drained" ]; then scontrol update nodename="$node" state=resume 2>/dev/null || true; fi
  sleep 1
done
echo "local SLURM cluster did not come up; see /var/log/slurm/" >&2
sinfo >&2 || true
exit 1
