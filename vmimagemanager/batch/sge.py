"""Son of Grid Engine adapter: prolog and epilog (root); the starter_method is sge_starter.py.

Exit codes, as checked on a real cell (see README, troubleshooting):
- prolog 0: go on; 99: SGE puts the job back in the queue (no free slot, a boot that failed);
  100: the job goes to Eqw, held for an admin (missing image, bad configuration, a job whose VM
  failed to boot max_boot_attempts times). Any other code would put the *queue instance* into the
  E state and stop the node, so the prolog never exits with one.
- epilog: always 0. 99 would run the finished job again and 100 would hold it; leftovers after a
  failed epilog are logged and removed by `vmimagemanager reconcile`.

The root hooks run with the job's environment, which the user controls (`qsub -v`): they read
only HOOK_ENV from it (each value checked before use), run with the allow-list environment of
rootenv, and take the configuration path only from argv.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from ..config import Config
from ..decision import Decision, Outcome
from ..files import append_line
from ..jobs import Job, check_job_id, normalise_task_id
from .contract import HookCall, run_epilog, run_prolog
from .sge_accounting import record_line
from .sge_spool import (
    granted_shape,
    is_interactive,
    read_spool_file,
    script_proxy_path,
    trusted_spool_dir,
)

if TYPE_CHECKING:
    from ..node import EndResult

log = logging.getLogger("vmimagemanager.sge")

EXIT_OK = 0
EXIT_RESCHEDULE = 99
EXIT_HOLD = 100
# What the root hooks read of the environment SGE gives them (the job's): SGE_TASK_ID when the
# queue passes no $ja_task_id, the job's spool directory (checked: execd's own), the proxy's
# path (read as the owner's file, never followed through a link).
HOOK_ENV = ("SGE_TASK_ID", "SGE_JOB_SPOOL_DIR", "X509_USER_PROXY")


def _hook_args(program: str, argv: Sequence[str] | None,
               env: Mapping[str, str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=program, description="SGE hook of vmimagemanager; configured in the queue as "
        f"'root@{program} --config FILE $job_id $ja_task_id $job_owner $queue $host'")
    parser.add_argument("--config", help="configuration file (never taken from the environment)")
    parser.add_argument("--execd-spool", action="append", default=[], metavar="DIR",
                        help="sge_execd's spool directory (execd_spool_dir; install-queue "
                        "writes it): only $SGE_JOB_SPOOL_DIR below DIR/HOST/active_jobs/ is "
                        "trusted")
    parser.add_argument("args", nargs="+", metavar="ARG",
                        help="JOB_ID [TASK_ID] JOB_OWNER QUEUE HOST")
    ns = parser.parse_args(argv)
    if len(ns.args) == 5:
        ns.job_id, task, ns.owner, ns.queue, ns.host = ns.args
    elif len(ns.args) == 4:
        ns.job_id, ns.owner, ns.queue, ns.host = ns.args
        task = env.get("SGE_TASK_ID")
    else:
        parser.error("expected JOB_ID [TASK_ID] JOB_OWNER QUEUE HOST")
    ns.job_id = check_job_id(ns.job_id)
    ns.task_id = normalise_task_id(task)
    return ns


# What the prolog tells SGE of each outcome: exit status, log level and word, the end of the one
# line the job's .e file gets (tests/cell/test_sge.py, tests/cell/test_faults.py check each on
# the cell).
PROLOG_OUTCOMES = {
    Outcome.READY: (EXIT_OK, logging.INFO, "ready", ""),
    Outcome.RETRY: (EXIT_RESCHEDULE, logging.WARNING, "rescheduled", "the job is rescheduled"),
    Outcome.HOLD: (EXIT_HOLD, logging.ERROR, "held",
                   "the job is held (Eqw): fix the cause, then 'qmod -cj {job_id}'"),
}


class SgeHooks:
    """The SGE side of the hook contract (batch/contract.py)."""

    program = "vmim-sge"
    hook_env = HOOK_ENV

    def parse(self, hook: str, argv: Sequence[str] | None,
              env: Mapping[str, str]) -> HookCall:
        args = _hook_args(f"{self.program}-{hook}", argv, env)
        job = Job(job_id=args.job_id, task_id=args.task_id, owner=args.owner, queue=args.queue)
        return HookCall(job, args.config, env, args.host, trusted_spool_dir(
            env.get("SGE_JOB_SPOOL_DIR"), job, args.host, args.execd_spool))

    def unusable(self, hook: str, exc: BaseException) -> int:
        log.error("%s: %s", hook, exc)
        if hook == "epilog":  # never 99/100 here: see the module docstring
            print(f"vmimagemanager epilog: {exc}", file=sys.stderr)
            return EXIT_OK
        print(f"vmimagemanager prolog: {exc}; the job is held (Eqw) until an admin fixes "
              "this and runs 'qmod -cj'", file=sys.stderr)
        return EXIT_HOLD

    def admission(self, call: HookCall) -> tuple[Job, bool]:
        """The job's cores and memory on this host (its VM's shape) as execd spooled them; the
        proxy a CE delegated, for the audit trail's Grid identity: the job's variable, or the
        line GRAM writes into the spooled script."""
        job = call.job
        spool = read_spool_file(call.spool_dir)
        if call.spool_dir is None:
            log.warning("job %s: no trusted spool directory: its VM gets one core and its "
                        "VO's default memory", job.label)
        cores, memory = granted_shape(spool)
        proxy = call.env.get("X509_USER_PROXY") or script_proxy_path(call.spool_dir, spool,
                                                                      job.job_id)
        return replace(job, env={"X509_USER_PROXY": proxy}, cores=cores,
                       memory_mib=memory), is_interactive(spool)

    def granted_memory(self, job: Job, default_mib: int) -> int | None:
        """Read from execd's spool at admission (granted_shape)."""
        return job.memory_mib

    def report(self, cfg: Config | None, call: HookCall, decision: Decision) -> int:
        status, level, word, says = PROLOG_OUTCOMES[decision.outcome]
        job = call.job
        if says:
            log.log(level, "job %s: %s: %s", job.label, word, decision.reason)
            print(f"vmimagemanager prolog: job {job.label}: {decision.reason}; "
                  f"{says.format(job_id=job.job_id)}", file=sys.stderr)
        return status

    def ended(self, cfg: Config, call: HookCall, ended: EndResult) -> tuple[str, str]:
        """gridengine's accounting line with the VM's usage; a starter killed on the node said
        so in the job's .e file."""
        job, spool_dir = call.job, call.spool_dir
        usage = read_spool_file(spool_dir, "usage")
        vm = ended.usage
        if vm is not None:
            append_line(cfg.state_dir / "accounting", record_line(
                job, call.host, read_spool_file(spool_dir), usage, vm), 0o640)
        if usage.get("signal", "0") not in ("", "0"):  # the starter on the host was killed
            print(f"vmimagemanager epilog: job {job.label} was ended by signal "
                  f"{usage['signal']} on the node (qdel, a limit such as h_rt, the OOM killer "
                  "or an admin); its VM is destroyed", file=sys.stderr)
        return usage.get("exit_status", ""), usage.get("signal", "")


def prolog_main(argv: Sequence[str] | None = None) -> int:
    return run_prolog(SgeHooks(), argv)


def epilog_main(argv: Sequence[str] | None = None) -> int:
    return run_epilog(SgeHooks(), argv)
