"""What every batch-system adapter produces: a Job, and what every adapter shares.

An adapter (sge.py, slurm.py) fills a Job from its system's arguments and environment, calls
vmimagemanager.flow.start_job, and maps the Decision's outcome to its own conventions; its
starter runs the job with runner.JobRunner. The guide, with designs for HTCondor and Torque:
docs/batch-systems.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..errors import VmimError
from ..logsetup import setup_logging
from ..rootenv import become_clean, take

JOB_ID_RE = re.compile(r"^[0-9]{1,20}$")
TASK_ID_RE = re.compile(r"^[0-9]{1,10}$")


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
    return taken


def normalise_task_id(task: str | None) -> str:
    """SGE says 'undefined' (env) or '0' (argv) outside array jobs; both become '0'."""
    if task in (None, "", "undefined"):
        return "0"
    if not TASK_ID_RE.match(task):
        raise VmimError(f"invalid task id {task!r}")
    return task


def check_job_id(job_id: str) -> str:
    if not JOB_ID_RE.match(job_id):
        raise VmimError(f"invalid job id {job_id!r}: expected digits")
    return job_id


@dataclass(frozen=True)
class Job:
    job_id: str
    task_id: str
    owner: str
    queue: str = ""
    argv: Sequence[str] = ()  # what the batch system asked to run
    is_script: bool = True
    shell: str = "/bin/sh"
    # A script that starts with #! is run as it is (SGE's unix_behavior, Slurm always); else
    # it is handed to `shell`.
    exec_script: bool = False
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str = ""
    # Files the job reads from the guest's own disk (e.g. the SGE settings a CE script sources):
    # checked before the payload starts, so a job fails with a clear line, not half-way through.
    guest_files: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.job_id}.{self.task_id}"


def exec_native(job: Job) -> int:
    """No VO matched and the site runs such jobs on the host: do what the batch system itself
    would (a script without #! goes to the job's shell)."""
    argv = list(job.argv)
    if job.is_script and not (job.exec_script and has_shebang(argv[0])):
        argv = [job.shell, *argv]
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        print(f"vmimagemanager: cannot run {argv[0]}: {exc.strerror}", file=sys.stderr)
        return 127
    return 127  # not reached


def has_shebang(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(2) == b"#!"
    except OSError:
        return False


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
