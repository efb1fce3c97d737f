"""What every batch-system adapter produces: a Job.

A Torque or Slurm adapter is one new module that fills a Job from its system's arguments and
environment, calls vmimagemanager.flow.start_job, and maps the Decision's outcome to its own
conventions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..errors import VmimError

JOB_ID_RE = re.compile(r"^[0-9]{1,20}$")
TASK_ID_RE = re.compile(r"^[0-9]{1,10}$")


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
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str = ""
    # Files the job reads from the guest's own disk (e.g. the SGE settings a CE script sources):
    # checked before the payload starts, so a job fails with a clear line, not half-way through.
    guest_files: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.job_id}.{self.task_id}"
