"""What the Slurm hooks and the starter share: scontrol, and the task id of every Slurm job."""

from __future__ import annotations

import subprocess

TASK_ID = "0"  # every Slurm job, array tasks included, has a job id of its own
SCONTROL_TIMEOUT = 30


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
