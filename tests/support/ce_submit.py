"""What a Grid CE leaves in a pool account's home and submits to the real cell: Globus GRAM's SGE
job manager (lcg-CE) and BLAH's sge_submit.sh (CREAM CE), with the script shapes of ce_jobs, and
the payload's report of what it saw (`parse`)."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
from pathlib import Path

from tests.support.ce_jobs import blah_sge_script, gram_sge_script
from tests.support.sgecell import SGE_ENV, Cell, home, sge

# The user's executable inside a CE job (staged by the CE into the shared home).
CE_PAYLOAD = """#!/bin/bash
echo "host=$(hostname)"
echo "marker=$(cat /etc/grid-middleware-release)"
echo "user=$(id -un) uid=$(id -u) gid=$(id -g)"
echo "pwd=$(pwd)"
echo "home=$HOME"
for a in "$@"; do echo "arg=<$a>"; done
echo "stdin=$(cat)"
echo "gridtest=$GRID_TEST"
echo "proxy=$(cat "$X509_USER_PROXY")"
echo "cms001_file=$(test -e /home/cms001/vmim-not-yours.txt && echo visible || echo absent)"
echo "written in the VM on $(hostname)" > result.dat
echo "payload stderr line" >&2
exit ${PAYLOAD_EXIT:-0}
"""
CE_ARGS = ["arg one", "it's", 'say "hi"', "$HOME", "`id`"]
CE_ENV = {"GRID_TEST": 'quotes " and $dollar and \\ backslash', "PAYLOAD_EXIT": "3"}


def user_file(path: Path, text: str, user: str, mode: int) -> Path:
    """A file in a user's home as the CE (running as that user) would have left it."""
    entry = pwd.getpwnam(user)
    path.parent.mkdir(parents=True, exist_ok=True)
    for parent in [path.parent, *path.parent.parents]:
        if parent == home(user):
            break
        os.chown(parent, entry.pw_uid, entry.pw_gid)
    path.write_text(text)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    os.chmod(path, mode)
    return path


def submit_gram_job(c: Cell, user: str) -> dict:
    """What an lcg-CE's GRAM SGE job manager leaves in the home and submits (qsub FILE)."""
    tag = f"vmim-gram-{os.getpid()}"
    jobdir = home(user) / ".globus" / "job" / "ce.example.org" / tag
    workdir = home(user) / tag
    shutil.rmtree(workdir, ignore_errors=True)
    shutil.rmtree(jobdir, ignore_errors=True)
    exe = user_file(home(user) / ".globus/.gass_cache/local/md5" / tag / "data", CE_PAYLOAD,
                    user, 0o700)
    proxy = user_file(jobdir / "x509_up", "GRAM-PROXY-FOR-" + user + "\n", user, 0o600)
    stdin = user_file(workdir / "input.txt", "line from stdin\n", user, 0o644)
    env = {"X509_USER_PROXY": str(proxy), "HOME": str(home(user)), "LOGNAME": user, **CE_ENV}
    script = gram_sge_script(queue=c.queue, directory=str(workdir), executable=str(exe),
                             arguments=CE_ARGS, stdin=str(stdin), stdout=str(jobdir / "stdout"),
                             stderr=str(jobdir / "stderr"), environment=env,
                             sge_root=SGE_ENV["SGE_ROOT"], sge_cell=SGE_ENV["SGE_CELL"],
                             wall_minutes=30, cpu_minutes=30, memory_mb=2048)
    script_file = user_file(jobdir / "scheduler_sge_job_script", script, user, 0o644)
    job_id = sge("qsub", str(script_file), user=user).split()[2]
    c.jobs["gram"] = job_id
    return {"user": user, "jobdir": jobdir, "workdir": workdir, "job_id": job_id,
            "gass": exe.parent}


def submit_blah_job(c: Cell, user: str) -> dict:
    """What a CREAM CE's BLAH sge_submit.sh submits, with the stage-in already done."""
    tmp_name = f"bl_vmim{os.getpid()}"
    staged = [f"{tmp_name}.proxy", "payload.sh", "stdin.txt"]
    user_file(home(user) / staged[0], "BLAH-PROXY-FOR-" + user + "\n", user, 0o600)
    user_file(home(user) / staged[1], CE_PAYLOAD, user, 0o644)  # BLAH chmods it u+x itself
    user_file(home(user) / staged[2], "blah stdin\n", user, 0o644)
    shutil.rmtree(home(user) / f"home_{tmp_name}", ignore_errors=True)
    script = blah_sge_script(queue=c.queue, tmp_name=tmp_name, command="payload.sh",
                             arguments=["blah arg", "two"], stdin="stdin.txt", stdout="out.txt",
                             stderr="err.txt",
                             environment={"GRID_TEST": "from cream", "PAYLOAD_EXIT": "5"},
                             staged=staged, proxy=staged[0], submitter_host="cream.example.org")
    script_file = user_file(home(user) / f"{tmp_name}.sh", script, user, 0o600)
    job_id = sge("qsub", str(script_file), user=user).split()[2]
    c.jobs["blah"] = job_id
    return {"user": user, "new_home": home(user) / f"home_{tmp_name}", "job_id": job_id,
            "staged": staged, "globs": [f"{tmp_name}.sh*"]}


def remove_ce_files(ce: dict) -> None:
    """What the CE jobs left in the pool accounts' homes (kept until the module ends)."""
    for job in ce.values():
        for key in ("workdir", "jobdir", "gass", "new_home"):
            if key in job:
                shutil.rmtree(job[key], ignore_errors=True)
                # and the parents made for it (~/.globus/job/...) if empty; stops at user files
                with contextlib.suppress(OSError):
                    os.removedirs(job[key].parent)
        for pattern in job.get("globs", ()):
            for leftover in home(job["user"]).glob(pattern):
                leftover.unlink()


def parse(out: str) -> dict[str, list[str]]:
    result: dict[str, list[str]] = {}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            result.setdefault(key, []).append(value)
    return result
