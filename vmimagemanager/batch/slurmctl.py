"""What the Slurm hooks and the starter share: scontrol, and the task id of every Slurm job."""

from __future__ import annotations

import math
import re
import subprocess

from ..errors import RetryLater

TASK_ID = "0"  # every Slurm job, array tasks included, has a job id of its own
SCONTROL_TIMEOUT = 30
# `scontrol show job`'s memory request: per node, or per CPU; a size with Slurm's suffix
MEMORY_FIELD = re.compile(r"\bMinMemory(Node|CPU)=([0-9]+(?:\.[0-9]+)?)([KMGT]?)\b")
UNIT_MIB = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 * 1024}


def cpus_on_this_node(value: str) -> int:
    """The job's CPUs here from the Prolog's SLURM_JOB_CPUS_PER_NODE ("2", or "2(x3),1" for
    several nodes: a VM job's batch step runs on the first); 1 if it is missing or garbled."""
    match = re.match(r"([0-9]{1,5})(?:\(x[0-9]+\))?(?:,|$)", value)
    return max(1, int(match.group(1))) if match else 1


def job_memory_mib(job_id: str, cpus: int, default_mib: int) -> int:
    """The memory the job asked of Slurm on this node, in MiB (None: none asked).

    slurmd gives the Prolog no memory (22.05: `_build_env` exports no memory variable; SPANK's
    S_JOB_ALLOC_MEM is readable only in slurmstepd, after the Prolog, and is 0 unless memory
    is a consumable), so this is asked of slurmctld: one `scontrol show job` a VM job, the
    same RPC the Prolog already makes to requeue. Its text holds fields the user sets (job
    name, comment) that can imitate `MinMemoryNode=`: of every such field the smallest is
    taken, a 0 (none asked) counting as `default_mib`, so a job can only make its own VM
    smaller, never take more than it was granted. RetryLater if slurmctld cannot be asked."""
    try:
        r = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True,
                           text=True, timeout=SCONTROL_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RetryLater(f"cannot ask slurmctld for job {job_id}'s memory: {exc}") from None
    if r.returncode != 0:
        raise RetryLater(f"cannot ask slurmctld for job {job_id}'s memory: "
                         f"{(r.stderr or r.stdout).strip()[:200]}")
    memory = granted_from_show_job(r.stdout, cpus, default_mib)
    if memory is None:
        raise RetryLater(f"slurmctld did not say job {job_id}'s memory (no MinMemoryNode or "
                         "MinMemoryCPU in 'scontrol show job')")
    return memory


def granted_from_show_job(show_job: str, cpus: int, default_mib: int) -> int | None:
    """The smallest memory (MiB on this node) a `scontrol show job` text names, the real one
    and any a user-set field imitates, 0 (none asked) counting as `default_mib`; None if it
    names none."""
    sizes = [float(size) * UNIT_MIB[unit] * (cpus if per == "CPU" else 1) or default_mib
             for per, size, unit in MEMORY_FIELD.findall(show_job)]
    return math.ceil(min(sizes)) if sizes else None


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
