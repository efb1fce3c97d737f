#!/usr/bin/env bash
# Brings a single-host Slurm cluster up on this machine (munged, slurmctld, slurmd; loopback only),
# or takes it down.
#   harness/slurm-cell.sh up       partition "vm" (this host, 2 CPUs), Prolog/Epilog at
#                                  /etc/slurm/vmimagemanager/{prolog,epilog} (no-ops until
#                                  'vmimagemanager slurm install-hooks' writes them)
#   harness/slurm-cell.sh unhook   back to no-op hooks and no SPANK plugin (after a test module)
#   harness/slurm-cell.sh down
#   harness/slurm-cell.sh status
# Facts behind each setting: ../shared/FACTS.md (Slurm 22.05 on this host).
set -euo pipefail
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
host=$(hostname)
conf=/etc/slurm/slurm.conf
hooks=/etc/slurm/vmimagemanager
daemon_env=(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin)

write_conf() {
  install -d -o slurm -g slurm /var/lib/slurm/slurmctld /var/log/slurm
  install -d /var/lib/slurm/slurmd "$hooks"
  # Until install-hooks writes them: hooks that do nothing (a missing Prolog drains the node).
  for hook in prolog epilog; do
    [ -e "$hooks/$hook" ] || printf '#!/bin/sh\nexit 0\n' > "$hooks/$hook"
    chmod 755 "$hooks/$hook"
  done
  local tmp; tmp=$(mktemp)
  cat > "$tmp" <<EOF
# Written by vmimagemanager's harness/slurm-cell.sh: one host, loopback only.
ClusterName=vmim
SlurmctldHost=$host
SlurmUser=slurm
AuthType=auth/munge
CommunicationParameters=NoInAddrAny
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SchedulerType=sched/backfill
MinJobAge=600
# The VM is booted at allocation, before the batch step starts (vmimagemanager slurm hooks).
PrologFlags=Alloc
Prolog=$hooks/prolog
Epilog=$hooks/epilog
NodeName=$host NodeAddr=127.0.0.1 CPUs=2 RealMemory=2000 State=UNKNOWN
PartitionName=vm Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  if ! cmp -s "$tmp" "$conf"; then install -m 0644 "$tmp" "$conf"; echo changed; fi
  rm -f "$tmp"
}

munge_up() {
  [ -S /run/munge/munge.socket.2 ] && munge -n </dev/null >/dev/null 2>&1 && return 0
  install -d -o munge -g munge -m 0755 /run/munge
  "${daemon_env[@]}" runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 1 50); do munge -n </dev/null >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "slurm-cell: munged did not come up" >&2; exit 1
}

ctld_up() { timeout 5 scontrol ping 2>/dev/null | grep -q "is UP"; }
node_idle() { sinfo -h -n "$host" -o %T 2>/dev/null | grep -q -E '^(idle|mixed|allocated)'; }

up() {
  command -v slurmctld >/dev/null || { echo "slurm-cell: slurm-wlm missing; run harness/install-deps.sh" >&2; exit 1; }
  local changed; changed=$(write_conf)
  munge_up
  if [ -n "$changed" ]; then pkill --ns $$ --nslist pid,mnt -x slurmd || true; pkill --ns $$ --nslist pid,mnt -x slurmctld || true; sleep 1; fi
  if ! ctld_up; then
    "${daemon_env[@]}" /usr/sbin/slurmctld
    for _ in $(seq 1 100); do ctld_up && break; sleep 0.1; done
    ctld_up || { echo "slurm-cell: slurmctld did not come up; see /var/log/slurm/slurmctld.log" >&2; exit 1; }
  fi
  pgrep --ns $$ --nslist pid,mnt -x slurmd >/dev/null || "${daemon_env[@]}" /usr/sbin/slurmd
  for _ in $(seq 1 100); do node_idle && break; sleep 0.1; done
  if ! node_idle; then  # drained by an earlier failing hook: the harness' node is ours to resume
    scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
    for _ in $(seq 1 50); do node_idle && break; sleep 0.1; done
  fi
  node_idle || { echo "slurm-cell: node $host is not usable: $(sinfo -h -n "$host" -o '%T %E')" >&2; exit 1; }
  echo "slurm-cell: up on $host (slurmctld + slurmd, partition vm)"
}

unhook() {
  for hook in prolog epilog; do printf '#!/bin/sh\nexit 0\n' > "$hooks/.$hook"; chmod 755 "$hooks/.$hook"; mv "$hooks/.$hook" "$hooks/$hook"; done
  rm -f /etc/slurm/plugstack.conf.d/vmimagemanager.conf "$hooks/vmim_spank.so"
  echo "slurm-cell: hooks back to no-ops"
}

down() {
  pkill --ns $$ --nslist pid,mnt -x slurmd || true
  pkill --ns $$ --nslist pid,mnt -x slurmctld || true
  echo "slurm-cell: down"
}

case ${1:-} in
  up) up ;;
  unhook) unhook ;;
  down) down ;;
  status) ctld_up && sinfo || { echo "slurm-cell: slurmctld not running"; exit 1; } ;;
  *) echo "usage: $0 up|unhook|down|status" >&2; exit 2 ;;
esac
