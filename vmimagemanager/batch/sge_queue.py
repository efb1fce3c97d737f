"""`vmimagemanager sge install-queue`: configure a VM queue on an existing gridengine cell.

Writes root-owned wrapper scripts with the configuration path baked in (a queue's
starter_method takes no arguments, and root hooks must not read the path from the job's
environment), then creates or updates the queue with qconf from SGE's own queue template.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..config import load_config
from ..errors import VmimError
from ..node.state import ensure_admin_key
from . import wrappers
from .service import register
from .sge import HOOK_ENV
from .wrappers import HookSystem

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
_ABNORMAL = {
    "prolog": ("0|99|100", 'say "the prolog hook failed ($why); the job is rescheduled"\n'
                           "exit 99"),
    "epilog": wrappers.EPILOG_AGAIN,
}

SGE = HookSystem(
    name="SGE", tag="sge", installer="sge install-queue", abnormal=_ABNORMAL, keep=HOOK_ENV,
    purpose=(
        "# Runs the Python hook as a child and maps however it ends (a crash, the OOM killer's "
        "SIGKILL, a\n# missing installation) to an exit code SGE handles per job, never to one "
        "that puts the queue\n# instance into E (any other code, or a signal, would)."))


# Debian's and SGE's default execd_spool_dir (qconf -sconf), for wrappers made without a cell
DEFAULT_EXECD_SPOOL = "/var/spool/gridengine/execd"


def wrapper_script(hook: str, target: str, config: str, python: str,
                   execd_spools: Sequence[str] = (DEFAULT_EXECD_SPOOL,),
                   shell: str = wrappers.DEFAULT_STATIC_SHELL) -> str:
    """The prolog or epilog wrapper a queue calls (the starter is exec'ed: see STARTER); the
    hooks trust $SGE_JOB_SPOOL_DIR only below `execd_spools` (sge_spool.trusted_spool_dir)."""
    args = [a for spool in execd_spools for a in ("--execd-spool", spool)]
    return wrappers.wrapper_script(SGE, hook, target, config, python, args, shell)


STARTER = """#!/bin/sh
# vmimagemanager SGE starter_method. Written by 'vmimagemanager sge install-queue'; do not edit.
# exec: the job's exit status, signals and stdin are the starter's own. `python -I`: the job's
# PYTHON* variables are for its payload, not for the starter.
exec {python} -I {target} --config {config} -- "$@"
"""


def hook_script(hook: str, target: str, config: str, python: str,
                execd_spools: Sequence[str] = (DEFAULT_EXECD_SPOOL,),
                shell: str = wrappers.DEFAULT_STATIC_SHELL) -> str:
    if hook == "starter":
        return STARTER.format(target=shlex.quote(target), config=shlex.quote(config),
                              python=shlex.quote(python))
    return wrapper_script(hook, target, config, python, execd_spools, shell)


def write_wrappers(directory: Path, config: str, bindir: Path,
                   execd_spools: Sequence[str] = (DEFAULT_EXECD_SPOOL,)) -> dict[str, Path]:
    shell = wrappers.static_shell()
    bodies = {}
    for hook in ("prolog", "starter", "epilog"):
        target = bindir / f"vmim-sge-{hook}"
        bodies[hook] = hook_script(hook, str(target), config, wrappers.hook_interpreter(target),
                                   execd_spools, shell)
    return wrappers.write_root_scripts(directory, bodies)


def execd_spool_dirs(hosts: Sequence[str]) -> list[str]:
    """execd_spool_dir of each host (its local configuration, else the global one)."""
    def spool_of(*which: str) -> str | None:
        out = _qconf("-sconf", *which, check=False).stdout
        for line in out.splitlines():
            key, _, value = line.partition(" ")
            if key == "execd_spool_dir" and value.strip().startswith("/"):
                return value.strip()
        return None

    default = spool_of() or DEFAULT_EXECD_SPOOL
    return sorted({spool_of(host) or default for host in hosts})


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


PE_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# A VM job's cores are on one host: $pe_slots keeps a PE job's slots together.
PE_TEMPLATE = """pe_name            {name}
slots              99999
user_lists         NONE
xuser_lists        NONE
start_proc_args    NONE
stop_proc_args     NONE
allocation_rule    $pe_slots
control_slaves     FALSE
job_is_first_task  TRUE
urgency_slots      min
accounting_summary FALSE
qsort_args         NONE
"""


def _qconf_file(option: str, text: str, *more: str) -> None:
    """qconf OPTION FILE: a configuration given as a file (no editor)."""
    with tempfile.NamedTemporaryFile("w", prefix="vmim-qconf-", delete=False) as fh:
        fh.write(text)
    try:
        _qconf(option, fh.name, *more)
    finally:
        os.unlink(fh.name)


def ensure_pe(name: str) -> None:
    """The PE multicore jobs ask for: made if missing; an existing one must keep a job's slots
    on one host (its VM is on one host)."""
    if not PE_NAME_RE.fullmatch(name):
        raise VmimError(f"--pe {name!r}: expected a PE name of letters, digits, '_', '.', '-'")
    shown = _qconf("-sp", name, check=False)
    if shown.returncode != 0:
        _qconf_file("-Ap", PE_TEMPLATE.format(name=name))
        return
    rule = next((line.split()[1] for line in shown.stdout.splitlines()
                 if line.startswith("allocation_rule") and len(line.split()) > 1), "")
    if rule != "$pe_slots":
        raise VmimError(f"PE {name} has allocation_rule {rule or '(none)'}: a VM job's slots "
                        "must be on one host; set it to $pe_slots (qconf -mp) or give --pe "
                        "another name")


def consumable_h_vmem(cfg, hosts: Sequence[str]) -> int:
    """h_vmem a consumable (per slot, its default the node's memory per core) and each host's
    h_vmem what its VMs may have: node.memory_mib less QEMU's overhead of one VM a core. SGE
    then never sends more memory than the node gives; returns that figure."""
    memory = cfg.budget.memory_mib - cfg.budget.cores * cfg.budget.vm_overhead_mib
    if memory < cfg.memory_per_core_mib:
        raise VmimError(f"node.memory_mib ({cfg.budget.memory_mib}) less QEMU's overhead of "
                        f"one VM a core leaves {memory} MiB for h_vmem: give VMs more memory or "
                        "fewer cores")
    lines = []
    for line in _qconf("-sc").stdout.splitlines():
        fields = line.split()
        if fields[:1] == ["h_vmem"] and len(fields) >= 8:
            fields[5], fields[6] = "YES", f"{cfg.memory_per_core_mib}M"
            line = " ".join(fields)
        lines.append(line)
    _qconf_file("-Mc", "\n".join(lines) + "\n")
    for host in hosts:
        _qconf("-mattr", "exechost", "complex_values", f"h_vmem={memory}M", host)
    return memory


def install_queue(config_path: str, args) -> int:
    config = os.path.abspath(config_path)
    cfg = load_config(config)
    if any(c in config for c in " \t\n'\"$`\\"):
        raise VmimError(f"configuration path {config!r} contains characters a queue "
                        "configuration cannot carry; move the file")
    hosts = args.hosts or [socket.gethostname()]
    wrappers = write_wrappers(Path(args.wrapper_dir), config, Path(sys.executable).parent,
                              execd_spool_dirs(hosts))
    ensure_admin_key(cfg)  # the prolog never makes it (a job's owner could race for it)
    exists = _qconf("-sq", args.queue, check=False).returncode == 0
    template = _qconf("-sq", args.queue).stdout if exists else _qconf("-sq").stdout
    pe = "" if (args.pe or "none").lower() == "none" else args.pe
    if pe:
        ensure_pe(pe)
    if args.h_vmem:
        sge_memory_mib = consumable_h_vmem(cfg, hosts)
    values = {
        "qname": args.queue,
        "hostlist": " ".join(hosts),
        "slots": str(args.slots or cfg.budget.cores),
        "pe_list": pe or "NONE",
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
    register(cfg, "sge", queue=args.queue)  # the agent takes it out on a failed health check
    print(f"queue {args.queue} {'updated' if exists else 'created'} on {', '.join(hosts)}: "
          f"{values['slots']} slots, hooks in {args.wrapper_dir}"
          + (f", multicore jobs with -pe {pe} N" if pe else "")
          + (f", h_vmem consumable ({sge_memory_mib} MiB a host)" if args.h_vmem else ""))
    return 0
