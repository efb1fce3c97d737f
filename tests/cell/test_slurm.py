"""The Slurm adapter on real daemons (slurmctld, slurmd, munged on this host; harness/
slurm-cell.sh): jobs submitted unchanged by pool accounts run in their VO's VM, with arguments,
environment, stdin, stdout/stderr files and exit codes as Slurm gives them natively."""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path

import pytest

from tests.support import (
    HARNESS,
    import_test_images,
    make_base_dir,
    node_budget,
    require,
    run_script,
    write_config,
)
from tests.support.sgecell import BROKEN_VOS, CLI, VmCell, import_broken_image, wait_for
from vmimagemanager.audit import read_history
from vmimagemanager.config import load_config

pytestmark = [pytest.mark.integration]

HOSTILE = ["two words", "it's", 'say "hi"', "$HOME", "*", "a;b|c", "a\\b", ""]
SHOW = """#!/bin/sh
echo "host $(hostname)"
cat /etc/grid-middleware-release
for a in "$@"; do printf '<%s>\\n' "$a"; done
echo "VMIM_T=$VMIM_T task=${SLURM_ARRAY_TASK_ID:-none} cwd=$(pwd)"
echo "to stderr" >&2
exit ${EXIT:-0}
"""
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def job_fields(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True,
                         text=True).stdout
    fields = {}
    for part in out.split():
        key, sep, value = part.partition("=")
        if sep and key not in fields:
            fields[key] = value
    if "Comment=" in out:  # a comment may hold spaces: up to the next field
        fields["Comment"] = out.split("Comment=", 1)[1].split(" Requeue=")[0].split(
            " StdErr=")[0]
    return fields


def wait_job(job_id: str, states=DONE, timeout: float = 300) -> dict[str, str]:
    return wait_for(lambda: (f := job_fields(job_id)).get("JobState") in states and f,
                    f"job {job_id} to reach {sorted(states)}", timeout=timeout, interval=0.5)


def node_state() -> str:
    return subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True,
                          text=True).stdout.strip()


def settled_node_state() -> str:
    """The node's state once Slurm has finished the job's epilog ("completing" is on the way to
    idle after a requeue, not a drain; a drained node shows "drained" or "draining")."""
    return wait_for(lambda: (state := node_state()) != "completing" and state,
                    "the node to finish completing", timeout=120, interval=0.5)


class SlurmCell(VmCell):
    def sbatch(self, user: str, *args: str, name: str = "job") -> str:
        home = Path(pwd.getpwnam(user).pw_dir)
        for old in home.glob(f"vmim-slurm-{name}*"):
            old.unlink()
        r = subprocess.run(["runuser", "-u", user, "--", "sbatch", "--parsable",
                            "-o", f"{home}/vmim-slurm-{name}-%a.out",
                            "-e", f"{home}/vmim-slurm-{name}-%a.err", *args],
                           capture_output=True, text=True, cwd=home)
        assert r.returncode == 0, r.stderr
        job_id = r.stdout.strip().split(";")[0]
        self.jobs[name] = job_id
        return job_id

    def assert_queue_usable(self) -> None:  # assert_clean's last check, for Slurm
        state = settled_node_state()
        assert state == "idle", subprocess.run(["sinfo", "-R"], capture_output=True,
                                               text=True).stdout

    def files(self, user: str, name: str, task: str = "4294967294") -> tuple[str, str]:
        base = Path(pwd.getpwnam(user).pw_dir) / f"vmim-slurm-{name}-{task}"
        read = lambda p: p.read_text() if p.exists() else ""  # noqa: E731
        return read(Path(f"{base}.out")), read(Path(f"{base}.err"))


@pytest.fixture(scope="module")
def slurm(libvirt_system, guest_images):
    up = run_script(str(HARNESS / "slurm-cell.sh"), "up")
    require(up.returncode == 0, f"the Slurm cluster did not come up: {up.stderr.strip()}")
    base = make_base_dir("vmim-slurm-")
    path = write_config(base, slots=2, prefix=f"sl{os.getpid()}s", extra={
        **node_budget(cores=2, memory_mib=2048), "health": {"back_after": 0},
        "boot_timeout": 60, "max_boot_attempts": 2, "vos": BROKEN_VOS,
        "shared_paths": [{"path": "/home", "mode": "hypervisor"}]})
    cfg = load_config(str(path))
    import_test_images(cfg, guest_images, names=("atlas", "cms"))
    cell = SlurmCell(cfg, path, base, "vm")
    import_broken_image(cell, guest_images)
    script = base / "show.sh"
    script.write_text(SHOW)
    script.chmod(0o755)
    r = subprocess.run([CLI, "--config", str(path), "slurm", "install-hooks"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "add to slurm.conf" not in r.stderr, r.stderr  # the harness' slurm.conf has them
    yield cell
    for job_id in cell.jobs.values():
        subprocess.run(["scancel", job_id], capture_output=True)
    run_script(str(HARNESS / "slurm-cell.sh"), "unhook")
    cell.cli("reconcile")
    subprocess.run(["rm", "-rf", str(base)])


def test_each_vos_jobs_run_in_its_image_with_arguments_environment_and_exit_code(slurm):
    show = str(slurm.base / "show.sh")
    atlas = slurm.sbatch("atlas001", "--export=ALL,VMIM_T=a b", show, *HOSTILE, name="atlas")
    cms = slurm.sbatch("cms001", "--export=ALL,EXIT=3,VMIM_T=x", show, "only", name="cms")
    done = {job: wait_job(job) for job in (atlas, cms)}
    assert done[atlas]["ExitCode"] == "0:0", slurm.files("atlas001", "atlas")
    assert done[cms]["ExitCode"] == "3:0" and done[cms]["JobState"] == "FAILED"
    out, err = slurm.files("atlas001", "atlas")
    slots = {s.guest_hostname for s in slurm.cfg.slots}
    assert out.splitlines()[0].removeprefix("host ") in slots, out
    assert "VO=atlas" in out
    assert [line[1:-1] for line in out.splitlines() if line.startswith("<")] == HOSTILE
    assert "VMIM_T=a b task=none cwd=/home/atlas001" in out
    assert err == "to stderr\n"
    out, _ = slurm.files("cms001", "cms")
    assert "VO=cms" in out and "<only>" in out
    starts = {e["job"]: e for e in read_history(slurm.cfg) if e["event"] == "start"}
    assert starts[f"{atlas}.0"]["vo"] == "atlas" and starts[f"{cms}.0"]["queue"] == "vm"
    ends = {e["job"]: e for e in read_history(slurm.cfg) if e["event"] == "end"}
    assert ends[f"{cms}.0"]["exit_status"] == "3" and ends[f"{atlas}.0"]["exit_status"] == "0"
    slurm.assert_clean()


def test_a_job_with_cpus_and_memory_gets_a_vm_of_that_shape(slurm):
    """sbatch -c 2 --mem=1G: 2 vCPUs and 1 GiB (the Prolog's SLURM_JOB_CPUS_PER_NODE, the
    memory asked of slurmctld); the job's own SLURM_CPUS_ON_NODE unchanged."""
    job = slurm.sbatch("atlas001", "-c", "2", "--mem=1G", "--wrap",
                       "nproc; awk '/^MemTotal/ {print $2}' /proc/meminfo; "
                       "echo $SLURM_CPUS_ON_NODE", name="shape")
    assert wait_job(job)["ExitCode"] == "0:0", slurm.files("atlas001", "shape")
    nproc, memtotal_kib, cpus_on_node = slurm.files("atlas001", "shape")[0].split()[:3]
    assert (nproc, cpus_on_node) == ("2", "2")
    assert 1024 - 128 <= int(memtotal_kib) // 1024 <= 1024, memtotal_kib
    starts = {e["job"]: e for e in read_history(slurm.cfg) if e["event"] == "start"}
    assert (starts[f"{job}.0"]["cores"], starts[f"{job}.0"]["memory_mib"]) == (2, 1024)
    slurm.assert_clean()


def test_wrap_input_file_and_array_tasks(slurm, tmp_path):
    home = Path("/home/cms001")
    (home / "vmim-slurm-input.txt").write_text("line from the input file\n")
    wrap = slurm.sbatch("cms001", "--input", str(home / "vmim-slurm-input.txt"), "--wrap",
                        "hostname; cat; echo \"wrapped $((6 * 7))\"", name="wrap")
    array = slurm.sbatch("atlas001", "--array=1-3", str(slurm.base / "show.sh"), "arg",
                         name="array")
    assert wait_job(wrap)["ExitCode"] == "0:0"
    out, _ = slurm.files("cms001", "wrap")
    host, line, wrapped = out.splitlines()
    assert host in {s.guest_hostname for s in slurm.cfg.slots}
    assert (line, wrapped) == ("line from the input file", "wrapped 42")
    wait_for(lambda: not subprocess.run(["squeue", "-h", "-j", array], capture_output=True,
                                        text=True).stdout.strip(),
             "the array's tasks to end", timeout=400, interval=1)
    for task in ("1", "2", "3"):
        out, _ = slurm.files("atlas001", "array", task)
        assert f"task={task}" in out and "VO=atlas" in out and "<arg>" in out, out
    vm_jobs = [e for e in read_history(slurm.cfg)
               if e["event"] == "start" and e.get("mode") == "vm"]
    assert len({e["slot"] + e["job"] for e in vm_jobs}) == len(vm_jobs)  # a VM per task
    slurm.assert_clean()


def test_scancel_of_a_running_job_leaves_no_vm(slurm):
    job = slurm.sbatch("atlas001", "--wrap", "echo started; sleep 300", name="cancel")
    wait_for(lambda: "started" in slurm.files("atlas001", "cancel")[0],
             "the job to start in its VM", timeout=240, interval=0.5)
    assert slurm.domains(), "the job runs, so its VM does"
    subprocess.run(["scancel", job], check=True)
    assert wait_job(job)["JobState"] == "CANCELLED"
    slurm.assert_clean()
    assert settled_node_state() == "idle"


def test_a_boot_failure_is_requeued_then_held_with_the_reason_and_the_node_stays_up(slurm):
    job = slurm.sbatch("atlas002", "--wrap", "echo must not run", name="broken")
    first = wait_job(job, states={"PENDING"}, timeout=240)
    wait_for(lambda: job_fields(job).get("Restarts") == "1", "the first requeue", timeout=240)
    assert settled_node_state() == "idle", "a requeue from the prolog must not drain the node"

    def held_or_sooner():  # the admin's "run it now" for each requeue (Slurm waits ~2 min)
        fields = job_fields(job)
        if fields.get("Reason") == "BeginTime":
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
        # COMPLETING with the hold's reason comes first while the requeue finishes
        return (fields.get("Reason") == "job_requeued_in_held_state"
                and fields.get("JobState") == "PENDING" and fields)

    held = wait_for(held_or_sooner, "the job to be held, pending", timeout=300, interval=0.5)
    assert first["JobState"] == "PENDING"
    assert "the VM failed to start 2 times (VO broken, image broken)" in held["Comment"], held
    assert settled_node_state() == "idle"
    assert not slurm.files("atlas002", "broken")[0]  # the payload never ran
    outcomes = [e["outcome"] for e in read_history(slurm.cfg, job=job) if e["event"] == "start"]
    assert outcomes == ["retry", "hold"]
    subprocess.run(["scancel", job], check=True)
    slurm.assert_clean()


def test_a_job_step_of_a_vm_job_is_refused_with_the_reason(slurm):
    r = subprocess.run(["runuser", "-u", "atlas001", "--", "srun", "-t", "5", "hostname"],
                       capture_output=True, text=True, cwd="/home/atlas001", timeout=300)
    assert r.returncode != 0
    assert "job steps (srun, salloc) cannot run in a job's VM" in r.stderr, r.stderr
    slurm.assert_clean()


def test_libvirtd_down_drains_the_node_with_the_reason_and_resumes_it(slurm):
    """The agent's round drains this Slurm node while libvirtd is down (`sinfo -R` says why)
    and resumes it once it is back (health.back_after 0 here: the next round)."""
    from tests.support.sgecell import agent_once, stop_libvirtd

    stop_libvirtd()
    try:
        agent_once(slurm)
        reasons = subprocess.run(["sinfo", "-R", "-h", "-o", "%E"], capture_output=True,
                                 text=True).stdout
        assert reasons.startswith("vmimagemanager: libvirtd"), reasons
        assert "drain" in node_state(), node_state()
    finally:
        assert run_script(str(HARNESS / "libvirt-up.sh")).returncode == 0
    agent_once(slurm)
    # resumed; slurmctld may show it "idle*" (not responding) for a moment after the drain
    wait_for(lambda: node_state() == "idle", "the node to be idle again", timeout=180,
             interval=1)
