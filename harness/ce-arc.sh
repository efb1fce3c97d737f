#!/usr/bin/env bash
# NorduGrid's ARC CE (A-REX 6, its web service) on this node, unchanged, in front of the gridengine
# cell's VM queue: arc.conf only (written here), the host certificate, test CA and grid-mapfile
# that harness/ce-gram.sh makes (run it first: `ce-gram.sh up QUEUE USER...`). Clients contact
# https://<this host's name>:443/arex, which is 127.0.0.1.
#   harness/ce-arc.sh up [QUEUE]   (default vm.q) start A-REX and wait until it accepts jobs
#   harness/ce-arc.sh down
# Facts behind each setting: ../shared/FACTS.md ("ARC CE 6.17 runs here with the SGE back end").
set -euo pipefail
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
host=$(hostname)
conf=/etc/arc.conf
rte_dir=$(cd "$(dirname "$0")/../ce-config/arc/rte" && pwd)
env_clean=(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin)

info=/var/spool/arc/jobstatus/info.xml
healthy() {
  grep -q "<HealthState>ok</HealthState>" "$info" 2>/dev/null \
    && ! grep -q "<HealthState>critical</HealthState>" "$info"
}
listening() { (exec 3<>"/dev/tcp/127.0.0.1/443") 2>/dev/null; }
stop() {
  for pidfile in /run/arched-arex-ws.pid /run/arched-arex.pid; do
    [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  for _ in $(seq 1 50); do pgrep -f "arched.*arex" >/dev/null || break; sleep 0.2; done
  pkill -f "arched.*arex" 2>/dev/null || true
  rm -f /run/arched-arex-ws.pid /run/arched-arex.pid
}

arc_up() {
  local queue=${1:-vm.q}
  [[ "$queue" =~ ^[A-Za-z0-9_.-]+$ ]] || { echo "ce-arc: bad queue name $queue" >&2; exit 2; }
  [ -x /usr/share/arc/arc-arex-start ] \
    || { echo "ce-arc: nordugrid-arc-arex missing; run harness/install-deps.sh" >&2; exit 1; }
  [ -f /etc/grid-security/hostcert.pem ] && [ -s /etc/grid-security/grid-mapfile ] \
    || { echo "ce-arc: no host certificate or grid-mapfile; run harness/ce-gram.sh up first" >&2; exit 1; }
  [ -f "$conf.vmim-orig" ] || { [ -f "$conf" ] && cp "$conf" "$conf.vmim-orig"; } || true
  cat > "$conf" <<EOF
# written by vmimagemanager's harness/ce-arc.sh (the stock file: $conf.vmim-orig)
[common]
hostname = $host
x509_host_key = /etc/grid-security/hostkey.pem
x509_host_cert = /etc/grid-security/hostcert.pem
x509_cert_dir = /etc/grid-security/certificates

[authgroup:grid]
file = /etc/grid-security/grid-mapfile

[mapping]
map_with_file = grid /etc/grid-security/grid-mapfile

[lrms]
lrms = sge $queue
sge_root = /var/lib/gridengine
sge_cell = default
sge_bin_path = /usr/bin

[arex]
controldir = /var/spool/arc/jobstatus
sessiondir = *
shared_filesystem = yes
runtimedir = $rte_dir

[arex/ws]
wsurl = https://$host:443/arex

[arex/ws/jobs]
allowaccess = grid

[infosys]

[infosys/glue2]

[infosys/cluster]

[queue:$queue]
EOF
  mkdir -p /var/spool/arc/jobstatus
  # multicore jobs: every job's count as slots of the PE smp (ce-config/arc/rte/ENV/PE-SMP)
  # (links to this checkout's copy: one an earlier checkout made may point nowhere now)
  rm -f /var/spool/arc/jobstatus/rte/{enabled,default}/ENV/PE-SMP
  arcctl rte enable ENV/PE-SMP 2>/dev/null
  arcctl rte default ENV/PE-SMP 2>/dev/null
  stop
  rm -f "$info"
  # the web service first: A-REX's first information run then finds it listening, and the CE
  # says it is healthy at once instead of after the next run (about a minute later)
  "${env_clean[@]}" /usr/share/arc/arc-arex-ws-start >/dev/null
  for _ in $(seq 1 100); do listening && break; sleep 0.2; done
  "${env_clean[@]}" /usr/share/arc/arc-arex-start >/dev/null
  listening || { echo "ce-arc: A-REX does not listen on 443; see /var/log/arc/" >&2; exit 1; }
  # clients refuse a CE whose information says HealthState critical
  for _ in $(seq 1 180); do healthy && break; sleep 1; done
  healthy || { echo "ce-arc: A-REX is not healthy after 180 s; see /var/log/arc/infoprovider.log" >&2; exit 1; }
  echo "ce-arc: A-REX up on https://$host:443/arex, SGE queue $queue" >&2
}

case "${1:-}" in
  up) arc_up "${2:-}" ;;
  down) stop; echo "ce-arc: A-REX stopped" >&2 ;;
  *) echo "usage: ce-arc.sh up [QUEUE] | down" >&2; exit 2 ;;
esac
