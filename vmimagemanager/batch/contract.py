"""The contract between the core and a batch system, as code.

A batch system calls three hooks per job: a root prolog before it, the starter as the job's
user in place of it, and a root epilog after it. An adapter (sge.py, slurm.py) only translates:
its system's arguments and environment into a `HookCall` (the core's Job and what the hook was
given), and the admission's Decision into its system's conventions, by a table of its own
(SGE: exit 0/99/100; Slurm: exit 0 and scontrol requeue/requeuehold). Everything else a hook
does is the same for every batch system and lives here once (`run_prolog`, `run_epilog`), so
the adapters do not mirror each other. The guide: docs/batch-systems.md.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from ..audit import record
from ..config import config_path, load_config
from ..decision import Decision
from ..errors import RetryLater, VmimError
from ..jobs import Job
from ..node import open_node
from ..rootenv import interrupt_on_sigterm, use_private_tmp
from ..teardown import audit_end, end_job
from .base import root_hook_setup

if TYPE_CHECKING:
    from ..config import Config
    from ..node import EndResult

log = logging.getLogger("vmimagemanager.batch")


@dataclass(frozen=True)
class HookCall:
    """One call of a root hook, as the adapter read it."""

    job: Job
    config: str | None = None  # --config: the only way a root hook learns its configuration
    env: Mapping[str, str] = field(default_factory=dict)  # what it read of its environment
    host: str = ""  # the execution host, where the batch system names it
    # the batch system's own directory of the job, once checked to be its (SGE: execd's
    # active_jobs/<job>.<task>); None where there is none or it is not to be trusted
    spool_dir: str | None = None


class Adapter(Protocol):
    """What a batch system's adapter provides to the hook skeletons below."""

    program: str  # the hooks' names and syslog tags: "<program>-prolog", "<program>-epilog"
    hook_env: tuple[str, ...]  # the variables the root hooks read (nothing else reaches them)

    def parse(self, hook: str, argv: Sequence[str] | None,
              env: Mapping[str, str]) -> HookCall:
        """The call, or VmimError/SystemExit when it is not one of a job of this system."""

    def unusable(self, hook: str, exc: BaseException) -> int:
        """The exit status of a hook whose call could not be read, or of an epilog that
        failed (said how, in one line)."""

    def admission(self, call: HookCall) -> tuple[Job, bool]:
        """The job as the admission decides on it (the proxy's path for the audit trail), and
        whether it is an interactive one."""

    def granted_memory(self, job: Job, default_mib: int) -> int | None:
        """The memory the batch system granted a VM job on this node, in MiB (None: none
        asked, and the VM gets `default_mib`, its VO's default); asked only once the job is
        known to need a VM. RetryLater if it cannot be read now."""

    def report(self, cfg: Config | None, call: HookCall, decision: Decision) -> int:
        """Tell the batch system the decision (by its table); the prolog's exit status."""

    def ended(self, cfg: Config, call: HookCall, ended: EndResult) -> tuple[str, str]:
        """After a VM job's end: what this system records of it (SGE: its accounting line);
        returns the payload's exit status and signal as the batch system reports them."""


def load_root_config(explicit: str | None) -> Config:
    """A root hook's configuration: from its command line only, never the environment; its
    temporary files in run_dir/tmp from here on."""
    cfg = load_config(config_path(explicit, trust_environment=False))
    use_private_tmp(cfg.run_dir)
    return cfg


def run_prolog(adapter: Adapter, argv: Sequence[str] | None) -> int:
    """The root prolog of every batch system: decide and do (boot or bind the job's VM, or write
    its context), then tell the batch system by its own table."""
    env = root_hook_setup(f"{adapter.program}-prolog", adapter.hook_env)
    try:
        call = adapter.parse("prolog", argv, env)
    except (VmimError, SystemExit) as exc:
        return adapter.unusable("prolog", exc)
    try:
        cfg = load_root_config(call.config)
    except VmimError as exc:
        return adapter.report(None, call, Decision.hold(str(exc)))
    # lazy: the admission, with the warm spares and the VO rules, is the prolog's alone; the
    # epilog imports this module too and never decides anything
    from ..flow import start_job

    interrupt_on_sigterm()
    try:
        job, interactive = adapter.admission(call)
    except Exception as exc:  # noqa: BLE001 - what the job was granted could not be read
        if not isinstance(exc, VmimError):  # a bug: the job waits, held, with the reason
            log.exception("job %s: unexpected error in its admission", call.job.label)
            exc = VmimError(f"unexpected error: {exc!r}; see the node's log")
        decision = (Decision.retry if isinstance(exc, RetryLater) else Decision.hold)(str(exc))
        record(cfg, "start", call.job.label, owner=call.job.owner, queue=call.job.queue,
               outcome=decision.outcome.value, reason=decision.reason, cause="admission")
        return adapter.report(cfg, call, decision)
    return adapter.report(cfg, call, start_job(cfg, job, interactive=interactive,
                                               granted_memory=adapter.granted_memory))


def run_epilog(adapter: Adapter, argv: Sequence[str] | None) -> int:
    """The root epilog of every batch system: always 0 (anything else re-runs the job, holds
    it or takes the node out of service); the VM goes, the job's end is recorded, leftovers of
    a failure are logged and removed by `vmimagemanager reconcile`."""
    env = root_hook_setup(f"{adapter.program}-epilog", adapter.hook_env)
    try:
        call = adapter.parse("epilog", argv, env)
        cfg = load_root_config(call.config)
        life = open_node(cfg)
        job = call.job
        ended = end_job(life, job.job_id, job.task_id)
        if ended is not None:
            log.info("job %s: VM usage recorded, its teardown under way", job.label)
            status, signal = adapter.ended(cfg, call, ended)
            audit_end(cfg, ended, job.label, job.owner, status, signal)
    except (Exception, SystemExit) as exc:  # never non-zero: see above
        adapter.unusable("epilog", exc)
    return 0
