#!/usr/bin/env bash
# Start or stop `vmimagemanager agent` for a configuration, without systemd (the demo, tests).
#   harness/agent.sh start CONFIG    (log: /var/log/vmimagemanager-agent.<name>-<hash>.log)
#   harness/agent.sh stop CONFIG     (TERM; idle spares stay, `spares --retire` removes them)
set -euo pipefail
venv=${VMIM_VENV:-/opt/vmimagemanager}
action=${1:?usage: agent.sh start|stop CONFIG}
config=${2:?usage: agent.sh start|stop CONFIG}
# one agent per configuration file: named by the file and a hash of its full path
name=$(basename "$config" .yaml)-$(realpath "$config" | md5sum | cut -c1-8)
pidfile=/run/vmimagemanager-agent.$name.pid
log=/var/log/vmimagemanager-agent.$name.log
# alive and not a zombie: a killed agent stays one until PID 1 reaps it (this sandbox's PID 1
# does so late), and `kill -0` succeeds on a zombie
running() {
  [ -s "$pidfile" ] || return 1
  local stat; stat=$(ps -o stat= -p "$(cat "$pidfile")" 2>/dev/null) || return 1
  [[ $stat != Z* ]]
}
case $action in
  start)
    if running; then echo "agent for $config already runs (pid $(cat "$pidfile"))"; exit 0; fi
    setsid "$venv/bin/vmimagemanager" --config "$config" agent </dev/null >>"$log" 2>&1 &
    echo $! > "$pidfile"
    sleep 0.5
    running || { echo "agent.sh: the agent exited at once; see $log" >&2; tail -3 "$log" >&2; exit 1; }
    echo "agent for $config started (pid $(cat "$pidfile"), log $log)" ;;
  stop)
    if running; then
      pid=$(cat "$pidfile"); kill -TERM "$pid"
      for _ in $(seq 1 600); do running || break; sleep 0.2; done
      running && { echo "agent.sh: agent $pid did not stop in 120 s" >&2; exit 1; }
    fi
    rm -f "$pidfile" ;;
  *) echo "usage: agent.sh start|stop CONFIG" >&2; exit 2 ;;
esac
