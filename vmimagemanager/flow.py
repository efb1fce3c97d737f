"""What happens to a job when it starts: every decision in one batch-neutral place.

An adapter turns its batch system's hook arguments into a Job, calls `start_job`, and maps the
Decision to its own conventions (SGE: exit 0, 99, 100, batch/sge.py; Slurm: exit 0 and
scontrol requeue or requeuehold, batch/slurm.py). No batch system is named here. The table
(tests/unit/test_flow.py checks every row):

| situation                                                     | outcome | counted |
|---------------------------------------------------------------|---------|---------|
| owner matches no VO (context says reject or native)           | READY   |         |
| VM booted and answering                                       | READY   |         |
| interactive job (cannot be relayed into a VM)                 | HOLD    |         |
| no free slot, libvirtd down, leases DB locked, disk full      | RETRY   |         |
| hook interrupted (SIGTERM)                                    | RETRY   |         |
| image missing or changed, share unresolvable, owner unknown,  | HOLD    |         |
| leases DB unreadable, configuration invalid                   |         |         |
| VM failed to boot, fewer than max_boot_attempts times         | RETRY   | yes     |
| VM failed to boot max_boot_attempts times                     | HOLD    | yes     |
| ... with on_boot_failure: fail (the job ends, exit 1, reason) | READY   | yes     |
| anything unexpected (a bug)                                   | HOLD    |         |

RETRY is for the node's passing trouble: the job goes back to the queue and runs later, here or
elsewhere. HOLD is for what needs an admin: the job waits, with the reason, instead of failing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from . import audit
from .accounts import account
from .context import JobContext, write_context
from .decision import Decision, Outcome
from .errors import ConfigError, ImageError, LeaseDbBroken, RetryLater, VmimError
from .leases import process_start
from .metrics import cause_of
from .node import JobRequest, open_node
from .node.spares import bind_spare
from .policy import match_vo, unmatched_message

if TYPE_CHECKING:
    from .config import Config
    from .jobs import Job
    from .node import Node

log = logging.getLogger("vmimagemanager.flow")

# How long a starting job waits for another process's lock on the leases database before it is
# retried later (normal transactions take milliseconds).
START_DB_WAIT = 20.0
# What start_vm may raise that says nothing about the VM's boot (not counted as a failed boot).
NOT_BOOT_FAILURES = (RetryLater, ImageError, ConfigError, LeaseDbBroken, KeyboardInterrupt)


def default_life(cfg: Config) -> Node:
    return open_node(cfg, db_wait=START_DB_WAIT)


def start_job(cfg: Config, job: Job, interactive: bool = False,
              make_life: Callable[[Config], Node] = default_life,
              granted_memory: Callable[[Job, int], int | None] | None = None) -> Decision:
    """Decide what happens to `job` and do it (boot its VM, or write its context); the
    decision goes to the audit trail. `granted_memory` (the adapter's) says the memory of a
    job that needs a VM; without it, the job's own `memory_mib`."""
    known: dict = {}  # what _start learnt before it failed (VO, image): for the audit trail
    try:
        decision = _start(cfg, job, interactive, make_life, known,
                          granted_memory or (lambda j, _default: j.memory_mib))
    except KeyboardInterrupt as exc:  # the adapter's signal handler: cleanup is done
        decision = Decision.retry(f"the hook was interrupted ({exc})")
        known["cause"] = "interrupted"
    except RetryLater as exc:
        decision = Decision.retry(str(exc))
        known["cause"] = cause_of(exc)
    except VmimError as exc:  # image, share, owner, configuration, leases DB: an admin's
        decision = Decision.hold(str(exc))
        known["cause"] = cause_of(exc)
    except Exception as exc:  # a bug: keep the job and say so, never crash the hook
        log.exception("job %s: unexpected error", job.label)
        decision = Decision.hold(f"unexpected error: {exc!r}; see the node's log")
        known["cause"] = "unexpected"
    if decision.outcome is not Outcome.READY or "failed" in decision.facts:
        decision = replace(decision, facts={**known, **decision.facts})
    _audit_start(cfg, job, decision)
    return decision


def _audit_start(cfg: Config, job: Job, decision: Decision) -> None:
    try:
        identity = audit.proxy_identity(job.env.get("X509_USER_PROXY"), account(job.owner).uid,
                                        cfg.grid_ca_dir)
    except VmimError:  # an unknown owner: the decision says so
        identity = audit.ProxyIdentity()
    audit.record(cfg, "start", job.label, owner=job.owner, queue=job.queue,
                 **identity.audit_fields(), outcome=decision.outcome.value, reason=decision.reason,
                 prolog_seconds=round(hook_seconds(), 3), **decision.facts)


def _start(cfg: Config, job: Job, interactive: bool, make_life: Callable[[Config], Node],
           known: dict, granted_memory: Callable[[Job, int], int | None]) -> Decision:
    if interactive:
        known["cause"] = "interactive"
        return Decision.hold("interactive jobs (qrsh, qlogin, srun --pty) cannot run in a VM "
                             "queue; submit a batch job, or use a queue without VMs")
    owner = account(job.owner)
    uid, gid = owner.uid, owner.gid
    rule = match_vo(cfg, job.owner, job.queue)
    if rule is None:
        message = unmatched_message(cfg, job.owner, job.queue)
        write_context(cfg.run_dir, JobContext(mode=cfg.unmatched, label=job.label,
                                              message=message), None, uid, gid)
        log.info("job %s: owner %s matches no VO; mode %s", job.label, job.owner,
                 cfg.unmatched)
        return Decision(Outcome.READY, facts={"mode": cfg.unmatched})
    known.update(vo=rule.name, image=rule.image)
    life = make_life(cfg)
    shape = cfg.job_shape(rule.name, job.cores,
                          granted_memory(job, cfg.default_memory(rule.name, job.cores)))
    known.update(cores=shape.cores, memory_mib=shape.memory_mib)
    request = JobRequest(job_id=job.job_id, task_id=job.task_id, owner=job.owner,
                         image=rule.image, vo=rule.name, shape=shape)
    bind = bind_spare if cfg.spares.counts else None  # a node with spares binds one first
    try:
        started = life.start_vm(request, bind=bind)
    except NOT_BOOT_FAILURES:
        raise
    except VmimError as exc:  # the VM did not come up (BootError, a stale domain): counted
        count = life.leases.record_boot_failure(job.job_id, job.task_id, str(exc))
        known["cause"] = "boot_failed"
        if count >= cfg.max_boot_attempts:
            reason = (f"the VM failed to start {count} times (VO {rule.name}, image "
                      f"{rule.image}); last error: {exc}")
            if cfg.on_boot_failure == "hold":
                return Decision.hold(reason)
            life.leases.forget_boot_failures(job.job_id, job.task_id)
            write_context(cfg.run_dir, JobContext(
                mode="reject", label=job.label,
                message=f"vmimagemanager: {reason}; the job did not run"), None, uid, gid)
            log.warning("job %s: %s; failing the job (on_boot_failure: fail)", job.label, reason)
            return Decision(Outcome.READY, facts={"mode": "reject", "vo": rule.name,
                                                  "image": rule.image, "failed": reason})
        return Decision.retry(f"the VM failed to start (attempt {count} of "
                              f"{cfg.max_boot_attempts}, VO {rule.name}, image {rule.image}): "
                              f"{exc}")
    life.leases.forget_boot_failures(job.job_id, job.task_id)
    lease, image = started.lease, started.image  # the record start_vm checked, not read again
    how = (f"on spare {started.spare}" if started.spare else
           f"restored from snapshot {started.snapshot}" if started.snapshot else "booted")
    log.info("job %s: VM ready in slot %s (VO %s, image %s, %s)", job.label, lease.slot,
             rule.name, rule.image, how)
    return Decision(Outcome.READY, facts={
        "mode": "vm", "vo": rule.name, "slot": lease.slot, "cores": lease.vcpus,
        "memory_mib": lease.memory_mib,
        "domain": cfg.slot(lease.slot).domain_name, "image": rule.image,
        "image_sha256": image.sha256.get(image.disk, "") if image else "",
        "spare": started.spare,
        "snapshot": started.snapshot,
        "snapshot_failed": started.snapshot_failed,
        "vm_seconds": round(sum(life.phase.seconds.values()), 3),
        "phases": {k: round(v, 3) for k, v in life.phase.seconds.items()}})


def hook_seconds() -> float:
    """How long this process has run (interpreter start included)."""
    try:
        with open("/proc/uptime", encoding="ascii") as fh:
            since_boot = float(fh.read().split()[0])
    except OSError:
        return 0.0
    return since_boot - (process_start(os.getpid()) or 0) / os.sysconf("SC_CLK_TCK")
