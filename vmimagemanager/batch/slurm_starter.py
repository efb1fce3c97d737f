"""What the SPANK plugin (slurm_spank.c) execs in place of each task of a Slurm job, as the job's
user: the batch script runs in the job's VM, as SGE's starter_method does (sge_starter.py).

Kept apart from the Prolog and Epilog (slurm.py) so that what runs for every task imports only
the context reader and the runner, never the life cycle.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from ..accounts import current_account_name
from ..config import config_path, load_config
from ..context import read_context
from ..errors import VmimError
from ..jobs import Job, check_job_id
from ..logsetup import setup_logging
from ..runner import exec_native, start_in_context
from .base import starter_arguments
from .slurmctl import TASK_ID, scontrol

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
