#!/usr/bin/env bash
# Brings a single-host gridengine cell up on this machine, or takes it down.
#   harness/sge-cell.sh up     qmaster + execd running, this host an admin/submit/exec host,
#                              fast scheduling (1 s) and accounting flush (1 s)
#   harness/sge-cell.sh down   stop execd and qmaster (cleanly: BerkeleyDB spool)
#   harness/sge-cell.sh status
# Facts behind each step: ../shared/FACTS.md (host name line, act_qmaster, env -i, intervals).
set -euo pipefail
export SGE_ROOT=/var/lib/gridengine SGE_CELL=default
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
host=$(hostname)
common=$SGE_ROOT/$SGE_CELL/common
daemon_env=(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin SGE_ROOT=$SGE_ROOT SGE_CELL=$SGE_CELL
            SGE_QMASTER_PORT=6444 SGE_EXECD_PORT=6445)

qmaster_up() { timeout 10 qstat -f >/dev/null 2>&1; }

fix_hosts() {
  # The qmaster refuses a client whose address resolves to "localhost": the first 127.0.0.1 line
  # must name this host first.
  local first tmp
  first=$(awk '$1 == "127.0.0.1" {print $2; exit}' /etc/hosts)
  if [ "$first" != "$host" ]; then
    tmp=$(mktemp)
    { echo "127.0.0.1 $host localhost"
      awk -v h="$host" '!($1 == "127.0.0.1" && NF == 2 && ($2 == "localhost" || $2 == h))' /etc/hosts
    } > "$tmp"
    cat "$tmp" > /etc/hosts; rm -f "$tmp"
  fi
}

cell_up() {
  [ -d "$common" ] || { echo "sge-cell: $common missing; run harness/install-deps.sh" >&2; exit 1; }
  fix_hosts
  if ! qmaster_up; then
    echo "$host" > "$common/act_qmaster"
    "${daemon_env[@]}" /usr/sbin/sge_qmaster
    for _ in $(seq 1 60); do qmaster_up && break; sleep 0.5; done
    qmaster_up || { echo "sge-cell: sge_qmaster did not come up; see /var/spool/gridengine/qmaster/messages" >&2; exit 1; }
  fi
  qconf -sh 2>/dev/null | grep -qx "$host" || qconf -ah "$host" >/dev/null
  qconf -ss 2>/dev/null | grep -qx "$host" || qconf -as "$host" >/dev/null
  if ! qconf -se "$host" >/dev/null 2>&1; then
    local f; f=$(mktemp)
    printf 'hostname %s\nload_scaling NONE\ncomplex_values NONE\nuser_lists NONE\nxuser_lists NONE\nprojects NONE\nxprojects NONE\nusage_scaling NONE\nreport_variables NONE\n' "$host" > "$f"
    qconf -Ae "$f" >/dev/null; rm -f "$f"
  fi
  local s d
  s=$(mktemp)
  qconf -ssconf | sed -e 's/^schedule_interval .*/schedule_interval 0:0:1/' \
    -e 's/^flush_submit_sec .*/flush_submit_sec 1/' -e 's/^flush_finish_sec .*/flush_finish_sec 1/' > "$s"
  qconf -Msconf "$s" >/dev/null; rm -f "$s"
  d=$(mktemp -d)
  # Join continuation lines (a trailing backslash) first, then set the two attributes; drop any
  # line that is not "attribute value".
  qconf -sconf global | awk '{ if (sub(/\\$/, "")) { buf = buf $0; next } print buf $0; buf = "" }' \
    | awk '$1 ~ /=/ {next}
           $1 == "reporting_params" {print "reporting_params accounting=true reporting=false flush_time=00:00:01 joblog=false sharelog=00:00:00"; next}
           $1 == "load_report_time" {print "load_report_time 00:00:05"; next} {print}' > "$d/global"
  qconf -Mconf "$d/global" >/dev/null; rm -rf "$d"
  pgrep --ns $$ --nslist pid,mnt -x sge_execd >/dev/null || "${daemon_env[@]}" /usr/sbin/sge_execd
  for _ in $(seq 1 60); do
    qhost -h "$host" 2>/dev/null | awk 'NR>3 && $4 != "-" {ok=1} END {exit !ok}' && break
    sleep 0.5
  done
  echo "sge-cell: cell up on $host (qmaster + execd)" >&2
}

cell_down() {
  if pgrep --ns $$ --nslist pid,mnt -x sge_execd >/dev/null; then qconf -ke "$host" >/dev/null 2>&1 || pkill --ns $$ --nslist pid,mnt -x sge_execd || true; fi
  if pgrep --ns $$ --nslist pid,mnt -x sge_qmaster >/dev/null; then qconf -km >/dev/null 2>&1 || pkill --ns $$ --nslist pid,mnt -TERM -x sge_qmaster || true; fi
  running() { pgrep --ns $$ --nslist pid,mnt -x sge_qmaster >/dev/null || pgrep --ns $$ --nslist pid,mnt -x sge_execd >/dev/null; }
  for _ in $(seq 1 100); do running || break; sleep 0.2; done
  if running; then echo "sge-cell: daemons still running" >&2; exit 1; fi
  echo "sge-cell: cell stopped" >&2
}

case "${1:-}" in
  up) cell_up ;;
  down) cell_down ;;
  status) qmaster_up && qhost && qstat -f ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
