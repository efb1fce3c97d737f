"""Slurm adapter: Prolog and Epilog (root, slurmd); the starter (the job's user, via SPANK) is
slurm_starter.py.

How the pieces fit (docs/batch-systems.md has the why):
- slurm.conf `Prolog=` runs `vmim-slurm-prolog` on the node at allocation (`PrologFlags=Alloc`),
  before the batch step starts; it boots the job's VM (flow.start_job).
- Slurm has no starter_method: the SPANK plugin (slurm_spank.c) execs `vmim-slurm-starter` in
  place of each task's command, as the job's user, with the job's environment and streams; it
  runs the batch script in the VM like SGE's starter (runner.JobRunner).
- `Epilog=` runs `vmim-slurm-epilog`: the VM is destroyed, the job's end recorded.

Outcomes. **A Prolog or Epilog that exits non-zero drains the node** (every later job of every
user waits), so both always exit 0, and the outcome is told to slurmctld instead:
- ready: 0, the batch step starts;
- retry: `scontrol requeue JOB`: the job goes back to pending (Slurm's own requeue delay,
  about 2 minutes) and runs later, here or on another node;
- hold: `scontrol requeuehold JOB` and the reason in the job's Comment (`squeue -o %k`,
  `scontrol show job`); `scontrol release JOB` after the fix.
If scontrol itself fails, a reject context with the reason is written: the starter ends the job
with it (visibly failed, never run outside its VM).

The Prolog and Epilog get only SLURM_* variables from slurmd (no job environment): the job id,
owner and partition (the "queue" VO rules may name) come from there.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from ..accounts import account
from ..config import Config
from ..context import JobContext, write_context
from ..decision import Decision, Outcome
from ..errors import VmimError
from ..jobs import Job, check_job_id
from .contract import HookCall, run_epilog, run_prolog
from .slurmctl import TASK_ID, cpus_on_this_node, job_memory_mib, scontrol

if TYPE_CHECKING:
    from ..node import EndResult

log = logging.getLogger("vmimagemanager.slurm")

# What the root hooks read of slurmd's environment (the rest is replaced by rootenv's
# allow-list; SLURM_CONF so that scontrol finds a site's non-default slurm.conf).
HOOK_ENV = ("SLURM_JOB_ID", "SLURM_JOB_USER", "SLURM_JOB_PARTITION", "SLURM_JOB_EXIT_CODE2",
            "SLURM_CONF", "SLURM_JOB_CPUS_PER_NODE")


def _hook_args(program: str, argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=program, description="Slurm hook of vmimagemanager (slurm.conf Prolog/Epilog, "
        "through the wrapper 'vmimagemanager slurm install-hooks' writes); the job comes from "
        "SLURM_JOB_ID, SLURM_JOB_USER and SLURM_JOB_PARTITION")
    parser.add_argument("--config", help="configuration file (never taken from the environment)")
    return parser.parse_args(argv)


def _job_from_hook_env(env: Mapping[str, str]) -> Job:
    owner = env.get("SLURM_JOB_USER", "")
    if not owner:
        raise VmimError("SLURM_JOB_USER is not set: not run by slurmd as Prolog/Epilog")
    return Job(job_id=check_job_id(env.get("SLURM_JOB_ID", "")), task_id=TASK_ID, owner=owner,
               queue=env.get("SLURM_JOB_PARTITION", ""))


def keep_slurm_conf(env: Mapping[str, str]) -> None:
    """slurmd's SLURM_CONF (an absolute path) stays for scontrol; slurmd sets it, not the job."""
    conf = env.get("SLURM_CONF", "")
    if conf.startswith("/") and "\n" not in conf:
        os.environ["SLURM_CONF"] = conf


def _tell_slurmctld(cfg: Config | None, job: Job, action: str, reason: str) -> None:
    """`action` requeue (retry) or requeuehold with the reason (hold); if slurmctld cannot be
    told, end the job with the reason instead of letting it start without its VM."""
    hold = action == "requeuehold"
    error = scontrol(action, job.job_id)
    if not error:
        comment = f"vmimagemanager: {reason}" + ("; 'scontrol release' after the fix"
                                                 if hold else "")
        if hold and (note := scontrol("update", f"JobId={job.job_id}", f"Comment={comment}")):
            log.warning("job %s: held, but its reason is not in its Comment: %s", job.label,
                        note)
        log.log(logging.ERROR if hold else logging.WARNING, "job %s: %s: %s", job.label,
                "requeued held" if hold else "requeued", reason)
        return
    log.error("job %s: %s failed (%s); the job ends with the reason", job.label, action, error)
    if cfg is None:
        return  # no configuration, no run_dir: the starter finds no context and says so
    try:
        owner = account(job.owner)
        uid, gid = owner.uid, owner.gid
        write_context(cfg.run_dir, JobContext(
            mode="reject", label=job.label,
            message=f"vmimagemanager: {reason}; the job did not run (it could not be "
                    f"requeued: {error})"), None, uid, gid)
    except (VmimError, OSError) as exc:
        log.error("job %s: no reject context written either: %s", job.label, exc)


# What the Prolog asks slurmctld to do with each outcome; the Prolog itself always exits 0.
PROLOG_ACTIONS = {Outcome.READY: "", Outcome.RETRY: "requeue", Outcome.HOLD: "requeuehold"}


class SlurmHooks:
    """The Slurm side of the hook contract (batch/contract.py)."""

    program = "vmim-slurm"
    hook_env = HOOK_ENV

    def parse(self, hook: str, argv: Sequence[str] | None,
              env: Mapping[str, str]) -> HookCall:
        keep_slurm_conf(env)
        args = _hook_args(f"{self.program}-{hook}", argv)
        return HookCall(_job_from_hook_env(env), args.config, env)

    def unusable(self, hook: str, exc: BaseException) -> int:
        """Not run by slurmd as configured: nothing to do (any non-zero exit drains the
        node)."""
        log.error("%s: %s", hook, exc)
        return 0

    def admission(self, call: HookCall) -> tuple[Job, bool]:
        """The job's CPUs on this node (slurmd's SLURM_JOB_CPUS_PER_NODE). srun --pty steps
        are refused by the starter."""
        cores = cpus_on_this_node(call.env.get("SLURM_JOB_CPUS_PER_NODE", ""))
        return replace(call.job, cores=cores), False

    def granted_memory(self, job: Job, default_mib: int) -> int | None:
        """Asked of slurmctld, for VM jobs only (job_memory_mib says why)."""
        return job_memory_mib(job.job_id, job.cores, default_mib)

    def report(self, cfg: Config | None, call: HookCall, decision: Decision) -> int:
        if action := PROLOG_ACTIONS[decision.outcome]:
            _tell_slurmctld(cfg, call.job, action, decision.reason)
        return 0

    def ended(self, cfg: Config, call: HookCall, ended: EndResult) -> tuple[str, str]:
        status, _, sig = call.env.get("SLURM_JOB_EXIT_CODE2", "").partition(":")
        return status, sig


def prolog_main(argv: Sequence[str] | None = None) -> int:
    """Always 0 (see the module docstring); the outcome goes to slurmctld."""
    return run_prolog(SlurmHooks(), argv)


def epilog_main(argv: Sequence[str] | None = None) -> int:
    return run_epilog(SlurmHooks(), argv)
