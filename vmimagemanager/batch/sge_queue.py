"""`vmimagemanager sge install-queue`: configure a VM queue on an existing gridengine cell.

Writes root-owned wrapper scripts with the configuration path baked in (a queue's
starter_method takes no arguments, and root hooks must not read the path from the job's
environment), then creates or updates the queue with qconf from SGE's own queue template.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from ..config import load_config
from ..errors import VmimError

HOOK_ARGS = "$job_id $ja_task_id $job_owner $queue $host"


def _qconf(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(["qconf", *args], capture_output=True, text=True)
    except FileNotFoundError:
        raise VmimError("qconf not found: install gridengine-client and set SGE_ROOT") from None
    if check and result.returncode != 0:
        raise VmimError(f"qconf {' '.join(args)} failed: "
                        f"{(result.stderr or result.stdout).strip()}")
    return result


# What a prolog or epilog wrapper does when its hook did not end normally. Exit codes as seen on
# a real cell (batch/sge.py): prolog 99 reschedules the job; epilog 0 (99 would run the job twice).
# A hook is idempotent, so the epilog runs once more to finish an interrupted teardown.
_ABNORMAL = {
    "prolog": ("0|99|100", 'say "the prolog hook failed ($why); the job is rescheduled"\n'
                           "exit 99"),
    "epilog": ("0", 'say "the epilog hook failed ($why); running it once more to finish the '
                    'teardown"\n[ -x "$hook" ] && "$python" -I "$hook" --config "$config" "$@" '
                    '</dev/null\n'
                    "exit 0"),
}

WRAPPER = """#!/bin/sh
# vmimagemanager SGE {hook}. Written by 'vmimagemanager sge install-queue'; do not edit.
# Runs the Python hook as a child and maps however it ends (a crash, the OOM killer's SIGKILL, a
# missing installation) to an exit code SGE handles per job, never to one that puts the queue
# instance into E (any other code, or a signal, would). The hook runs as root with the job's
# environment: `python -I` ignores PYTHONPATH and every other PYTHON* variable a job may set.
PATH=/usr/sbin:/usr/bin:/sbin:/bin; export PATH
python={python}
hook={target}
config={config}
say() {{ echo "vmimagemanager {hook}: $*" >&2; logger -t vmim-sge-{hook} -- "$*" 2>/dev/null; }}
if [ -x "$hook" ]; then
  "$python" -I "$hook" --config "$config" "$@" </dev/null &
  child=$!
  trap 'kill -TERM $child 2>/dev/null' TERM INT HUP
  while :; do
    wait $child 2>/dev/null; rc=$?
    kill -0 $child 2>/dev/null || break  # wait was interrupted by a trapped signal
  done
  case $rc in {allowed}) exit $rc ;; esac
  if [ $rc -gt 128 ]; then why="killed by signal $((rc - 128))"; else why="exit status $rc"; fi
else
  why="$hook is not installed on $(hostname)"
fi
{abnormal}
"""


def wrapper_script(hook: str, target: str, config: str, python: str) -> str:
    """The prolog or epilog wrapper a queue calls (the starter is exec'ed: see STARTER)."""
    allowed, abnormal = _ABNORMAL[hook]
    return WRAPPER.format(hook=hook, target=shlex.quote(target), config=shlex.quote(config),
                          python=shlex.quote(python), allowed=allowed, abnormal=abnormal)


STARTER = """#!/bin/sh
# vmimagemanager SGE starter_method. Written by 'vmimagemanager sge install-queue'; do not edit.
# exec: the job's exit status, signals and stdin are the starter's own. `python -I`: the job's
# PYTHON* variables are for its payload, not for the starter.
exec {python} -I {target} --config {config} -- "$@"
"""


def hook_interpreter(target: Path) -> str:
    """The Python a console script runs with (its #! line): the wrappers call it with -I."""
    try:
        with open(target, "rb") as fh:
            first = fh.readline().decode("utf-8", "replace").strip()
    except OSError as exc:
        raise VmimError(f"{target}: cannot read ({exc.strerror})") from None
    if not first.startswith("#!/") or " " in first:
        raise VmimError(f"{target}: not a Python console script (first line {first!r})")
    return first[2:]


def hook_script(hook: str, target: str, config: str, python: str) -> str:
    if hook == "starter":
        return STARTER.format(target=shlex.quote(target), config=shlex.quote(config),
                              python=shlex.quote(python))
    return wrapper_script(hook, target, config, python)


def write_wrappers(directory: Path, config: str, bindir: Path) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o755)
    wrappers = {}
    for hook in ("prolog", "starter", "epilog"):
        target = bindir / f"vmim-sge-{hook}"
        if not target.exists():
            raise VmimError(f"{target} not found: install vmimagemanager with pip first")
        body = hook_script(hook, str(target), config, hook_interpreter(target))
        path = directory / hook
        tmp = directory / f".{hook}.tmp"
        tmp.write_text(body)
        os.chown(tmp, 0, 0)
        os.chmod(tmp, 0o755)
        tmp.rename(path)
        wrappers[hook] = path
    return wrappers


def queue_definition(template: str, values: dict[str, str]) -> str:
    lines, seen = [], set()
    joined = template.replace("\\\n", " ")
    for line in joined.splitlines():
        if not line.strip():
            continue
        key = line.split()[0]
        if key in values:
            lines.append(f"{key} {values[key]}")
            seen.add(key)
        else:
            lines.append(" ".join(line.split()))
    lines += [f"{k} {v}" for k, v in values.items() if k not in seen]
    return "\n".join(lines) + "\n"


def install_queue(config_path: str, args) -> int:
    config = os.path.abspath(config_path)
    cfg = load_config(config)
    if any(c in config for c in " \t\n'\"$`\\"):
        raise VmimError(f"configuration path {config!r} contains characters a queue "
                        "configuration cannot carry; move the file")
    wrappers = write_wrappers(Path(args.wrapper_dir), config, Path(sys.executable).parent)
    hosts = args.hosts or [socket.gethostname()]
    exists = _qconf("-sq", args.queue, check=False).returncode == 0
    template = _qconf("-sq", args.queue).stdout if exists else _qconf("-sq").stdout
    values = {
        "qname": args.queue,
        "hostlist": " ".join(hosts),
        "slots": str(args.slots or len(cfg.slots)),
        "pe_list": "NONE",
        "prolog": f"root@{wrappers['prolog']} {HOOK_ARGS}",
        "epilog": f"root@{wrappers['epilog']} {HOOK_ARGS}",
        "starter_method": str(wrappers["starter"]),
        "shell_start_mode": "unix_behavior",
        "tmpdir": "/tmp",
        # Batch only: SGE 8.1.9 itself fails the prolog of qrsh jobs at random (exit 143, the
        # queue instance goes to E) before the prolog runs a single command; and an interactive
        # session cannot be relayed into a VM. README, troubleshooting.
        "qtype": "BATCH",
    }
    with tempfile.NamedTemporaryFile("w", prefix="vmim-queue-", suffix=".conf",
                                     delete=False) as fh:
        fh.write(queue_definition(template, values))
    try:
        _qconf("-Mq" if exists else "-Aq", fh.name)
    finally:
        os.unlink(fh.name)
    print(f"queue {args.queue} {'updated' if exists else 'created'} on {', '.join(hosts)}: "
          f"{values['slots']} slots, hooks in {args.wrapper_dir}")
    return 0
