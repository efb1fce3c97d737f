#!/usr/bin/env bash
# A second worker node of the running gridengine cell, on this machine: its own network, UTS and
# mount namespaces (own host name, own loopback, own /etc/hosts), its own sge_execd and its own
# libvirtd (so its VMs' QEMU processes, and their ssh port forwards, live in the node's network
# namespace, as on a real second node).
#   harness/sge-node.sh up NAME [ADDRESS]   start it (ADDRESS: the node's 127.0.0.x, default .2)
#   harness/sge-node.sh exec NAME -- CMD... run a command on the node (all its namespaces)
#   harness/sge-node.sh down NAME           stop everything it started, unregister it
#
# Network: only loopback addresses. The node talks to the qmaster through a relay: inside the
# node, 127.0.0.1:6444 -> a unix socket -> on the host, a connection to 127.0.0.1:6444 made from
# the node's own address (127.0.0.2), which the host's /etc/hosts names, so the qmaster sees the
# node's host name (it refuses peers whose address resolves to another name, FACTS). The qmaster
# sends the node its jobs over the connection the node opened. Needs socat.
set -euo pipefail
export SGE_ROOT=/var/lib/gridengine SGE_CELL=default
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
cmd=${1:?usage: sge-node.sh up|exec|down NAME}
name=${2:?usage: sge-node.sh up|exec|down NAME}
[[ "$name" =~ ^[a-z][a-z0-9-]{0,30}$ ]] || { echo "sge-node: bad node name $name" >&2; exit 2; }
dir=/var/lib/vmim-nodes/$name
master=$(cat "$SGE_ROOT/$SGE_CELL/common/act_qmaster" 2>/dev/null || true)
daemon_env=(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin SGE_ROOT=$SGE_ROOT SGE_CELL=$SGE_CELL
            SGE_QMASTER_PORT=6444 SGE_EXECD_PORT=6445)

# The qmaster caches host name look-ups, failed ones too: a qconf naming the node while /etc/hosts
# does not have it makes later ones fail with 'can't resolve hostname' for a while (seen in CI).
# So the node's name is only given to qconf while the line is there, and tried for a few seconds.
qconf_retry() {
  local out
  for _ in $(seq 1 20); do
    out=$(qconf "$@" 2>&1) && return 0
    sleep 0.5
  done
  echo "sge-node: qconf $*: $out" >&2; return 1
}
holder() { cat "$dir/holder.pid" 2>/dev/null || true; }
alive() { local p; p=$(holder); [ -n "$p" ] && kill -0 "$p" 2>/dev/null; }
on_node() { nsenter -t "$(holder)" -n -u -m "$@"; }
registered() { qhost -h "$name" 2>/dev/null | awk -v h="$name" '$1 == h && $4 != "-" {ok=1} END {exit !ok}'; }

node_up() {
  local addr=${1:-127.0.0.2}
  [[ "$addr" =~ ^127\.[0-9]+\.[0-9]+\.[0-9]+$ && "$addr" != 127.0.0.1 ]] \
    || { echo "sge-node: the node's address must be in 127.0.0.0/8 (not 127.0.0.1)" >&2; exit 2; }
  command -v socat >/dev/null || { echo "sge-node: socat missing; run harness/install-deps.sh" >&2; exit 1; }
  [ -n "$master" ] && timeout 10 qstat >/dev/null 2>&1 \
    || { echo "sge-node: the cell is not up; run harness/sge-cell.sh up first" >&2; exit 1; }
  if alive && registered; then echo "sge-node: $name is up" >&2; return; fi
  node_down >/dev/null 2>&1 || true
  mkdir -p "$dir"/{run,lib,cache,log}
  grep -qw "$name" /etc/hosts || echo "$addr $name" >> /etc/hosts
  printf '127.0.0.1 %s localhost\n%s %s\n' "$master" "$addr" "$name" > "$dir/hosts"
  if ! qconf -se "$name" >/dev/null 2>&1; then
    printf 'hostname %s\nload_scaling NONE\ncomplex_values NONE\nuser_lists NONE\nxuser_lists NONE\nprojects NONE\nxprojects NONE\nusage_scaling NONE\nreport_variables NONE\n' "$name" > "$dir/exechost"
    qconf_retry -Ae "$dir/exechost"
  fi
  # Each execd tags its jobs' processes with an extra group id from gid_range and, when a job
  # ends, kills every process carrying that id. Real nodes have their own kernels; nodes sharing
  # one must not share ids (node 2's jobs were SIGKILLed when node 1's ended): a host-local
  # configuration with a range of the node's own.
  local octet=${addr##*.}
  (( octet < 14 )) || { echo "sge-node: use an address ending in 2..13" >&2; exit 2; }
  mkdir -p "$dir/conf"
  echo "gid_range $((64000 + octet * 100))-$((64099 + octet * 100))" > "$dir/conf/$name"
  if qconf -sconf "$name" >/dev/null 2>&1; then
    qconf_retry -Mconf "$dir/conf/$name"
  else
    qconf_retry -Aconf "$dir/conf/$name"
  fi
  rm -f "$dir/qmaster.sock"
  setsid socat "UNIX-LISTEN:$dir/qmaster.sock,fork,mode=600" "TCP:127.0.0.1:6444,bind=$addr" \
    </dev/null >"$dir/relay.log" 2>&1 &
  echo $! > "$dir/relay.pid"
  for _ in $(seq 1 50); do [ -S "$dir/qmaster.sock" ] && break; sleep 0.1; done
  # The node: its namespaces stay as long as the holder (the last command) lives.
  setsid unshare --net --uts --mount --propagation private sh -c '
    set -e
    dir=$1; name=$2
    ip link set lo up
    hostname "$name"
    mount --bind "$dir/hosts" /etc/hosts
    mount -t tmpfs -o mode=0755 vmim-node /run/libvirt
    for d in lib cache log; do mount --bind "$dir/$d" "/var/$d/libvirt"; done
    mkdir -p /var/lib/libvirt/qemu /var/cache/libvirt/qemu /var/log/libvirt/qemu
    echo $$ > "$dir/holder.pid"
    exec sleep infinity' sh "$dir" "$name" </dev/null >"$dir/node.log" 2>&1 &
  for _ in $(seq 1 50); do alive && break; sleep 0.1; done
  alive || { echo "sge-node: the namespaces did not come up: $(cat "$dir/node.log")" >&2; exit 1; }
  on_node setsid socat "TCP-LISTEN:6444,bind=127.0.0.1,fork,reuseaddr" \
    "UNIX-CONNECT:$dir/qmaster.sock" </dev/null >"$dir/relay-node.log" 2>&1 &
  on_node virtlogd -d -p /run/libvirt/virtlogd.pid
  on_node libvirtd -d -p /run/libvirt/libvirtd.pid
  on_node "${daemon_env[@]}" /usr/sbin/sge_execd
  for _ in $(seq 1 100); do
    registered && on_node virsh -c qemu:///system version >/dev/null 2>&1 && break
    sleep 0.3
  done
  registered || { echo "sge-node: sge_execd on $name did not register; see $dir" >&2; exit 1; }
  on_node virsh -c qemu:///system version >/dev/null 2>&1 \
    || { echo "sge-node: libvirtd on $name does not answer; see $dir/log" >&2; exit 1; }
  echo "sge-node: $name up ($addr; execd, libvirtd in its own namespaces)" >&2
}

node_down() {
  if alive; then
    for d in $(on_node virsh -c qemu:///system list --name 2>/dev/null); do
      on_node virsh -c qemu:///system destroy "$d" >/dev/null 2>&1 || true
    done
    qconf -ke "$name" >/dev/null 2>&1 || true
    for _ in $(seq 1 50); do on_node pgrep -x sge_execd >/dev/null || break; sleep 0.2; done
    for f in libvirtd virtlogd; do
      on_node sh -c "kill \$(cat /run/libvirt/$f.pid) 2>/dev/null" || true
    done
    on_node pkill -f "socat TCP-LISTEN:6444" || true
    kill "$(holder)" 2>/dev/null || true
  fi
  [ -f "$dir/relay.pid" ] && kill "$(cat "$dir/relay.pid")" 2>/dev/null || true
  if grep -qw "$name" /etc/hosts; then
    qconf -de "$name" >/dev/null 2>&1 || true
    qconf -dconf "$name" >/dev/null 2>&1 || true
  fi
  sed -i "/[[:space:]]$name\$/d" /etc/hosts
  rm -rf "$dir"
  echo "sge-node: $name down" >&2
}

case "$cmd" in
  up) node_up "${3:-}" ;;
  exec)
    alive || { echo "sge-node: $name is not up" >&2; exit 1; }
    shift 2
    [ "${1:-}" = "--" ] && shift
    on_node "$@" ;;
  down) node_down ;;
  *) echo "usage: sge-node.sh up|exec|down NAME" >&2; exit 2 ;;
esac
