"""The end of a job: the epilog's side (end_job, audit_end) and its detached teardown,
`python -I -m vmimagemanager.teardown CONFIG SLOT LABEL`.

The epilog records the VM's usage and returns at once (end_job); the VM's destroy goes to a
fresh interpreter (never a forked copy of the epilog: SQLite's locks and shared memory must
not be carried across fork), started by end_job in a session of its own and without the
job's groups, so execd's end-of-job kill does not reach it. It destroys the VM of job LABEL in
SLOT, removes its files and frees the slot (Node.end_vm: every step tried; the VM's usage
was recorded by the epilog before). If it dies, the lease names it, and reconcile finishes.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Sequence

from .audit import record
from .config import Config, load_config
from .errors import VmimError
from .jobs import check_label
from .logsetup import setup_logging
from .node import EndResult, Node, open_node

log = logging.getLogger("vmimagemanager.teardown")


def end_job(life: Node, job_id: str, task_id: str) -> EndResult | None:
    """Epilog: record the job's VM usage and return; the VM is destroyed and its files removed
    by a detached process (the slot stays tearing-down until then, and a starting job waits
    for it). If that process cannot be started, the teardown happens here. None: the job left
    nothing on this node."""
    return life.end_job(job_id, task_id, detach=lambda slot, label: _detach_teardown(
        life.cfg, slot, label))


def audit_end(cfg: Config, ended: EndResult, label: str, owner: str, exit_status: str | None,
              signal: str | None) -> None:
    """The trail's `end` event of a job end_job ended: its VO and image (from the lease), how
    the payload ended as the batch system says, and its VM's CPU seconds."""
    lease, vm = ended.lease, ended.usage
    record(cfg, "end", label, owner=owner, vo=lease.vo if lease else None,
           image=lease.image if lease else None, exit_status=exit_status or None,
           signal=signal or None,
           cores=lease.vcpus if lease else None, memory_mib=lease.memory_mib if lease else None,
           vm_cpu_seconds=round(vm["cpu_seconds"], 3) if vm is not None else None,
           wall_seconds=round(vm["wall_seconds"], 3) if vm and "wall_seconds" in vm else None)


def _detach_teardown(cfg: Config, slot: str, label: str) -> int:
    """Start the process that destroys the VM and frees the slot; its pid (0: not started).

    A fresh interpreter (vmimagemanager.teardown), in a session of its own and without the job's
    supplementary groups (execd kills whatever carries the job's group id when the job ends),
    with a clean environment (the epilog's is the job's). Popen returns once it runs.
    """
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-m", "vmimagemanager.teardown", cfg.path, slot, label],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, extra_groups=[], close_fds=True,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"})
    except OSError as exc:
        log.warning("job %s: no process for the teardown (%s); tearing down here", label, exc)
        return 0
    return proc.pid


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging("vmimagemanager-teardown")
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 3:
        print("usage: python -m vmimagemanager.teardown CONFIG SLOT LABEL", file=sys.stderr)
        return 2
    config, slot, label = args
    try:
        cfg = load_config(config)
        open_node(cfg).end_vm(
            cfg.slot(slot).name, job_label=check_label(label), account=False)
    except VmimError as exc:
        log.error(
            "job %s slot %s: teardown incomplete (%s); reconcile finishes it", label, slot, exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
