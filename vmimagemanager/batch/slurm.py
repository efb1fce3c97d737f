"""Slurm adapter: Prolog and Epilog (root, slurmd), starter (the job's user, via SPANK).

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
import subprocess
import sys
from collections.abc import Mapping, Sequence

from ..config import Config, config_path, load_config
from ..errors import VmimError
from ..jobs import Job, check_job_id
from ..logsetup import setup_logging
from ..rootenv import interrupt_on_sigterm, use_private_tmp
from .base import root_hook_setup, starter_arguments

log = logging.getLogger("vmimagemanager.slurm")

TASK_ID = "0"  # every Slurm job, array tasks included, has a job id of its own
SCONTROL_TIMEOUT = 30
# What the root hooks read of slurmd's environment (the rest is replaced by rootenv's
# allow-list; SLURM_CONF so that scontrol finds a site's non-default slurm.conf).
HOOK_ENV = ("SLURM_JOB_ID", "SLURM_JOB_USER", "SLURM_JOB_PARTITION", "SLURM_JOB_EXIT_CODE2",
            "SLURM_CONF")


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


def scontrol(*args: str) -> str:
    """Run scontrol; '' on success, else its error in one line."""
    try:
        r = subprocess.run(["scontrol", *args], capture_output=True, text=True,
                           timeout=SCONTROL_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"scontrol {args[0]}: {exc}"
    if r.returncode != 0:
        return f"scontrol {' '.join(args[:2])}: {(r.stderr or r.stdout).strip()}"
    return ""


def _tell_slurmctld(cfg: Config | None, job: Job, hold: bool, reason: str) -> None:
    """Requeue (retry) or requeue held with the reason (hold); if slurmctld cannot be told, end
    the job with the reason instead of letting it start without its VM."""
    from ..accounts import account
    from ..context import JobContext, write_context

    action = "requeuehold" if hold else "requeue"
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


def prolog_main(argv: Sequence[str] | None = None) -> int:
    """Always 0 (see the module docstring); the outcome goes to slurmctld."""
    env = root_hook_setup("vmim-slurm-prolog", HOOK_ENV)
    keep_slurm_conf(env)
    try:
        args = _hook_args("vmim-slurm-prolog", argv)
        job = _job_from_hook_env(env)
    except (VmimError, SystemExit) as exc:  # not run by slurmd as configured: nothing to do
        log.error("prolog: %s", exc)
        return 0
    try:
        cfg = load_config(config_path(args.config, trust_environment=False))
        use_private_tmp(cfg.run_dir)
    except VmimError as exc:
        _tell_slurmctld(None, job, True, str(exc))
        return 0

    interrupt_on_sigterm()
    from ..flow import Outcome, start_job

    decision = start_job(cfg, job)
    if decision.outcome is not Outcome.READY:
        _tell_slurmctld(cfg, job, decision.outcome is Outcome.HOLD, decision.reason)
    return 0


def epilog_main(argv: Sequence[str] | None = None) -> int:
    """Always 0: the VM goes, the job's end is recorded; leftovers of a failure are logged and
    removed by `vmimagemanager reconcile`."""
    env = root_hook_setup("vmim-slurm-epilog", HOOK_ENV)
    keep_slurm_conf(env)
    try:
        args = _hook_args("vmim-slurm-epilog", argv)
        job = _job_from_hook_env(env)
        cfg = load_config(config_path(args.config, trust_environment=False))
        use_private_tmp(cfg.run_dir)
        from ..flow import audit_end, end_job
        from ..lifecycle import open_node

        life = open_node(cfg)
        if end_job(life, job.job_id, job.task_id):
            status, _, sig = env.get("SLURM_JOB_EXIT_CODE2", "").partition(":")
            audit_end(life, job.label, job.owner, status, sig)
    except (Exception, SystemExit) as exc:  # never non-zero: it would drain the node
        log.error("epilog: %s", exc)
    return 0


# -- starter (the job's user, exec'ed by the SPANK plugin) --------------------------------------
# slurmd was seen to start a job requeued by its own Prolog again without running the Prolog
# (the batch step began 70 ms after the new allocation, no Prolog in between), so the batch
# step found no context. A job's owner may requeue it: the starter does so, a few times, and the
# Prolog runs at the next start; a node whose Prolog never runs ends the job with the reason.
MISSING_CONTEXT_REQUEUES = 3


def _no_context(job: Job, exc: VmimError) -> int:
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    restarts_done = int(restarts) if restarts.isdigit() else MISSING_CONTEXT_REQUEUES
    if restarts_done < MISSING_CONTEXT_REQUEUES and not (error := scontrol("requeue",
                                                                           job.job_id)):
        print(f"vmimagemanager: job {job.job_id}: the prolog did not prepare its VM ({exc}); "
              f"requeued so that it does (restart {restarts_done + 1} of at most "
              f"{MISSING_CONTEXT_REQUEUES})", file=sys.stderr)
        return 0
    why = f"; requeueing it failed: {error}" if restarts_done < MISSING_CONTEXT_REQUEUES else ""
    print(f"vmimagemanager: job {job.job_id}: the prolog did not prepare its VM ({exc}){why}; "
          "the job did not run: see the node's log (vmim-slurm-prolog)", file=sys.stderr)
    return 1

def starter_main(argv: Sequence[str] | None = None) -> int:
    from ..accounts import current_account_name
    from ..context import read_context
    from ..runner import exec_native, start_in_context

    setup_logging("vmim-slurm-starter", stderr_level=logging.ERROR)
    args, command = starter_arguments(
        "vmim-slurm-starter", "what the SPANK plugin runs in place of each task of a Slurm job",
        argv, ("--job", "the job id (from Slurm, not the environment)"),
        ("--step", "'batch' or the step number"))
    if not command:
        print("vmimagemanager starter: no task command given", file=sys.stderr)
        return 1
    batch = args.step == "batch"
    try:
        cfg = load_config(config_path(args.config))
        job = Job(job_id=check_job_id(args.job), task_id=TASK_ID,
                  owner=current_account_name(),
                  queue=os.environ.get("SLURM_JOB_PARTITION", ""), argv=list(command),
                  is_script=batch, exec_script=True, env=dict(os.environ), cwd=os.getcwd())
    except VmimError as exc:
        print(f"vmimagemanager: {exc}", file=sys.stderr)
        return 1
    try:
        context = read_context(cfg.run_dir, job.label)
    except VmimError as exc:
        if not batch:  # a step of a job without a VM (native, or no prolog of ours): as is
            return exec_native(job)
        return _no_context(job, exc)
    if not batch and context.mode == "vm":
        print(f"vmimagemanager: job {job.job_id}: job steps (srun, salloc) cannot run in a "
              "job's VM: the VM has no Slurm; submit the work as a batch script (sbatch); "
              "the step did not run", file=sys.stderr)
        return 1
    return start_in_context(job, context, cfg.run_dir)
