"""What every batch-system adapter shares: the root hooks' start, the starter's command line.

An adapter (sge.py, slurm.py) fills a vmimagemanager.jobs.Job from its system's arguments and
environment, calls vmimagemanager.flow.start_job, and maps the Decision's outcome to its own
conventions; its starter hands the job to runner.start_in_context. The guide, with designs
for HTCondor and Torque: docs/batch-systems.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
from collections.abc import Sequence

from ..logsetup import setup_logging
from ..rootenv import become_clean, take


def root_hook_setup(program: str, keep: Sequence[str]) -> dict[str, str]:
    """What every root hook does first: the batch system may hand it the job's environment
    (SGE does, `qsub -v` included), so the variables named in `keep` are read into Python
    (returned, for the hook to validate) and the whole environment is replaced by the
    allow-list (rootenv); then a private umask, and logging that leaves stderr to the hook's
    own one line."""
    taken = take(keep)
    become_clean()
    os.umask(0o077)
    setup_logging(program, stderr_level=logging.CRITICAL)
    lift_job_limits()
    return taken


# The limits a batch system sets from the job's request (SGE: h_vmem, h_data, h_fsize, h_cpu;
# Slurm's are cgroups). They are the payload's, in its VM; a root hook started under them
# would fail for the job's choice (a file server mapping a guest's memory past h_vmem, the
# leases database written past h_fsize: SIGXFSZ).
JOB_LIMITS = (resource.RLIMIT_AS, resource.RLIMIT_DATA, resource.RLIMIT_FSIZE,
              resource.RLIMIT_CPU)


def lift_job_limits() -> None:
    """Root's own hook runs without the job's resource limits (JOB_LIMITS)."""
    unlimited = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
    for limit in JOB_LIMITS:
        try:
            if resource.getrlimit(limit) != unlimited:
                resource.setrlimit(limit, unlimited)
        except (ValueError, OSError) as exc:  # no CAP_SYS_RESOURCE: the soft limit up to
            hard = resource.getrlimit(limit)[1]  # the hard one, which cannot be raised
            resource.setrlimit(limit, (hard, hard))
            logging.getLogger("vmimagemanager.batch").warning(
                "cannot lift the job's resource limit %d (%s): it stays at %d", limit, exc, hard)


def starter_arguments(prog: str, description: str, argv: Sequence[str] | None,
                      *options: tuple[str, str]) -> tuple[argparse.Namespace, list[str]]:
    """A starter's command line: --config, the adapter's required `options` (name, help), then
    the job's command after `--` (empty if none was given)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config")
    for name, text in options:
        parser.add_argument(name, required=True, help=text)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    return args, list(command)
