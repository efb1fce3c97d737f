"""One job's identity, whatever batch system it came from, and the one label scheme.

An adapter (batch/sge.py, batch/slurm.py) fills a Job from its system's arguments and
environment; the core (flow, runner, the node) knows only this. A job's label, `<job>.<task>`,
names its lease, its context, its overlay and its audit events: `job_label` is the one place it
is built, and `check_label` the one place a label from outside is checked (it is used in paths).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .errors import VmimError

JOB_ID_RE = re.compile(r"[0-9]{1,20}")
TASK_ID_RE = re.compile(r"[0-9]{1,10}")
# whole-string matches (fullmatch): `$` would let a final newline through into a file name
LABEL_RE = re.compile(r"[A-Za-z0-9_-]{1,64}\.[A-Za-z0-9_-]{1,32}")


def job_label(job_id: str, task_id: str) -> str:
    return f"{job_id}.{task_id}"


def check_label(label: str) -> str:
    """A job label is used in paths: allow nothing that could escape."""
    if not LABEL_RE.fullmatch(label):
        raise VmimError(f"invalid job id/task id {label!r}: expected <digits or name>.<task>")
    return label


def normalise_task_id(task: str | None) -> str:
    """SGE says 'undefined' (env) or '0' (argv) outside array jobs; both become '0'."""
    if task in (None, "", "undefined"):
        return "0"
    if not TASK_ID_RE.fullmatch(task):
        raise VmimError(f"invalid task id {task!r}")
    return task


def check_job_id(job_id: str) -> str:
    if not JOB_ID_RE.fullmatch(job_id):
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
    # What the batch system granted the job on this node (its VM's shape): cores, and memory
    # in MiB (None: the job asked for none; its VO's default per core applies).
    cores: int = 1
    memory_mib: int | None = None

    @property
    def label(self) -> str:
        return job_label(self.job_id, self.task_id)
