#!/usr/bin/env bash
# The vmimagemanager demo: a real SGE job from a Grid pool account, run inside a real VM.
#   make demo            (or: bash harness/demo.sh)    KEEP=1 leaves the cell and queue running
# Installs what it needs, builds the test worker-node images, starts libvirtd and an SGE cell,
# configures a VM queue, submits jobs as atlas001 and cms001, shows them running, prints their
# output and qacct status, then stops what it started.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${VMIM_VENV:-/opt/vmimagemanager}
config=/etc/vmimagemanager/demo.yaml
queue=vm.q
export SGE_ROOT=/var/lib/gridengine SGE_CELL=default
export PATH=$venv/bin:/usr/sbin:/usr/bin:/sbin:/bin
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

[ "$(id -u)" = 0 ] || { echo "demo: run as root (it starts libvirtd and an SGE cell)" >&2; exit 1; }
say "installing packages (apt, pip) if missing"
bash "$here/harness/install-deps.sh"
bash "$here/harness/pool-accounts.sh"

started_libvirt=0; started_cell=0
pgrep --ns $$ --nslist pid,mnt -x libvirtd >/dev/null || started_libvirt=1
pgrep --ns $$ --nslist pid,mnt -x sge_qmaster >/dev/null || started_cell=1
say "starting libvirtd and a single-host SGE cell"
bash "$here/harness/libvirt-up.sh"
bash "$here/harness/sge-cell.sh" up

say "building the test worker-node images (cached)"
images=$("$venv/bin/python" "$here/examples/guest/build_images.py")
manifest() { "$venv/bin/python" -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$images/manifest.json" "$1"; }
echo "images in $images"
mkdir -p /etc/vmimagemanager
install -m 0644 "$here/examples/demo/vmimagemanager.yaml" "$config"
vmim() { vmimagemanager --config "$config" "$@"; }
vmim reconcile >/dev/null
# Images built from other inputs (an older build) are replaced: the build directory is named by
# the hash of everything that went into it.
source_mark=/var/lib/vmimagemanager-demo/images-built-from
if [ "$(cat "$source_mark" 2>/dev/null)" != "$images" ]; then
  for vo in atlas cms; do
    if vmim images list --json | grep -q "\"name\": \"$vo-wn\""; then vmim images remove "$vo-wn"; fi
  done
fi
for vo in atlas cms; do
  if ! vmim images list --json | grep -q "\"name\": \"$vo-wn\""; then
    vmim images import "$vo-wn" "$images/$vo.qcow2" --kernel "$images/$(manifest kernel)" \
      --initrd "$images/$(manifest initrd)" --cmdline "$(manifest cmdline)"
  fi
done
echo "$images" > "$source_mark"
vmim images list
say "configuring the SGE queue $queue (prolog, starter_method, epilog): the node's 4 cores as slots, PE smp"
vmim sge install-queue --queue "$queue"
qconf -sq "$queue" | grep -E '^(hostlist|slots|pe_list|prolog|epilog|starter_method)'
qconf -sp smp | grep -E '^(pe_name|allocation_rule)'

metrics_port=19100
say "starting node_exporter on 127.0.0.1:$metrics_port: its textfile collector serves our metrics"
install -d -m 0755 /var/lib/vmimagemanager-demo/metrics
pkill -f -- "--web.listen-address=127.0.0.1:$metrics_port" || true  # one a KEEP=1 run left
prometheus-node-exporter --web.listen-address=127.0.0.1:$metrics_port --collector.disable-defaults \
  --collector.textfile --collector.textfile.directory=/var/lib/vmimagemanager-demo/metrics \
  >/var/log/vmimagemanager-demo-node-exporter.log 2>&1 &
exporter=$!

say "starting the agent: it boots a warm spare VM for atlas ahead of any job"
bash "$here/harness/agent.sh" start "$config"
trap 'bash "$here/harness/agent.sh" stop "$config" || true; kill $exporter 2>/dev/null || true' EXIT
deadline=$((SECONDS + 300))
until vmim spares --json | grep -q '"state": "spare"'; do
  [ $SECONDS -gt $deadline ] && { echo "demo: no spare after 5 minutes; see /var/log/vmimagemanager-agent.demo-*.log" >&2; exit 1; }
  sleep 1
done
vmim spares

say "submitting jobs as Grid pool accounts (as the lcg-CE would)"
job=/tmp/vmim-demo-job.sh
cat > "$job" <<'JOB'
#!/bin/bash
#$ -S /bin/bash
echo "job $JOB_ID of $(id -un) (VO group $(id -gn)) running on $(hostname)"
echo "  middleware: $(cat /etc/grid-middleware-release 2>/dev/null || echo 'none: not in a VM!')"
echo "  guest kernel: $(uname -r), up for $(cut -d' ' -f1 /proc/uptime) s (a fresh VM)"
echo "  arguments: $*"
echo "  DEMO_VAR=$DEMO_VAR"
echo "  working directory: $(pwd) (the shared home)"
echo "written inside the VM $(hostname) by $(id -un)" > vmim-demo-result.txt
JOB
chmod 755 "$job"
declare -A owner submitted
for user in atlas001 cms001; do
  rm -f /home/$user/vmim-demo.* /home/$user/vmim-demo-result.txt
  submitted[$user]=$(date +%s.%N)
  id=$(su "$user" -s /bin/sh -c "cd && qsub -terse -q $queue -N vmim-demo -o \$HOME/vmim-demo.out -e \$HOME/vmim-demo.err -v 'DEMO_VAR=hello from $user' $job 'first arg' \"it's quoted\"")
  owner[$id]=$user
  echo "$user submitted job $id"
done
# A multicore job, as ATLAS and CMS pilots are: 2 slots of the PE, 512 MiB a slot. Its VM has
# its shape: 2 vCPUs and 1 GiB (docs/job-shapes.md).
mc_job=/tmp/vmim-demo-multicore.sh
cat > "$mc_job" <<'JOB'
#!/bin/sh
echo "multicore job $JOB_ID of $(id -un): NSLOTS=$NSLOTS PE=$PE"
echo "  nproc in the VM: $(nproc)"
echo "  MemTotal in the VM: $(awk '/^MemTotal/ {printf "%.0f MiB", $2 / 1024}' /proc/meminfo)"
JOB
chmod 755 "$mc_job"
rm -f /home/atlas001/vmim-demo-mc.*
mc_id=$(su atlas001 -s /bin/sh -c "cd && qsub -terse -q $queue -N vmim-demo-mc -pe smp 2 -l h_vmem=512M -o \$HOME/vmim-demo-mc.out -e \$HOME/vmim-demo-mc.err $mc_job")
echo "atlas001 submitted the multicore job $mc_id: qsub -pe smp 2 -l h_vmem=512M"

say "waiting for the jobs (atlas binds the spare; cms boots its own VM: docs/performance.md has the times)"
deadline=$((SECONDS + 600))
while :; do
  pending=0
  for id in "${!owner[@]}" "$mc_id"; do qacct -j "$id" >/dev/null 2>&1 || pending=$((pending + 1)); done
  [ $pending = 0 ] && break
  [ $SECONDS -gt $deadline ] && { echo "demo: jobs did not finish in 10 minutes" >&2; qstat -u '*'; exit 1; }
  echo "--- $(date +%T): $pending job(s) not finished"
  qstat -u '*' | tail -n +3 | awk '{print "    job " $1 " " $4 " state " $5}'
  vmim slots | sed 's/^/    /'
  # QEMU never runs as root; each home's file server runs as the home's owner
  ps -o user:14=,pid=,comm= -C qemu-system-x86_64,virtiofsd 2>/dev/null \
    | awk '{printf "    %s runs as %s (pid %s)\n", $3, $1, $2}'
  sleep 5
done

say "results (host kernel: $(uname -r), host name: $(hostname))"
for id in "${!owner[@]}"; do
  user=${owner[$id]}
  echo "--- job $id of $user: stdout"
  sed 's/^/    /' /home/$user/vmim-demo.out
  started=$(stat -c %.3Y /home/$user/vmim-demo-result.txt)  # written by the job (virtiofs)
  how="booted its own VM"
  grep "\"job\": \"$id.0\"" /var/lib/vmimagemanager-demo/state/usage.jsonl | grep -q spare_cpu_seconds \
    && how="started on a warm spare"
  awk -v a="${submitted[$user]}" -v b="$started" -v how="$how" \
    'BEGIN {printf "    %s: qsub -> the job wrote its file in %.1f s\n", how, b - a}'
  if [ -s /home/$user/vmim-demo.err ]; then echo "--- stderr"; sed 's/^/    /' /home/$user/vmim-demo.err; fi
  qacct -j "$id" | awk '$1 ~ /^(qname|owner|failed|exit_status|ru_wallclock|cpu|maxvmem)$/ {print "    qacct " $0}'
  # qacct sees only the job's ssh client on the host; the epilog's line has the VM (docs/accounting.md)
  awk -F: -v j="$id" '$6 == j {printf "    with its VM (state_dir/accounting, for APEL): cpu %.2f s, maxvmem %.0f MB\n", $37, $43 / 1048576}' \
    /var/lib/vmimagemanager-demo/state/accounting
  echo "--- the file the job wrote in its home, seen on the host:"
  ls -l /home/$user/vmim-demo-result.txt | sed 's/^/    /'
  sed 's/^/    /' /home/$user/vmim-demo-result.txt
done

echo "--- the multicore job $mc_id (qsub -pe smp 2 -l h_vmem=512M): stdout"
sed 's/^/    /' /home/atlas001/vmim-demo-mc.out
"$venv/bin/python" - "$mc_id" <<'PY'
import json, sys
for line in open("/var/lib/vmimagemanager-demo/state/audit.jsonl"):
    e = json.loads(line)
    if e.get("event") == "start" and e.get("job") == f"{sys.argv[1]}.0" and "cores" in e:
        print(f"    its VM (audit trail): {e['cores']} vCPUs, {e['memory_mib']} MiB: 2 x 512 MiB, "
              "less its home's file server's room where root cannot lift the job's h_vmem "
              "(docs/job-shapes.md)")
PY
if [ -s /home/atlas001/vmim-demo-mc.err ]; then echo "--- stderr"; sed 's/^/    /' /home/atlas001/vmim-demo-mc.err; fi
awk -F: -v j="$mc_id" '$6 == j {printf "    its accounting line (state_dir/accounting): slots %s, pe %s, wall %s s, cpu %.2f s\n", $35, $34, $14, $37}' \
  /var/lib/vmimagemanager-demo/state/accounting

if [ "${CE:-0}" = 1 ]; then
  say "CE=1: the same queue behind a real Globus GRAM gatekeeper (jobmanager-sge), as a Grid user"
  bash "$here/harness/ce-gram.sh" up "$queue" atlas001 cms001
  for user in atlas001 cms001; do
    proxy=$(bash "$here/harness/ce-gram.sh" proxy "$user")
    # (no $(...) in the script: globus-job-run reads it as an RSL substitution)
    echo "--- $user: globus-job-run $(hostname)/jobmanager-sge /bin/sh -c '...' 'an argument'"
    runuser -u "$user" -- env -i PATH=/usr/bin:/bin HOME="/home/$user" X509_USER_PROXY="$proxy" \
      globus-job-run "$(hostname)/jobmanager-sge" /bin/sh -c \
      'id -un; cat /etc/grid-middleware-release; hostname; echo "args: $*"' sh 'an argument' \
      | sed 's/^/    /'
  done
fi

say "after the jobs: slots and leftovers (the agent booted a new spare for the next atlas job)"
vmim slots
vmim reconcile --dry-run

say "the audit trail (vmimagemanager history) and the metrics node_exporter serves"
vmim history | tail -n 8
echo "--- GET http://127.0.0.1:$metrics_port/metrics (vmimagemanager lines that are not 0, no buckets)"
"$venv/bin/python" -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())' \
  "http://127.0.0.1:$metrics_port/metrics" \
  | grep -E '^vmimagemanager_|^node_textfile_scrape_error' | grep -v -E '_bucket|[^0-9.]0$' | sed 's/^/    /' || true
if [ "${KEEP:-0}" = 1 ]; then
  trap - EXIT
  echo "KEEP=1: leaving the cell, libvirtd, the agent and queue $queue running"
  exit 0
fi
bash "$here/harness/agent.sh" stop "$config"
kill $exporter 2>/dev/null || true
vmim spares --retire
qconf -dq "$queue" >/dev/null
[ "${CE:-0}" = 1 ] && bash "$here/harness/ce-gram.sh" down
[ $started_cell = 1 ] && bash "$here/harness/sge-cell.sh" down
if [ $started_libvirt = 1 ]; then pkill --ns $$ --nslist pid,mnt -x libvirtd || true; pkill --ns $$ --nslist pid,mnt -x virtlogd || true; fi
echo "demo: done; stopped what the demo started (KEEP=1 keeps it running)"
