"""Helpers for tests (and benchmarks) that drive the real gridengine cell as pool accounts."""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from pathlib import Path

SGE_ENV = {"SGE_ROOT": "/var/lib/gridengine", "SGE_CELL": "default"}
TIMEOUT = 900


def sge(*args: str, user: str | None = None, check: bool = True) -> str:
    env = {**os.environ, **SGE_ENV}
    cmd = list(args)
    if user:
        cmd = ["su", user, "-s", "/bin/sh", "-c", f"cd ~{user} && {shlex.join(args)}"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} failed: {r.stderr}")
    return r.stdout


def home(user: str) -> Path:
    return Path(f"/home/{user}")


class Cell:
    """One test module's VM queue on the cell: its configuration and the jobs it submitted."""

    def __init__(self, cfg, config_path: Path, base: Path, queue: str):
        self.cfg = cfg
        self.config_path = config_path
        self.base = base
        self.queue = queue
        self.jobs: dict[str, str] = {}

    def submit(self, name: str, user: str, *qsub_args: str) -> str:
        for suffix in ("out", "err"):
            for old in home(user).glob(f"vmim-{name}*.{suffix}"):
                old.unlink()
        out = sge("qsub", "-terse", "-q", self.queue, "-N", name,
                  "-o", f"{home(user)}/vmim-{name}.$TASK_ID.out",
                  "-e", f"{home(user)}/vmim-{name}.$TASK_ID.err", *qsub_args, user=user)
        job_id = out.strip().split(".")[0]
        assert job_id.isdigit(), out
        self.jobs[name] = job_id
        return job_id

    def output(self, name: str, user: str, task: str = "0") -> tuple[str, str]:
        base = home(user) / f"vmim-{name}.{task}"  # $TASK_ID is 0 outside array jobs
        out = Path(f"{base}.out")
        err = Path(f"{base}.err")
        return (out.read_text() if out.exists() else "", err.read_text() if err.exists() else "")


def qacct(job_id: str) -> list[dict[str, str]]:
    """The job's finished records (none yet: qacct says "error: job id N not found", or that
    the accounting file does not exist before the first flush on a new cell)."""
    out = sge("qacct", "-j", job_id, check=False)
    records: list[dict[str, str]] = []
    for line in out.splitlines():
        if line.startswith("====="):
            records.append({})
            continue
        parts = line.split(None, 1)
        if records and len(parts) == 2:
            records[-1][parts[0]] = parts[1].strip()
    return [r for r in records if "exit_status" in r]


def wait_for(predicate, what: str, timeout: float = TIMEOUT, interval: float = 2.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n"
                         f"{sge('qstat', '-u', '*', check=False)}")


def job_state(job_id: str) -> str:
    for line in sge("qstat", "-u", "*", check=False).splitlines():
        fields = line.split()
        if fields and fields[0] == job_id:
            return fields[4]
    return ""


def final_records(job_id: str) -> list[dict[str, str]]:
    """qacct records of attempts that ended the job. A prolog that rescheduled the job (exit 99:
    failed "25 : rescheduling") or held it (exit 100: failed "30 : application error
    returned", the job waits in Eqw) leaves a record too, and the job lives on."""
    return [r for r in qacct(job_id) if r.get("failed", "").split()[:1] not in (["25"], ["30"])]


def release_held(job_id: str) -> None:
    """qmod -cj: gridengine 8.1.9 exits 1 even when it cleared the error state."""
    out = subprocess.run(["qmod", "-cj", job_id], capture_output=True, text=True,
                         env={**os.environ, **SGE_ENV})
    assert f"cleared error state of job {job_id}" in out.stdout + out.stderr, out


def wait_done(job_id: str, tasks: int = 1) -> list[dict[str, str]]:
    return wait_for(lambda: (r := final_records(job_id)) and len(r) >= tasks and r,
                    f"job {job_id} in qacct")
