"""The Slurm adapter's translation without a running job: a Prolog or Epilog never exits non-zero
(it would drain the node), a decision slurmctld cannot be told about still ends the job visibly,
and the starter's choice per step. Real scontrol, real processes; libvirt's test driver."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys

import pytest

from tests.support import testdriver
from vmimagemanager.batch.slurm_setup import plugstack_line
from vmimagemanager.context import JobContext, read_context, write_context
from vmimagemanager.errors import VmimError

ME = pwd.getpwuid(os.getuid()).pw_name


@pytest.fixture
def config(tmp_path):
    return testdriver.write_node_config(tmp_path / "c.yaml", slots=1, prefix="u", first_port=30991,
                                        vos={"mine": {"image": "not-imported", "users": [ME]}})


def run_hook(hook: str, argv: list[str], job_id: str, user: str = ME) -> int:
    """A root hook in a process of its own (it sets PATH and umask as slurmd's child would)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_JOB_ID=job_id, SLURM_JOB_USER=user, SLURM_JOB_PARTITION="vm")
    code = (f"import sys; from vmimagemanager.batch.slurm import {hook}_main; "
            f"sys.exit({hook}_main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True,
                          timeout=120).returncode


def test_a_retry_slurmctld_refuses_ends_the_job_with_the_reason_and_the_prolog_exits_0(config):
    from vmimagemanager.config import load_config

    # a job slurmctld does not know: its memory cannot be asked (retry), and requeue fails
    assert run_hook("prolog", ["--config", str(config)], "4000000001") == 0
    cfg = load_config(str(config))
    context = read_context(cfg.run_dir, "4000000001.0")
    assert context.mode == "reject"
    assert "cannot ask slurmctld for job 4000000001's memory" in context.message
    assert "could not be requeued: scontrol requeue" in context.message


@pytest.mark.parametrize("argv", [["--config", "/nonexistent/vmim.yaml"], ["--bogus"]])
def test_a_prolog_or_epilog_that_cannot_even_start_exits_0(argv):
    for hook in ("prolog", "epilog"):
        assert run_hook(hook, argv, "4000000002") == 0
        assert run_hook(hook, ["--config", "/nonexistent"], "1; rm -rf /") == 0


def test_plugstack_arguments_cannot_carry_white_space():
    line = plugstack_line("/p/vmim_spank.so", "/usr/bin/python3", "/usr/bin/vmim-slurm-starter",
                          "/etc/vmimagemanager/vmimagemanager.yaml")
    assert line == ("required /p/vmim_spank.so python=/usr/bin/python3 "
                    "starter=/usr/bin/vmim-slurm-starter "
                    "config=/etc/vmimagemanager/vmimagemanager.yaml\n")
    with pytest.raises(VmimError, match="white space"):
        plugstack_line("/p/vmim_spank.so", "/usr/bin/python3", "/s", "/etc/my config.yaml")


# A job id slurmctld never had (below its default MaxJobId, far above what a test cell reaches):
# 77 was a real finished job once the cell had run 77 jobs, and its requeue did not fail.
JOB = "67000077"


def run_starter(config, step: str, *command: str, restarts: str = "0"
                ) -> subprocess.CompletedProcess:
    code = ("import sys; from vmimagemanager.batch.slurm_starter import starter_main; "
            "sys.exit(starter_main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, "--config", str(config), "--job", JOB,
                           "--step", step, "--", *command], capture_output=True, text=True,
                          env={**os.environ, "SLURM_RESTART_COUNT": restarts})


def test_the_starter_per_step_and_context(config):
    from vmimagemanager.config import load_config

    cfg = load_config(str(config))
    # no context: a step of a job without a VM runs as it is; a batch step never does
    r = run_starter(config, "0", "/bin/echo", "native", "it's")
    assert (r.returncode, r.stdout) == (0, "native it's\n")
    r = run_starter(config, "batch", "/bin/echo", "must not run")
    assert r.returncode == 1 and r.stdout == ""
    assert "the prolog did not prepare its VM" in r.stderr
    assert "requeueing it failed: scontrol requeue" in r.stderr  # JOB is not slurmctld's
    r = run_starter(config, "batch", "/bin/echo", "must not run", restarts="3")
    assert r.returncode == 1 and "requeue" not in r.stderr  # no endless requeues
    # a reject context: the batch step ends with its message
    write_context(cfg.run_dir, JobContext(mode="reject", label=f"{JOB}.0",
                                          message="vmimagemanager: no VO"), None,
                  os.getuid(), os.getgid())
    r = run_starter(config, "batch", "/bin/echo", "must not run")
    assert (r.returncode, r.stdout, r.stderr) == (1, "", "vmimagemanager: no VO\n")


def test_a_step_of_a_vm_job_is_refused(config):
    from vmimagemanager.config import load_config

    cfg = load_config(str(config))
    write_context(cfg.run_dir, JobContext(mode="vm", label=f"{JOB}.0", slot="u1", host="127.0.0.1",
                                          port=30991, user=ME, vo="mine", image="x",
                                          host_key="ssh-ed25519 AAAA"), None,
                  os.getuid(), os.getgid())
    r = run_starter(config, "0", "/bin/echo", "must not run")
    assert r.returncode == 1 and r.stdout == ""
    assert "job steps (srun, salloc) cannot run in a job's VM" in r.stderr


# `scontrol show job` of a real job (Slurm 22.05, this machine) whose name and comment imitate
# Slurm's own memory field (sbatch -J and --comment with a line break)
SHOW_JOB = """JobId=16 JobName=x
   MinCPUsNode=1 MinMemoryNode=99G MinTmpDiskNode=0
   UserId=atlas001(5001) GroupId=atlas(5000) MCS_label=N/A
   NumNodes=1 NumCPUs=2 NumTasks=1 CPUs/Task=2 ReqB:S:C:T=0:0:*:*
   MinCPUsNode=2 MinMemoryCPU=300M MinTmpDiskNode=0
   Command=/tmp/sj.sh
   Comment=y
   MinCPUsNode=1 MinMemoryNode=98G
"""


def test_a_jobs_own_fields_can_only_make_its_vm_smaller():
    from vmimagemanager.batch.slurmctl import cpus_on_this_node, granted_from_show_job

    assert granted_from_show_job(SHOW_JOB, 2, 4096) == 600  # 2 x 300M, not the name's 99G
    # a field that says 0 (none asked) counts as the default: it cannot enlarge a 600 MiB job
    assert granted_from_show_job(SHOW_JOB + "   MinMemoryNode=0\n", 2, 4096) == 600
    # nor can a field enlarge a job that asked for none
    assert granted_from_show_job("MinMemoryNode=0 \nComment=x MinMemoryNode=99G", 1, 256) == 256
    assert granted_from_show_job("   MinCPUsNode=1 MinMemoryNode=1.5G MinTmpDiskNode=0", 1,
                                 256) == 1536
    assert granted_from_show_job("JobId=5 JobName=x", 1, 256) is None
    assert [cpus_on_this_node(v) for v in ("2", "8(x3),1", "4,2", "", "x", "123456")] == [
        2, 8, 4, 1, 1, 1]
