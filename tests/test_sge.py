"""End to end on a real gridengine cell: qsub as pool accounts -> prolog -> VM -> output -> qacct.

All jobs are submitted at once by one module fixture (two VM slots, more jobs than slots), then
each test checks its own job: the node runs them in parallel, and the suite stays short.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import HARNESS, import_test_images, make_base_dir, require, run_script, write_config

pytestmark = [pytest.mark.integration, pytest.mark.sge]

SGE_ENV = {"SGE_ROOT": "/var/lib/gridengine", "SGE_CELL": "default"}
QUEUE = "vmtest.q"
TIMEOUT = 900

JOB_SCRIPT = """#!/bin/bash
echo "host=$(hostname) kernel=$(uname -r)"
echo "marker=$(cat /etc/grid-middleware-release)"
echo "user=$(id -un) job=$JOB_ID task=$SGE_TASK_ID"
echo "foo=$FOO"
for a in "$@"; do echo "arg=<$a>"; done
echo "stderr line" >&2
exit ${EXIT_WITH:-0}
"""

BASH_ONLY = """#$ -S /bin/bash
# no shebang: SGE runs it with the -S shell; bash-only syntax below
declare -a list=(one two)
echo "bash=${BASH_VERSION%%.*} ${list[1]}"
"""


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
    def __init__(self, cfg, config_path: Path, base: Path):
        self.cfg = cfg
        self.config_path = config_path
        self.base = base
        self.jobs: dict[str, str] = {}

    def submit(self, name: str, user: str, *qsub_args: str) -> str:
        for suffix in ("out", "err"):
            for old in home(user).glob(f"vmim-{name}*.{suffix}"):
                old.unlink()
        out = sge("qsub", "-terse", "-q", QUEUE, "-N", name,
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
    out = sge("qacct", "-j", job_id, check=False)
    records, current = [], {}
    for line in out.splitlines():
        if line.startswith("====="):
            if current:
                records.append(current)
            current = {}
            continue
        parts = line.split(None, 1)
        if len(parts) == 2:
            current[parts[0]] = parts[1].strip()
    if current:
        records.append(current)
    return records


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


def wait_done(job_id: str, tasks: int = 1) -> list[dict[str, str]]:
    return wait_for(lambda: (r := qacct(job_id)) and len(r) >= tasks and r,
                    f"job {job_id} in qacct")


@pytest.fixture(scope="module")
def cell(libvirt_system, guest_images):
    up = run_script(str(HARNESS / "sge-cell.sh"), "up")
    require(up.returncode == 0, f"gridengine cell did not come up: {up.stderr.strip()}")
    from vmimagemanager.config import load_config

    base = make_base_dir("vmim-sge-")
    # Slot names unique per run: a VM another run left behind can never look like ours.
    prefix = f"q{os.getpid()}s"
    path = write_config(base, slots=2, prefix=prefix, extra={
        "boot_timeout": 60, "max_boot_attempts": 2,
        "vos": {"broken": {"image": "atlas-nossh", "users": ["atlassgm"]},
                "atlas": {"image": "atlas", "groups": ["atlas"]},
                "cms": {"image": "cms", "groups": ["cms"]}}})
    cfg = load_config(str(path))
    import_test_images(cfg, guest_images)
    cli = str(Path(sys.executable).parent / "vmimagemanager")
    r = subprocess.run([cli, "--config", str(path), "sge", "install-queue", "--queue", QUEUE,
                        "--wrapper-dir", str(base / "libexec")],
                       capture_output=True, text=True, env={**os.environ, **SGE_ENV})
    assert r.returncode == 0, r.stderr
    c = Cell(cfg, path, base)
    args = ["x y", "it's", 'say "hi"', "$HOME", "*"]
    c.submit("script", "atlas001", "-v", "FOO=bar baz $x", "/tmp/vmim-test-job.sh", *args)
    c.submit("cms", "cms001", "/tmp/vmim-test-job.sh")
    c.submit("binary", "atlas002", "-b", "y", "/bin/sh", "-c",
             'echo "binary in $(cat /etc/grid-middleware-release) args=$1"', "zero", "one two")
    c.submit("exit7", "cms002", "-v", "EXIT_WITH=7", "/tmp/vmim-test-job.sh")
    c.submit("array", "cms003", "-t", "1-3", "/tmp/vmim-test-job.sh")
    c.submit("bash", "atlas003", "/tmp/vmim-test-bash-only.sh")
    c.submit("reject", "dteam001", "/tmp/vmim-test-job.sh")
    c.submit("qdel", "atlas001", "-b", "y", "/bin/sh", "-c", "echo started; sleep 600")
    c.submit("noboot", "atlassgm", "/tmp/vmim-test-job.sh")
    yield c
    # Plain qdel first so that every epilog runs; forced only for what is left after that.
    for job_id in c.jobs.values():
        sge("qdel", job_id, check=False)
    try:
        wait_for(lambda: not any(job_state(j) for j in c.jobs.values()), "jobs to go",
                 timeout=180)
    finally:
        for job_id in c.jobs.values():
            sge("qdel", "-f", job_id, check=False)
        wait_for(lambda: subprocess.run(["pgrep", "-f", "vmim-sge-(prolog|epilog)"],
                                        capture_output=True).returncode != 0,
                 "hooks to finish", timeout=240)
        sge("qconf", "-dq", QUEUE, check=False)
        subprocess.run([cli, "--config", str(path), "reconcile"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def job_files():
    for name, text in (("vmim-test-job.sh", JOB_SCRIPT), ("vmim-test-bash-only.sh", BASH_ONLY)):
        path = Path("/tmp") / name
        path.write_text(text)
        os.chmod(path, 0o755)
    yield


def parse(out: str) -> dict[str, list[str]]:
    result: dict[str, list[str]] = {}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            result.setdefault(key, []).append(value)
    return result


def test_script_job_runs_in_the_atlas_vm_with_args_and_env(cell):
    record = wait_done(cell.jobs["script"])[0]
    out, err = cell.output("script", "atlas001")
    info = parse(out)
    assert info["marker"][0].startswith("VO=atlas "), out
    host = info["host"][0].split()[0]
    assert host in [slot.guest_hostname for slot in cell.cfg.slots]
    assert host != os.uname().nodename
    assert info["arg"] == ["<x y>", "<it's>", '<say "hi">', "<$HOME>", "<*>"]
    assert info["foo"] == ["bar baz $x"]
    assert info["user"][0].startswith("atlas001 job=" + cell.jobs["script"])
    assert "stderr line" in err
    assert record["exit_status"] == "0" and record["failed"] == "0"


def test_cms_job_runs_in_the_cms_image(cell):
    wait_done(cell.jobs["cms"])
    out, _ = cell.output("cms", "cms001")
    assert parse(out)["marker"][0].startswith("VO=cms "), out


def test_binary_job(cell):
    record = wait_done(cell.jobs["binary"])[0]
    out, _ = cell.output("binary", "atlas002")
    assert out.startswith("binary in VO=atlas"), out
    assert "args=one two" in out
    assert record["exit_status"] == "0"


def test_nonzero_exit_shows_in_qacct(cell):
    record = wait_done(cell.jobs["exit7"])[0]
    assert record["exit_status"] == "7"


def test_array_job_runs_every_task_in_a_vm(cell):
    records = wait_done(cell.jobs["array"], tasks=3)
    assert sorted(r["taskid"] for r in records) == ["1", "2", "3"]
    for task in ("1", "2", "3"):
        out, _ = cell.output("array", "cms003", task)
        info = parse(out)
        assert info["marker"][0].startswith("VO=cms ")
        assert info["user"][0].endswith(f"task={task}")


def test_script_with_dash_S_bash_and_no_shebang(cell):
    record = wait_done(cell.jobs["bash"])[0]
    out, err = cell.output("bash", "atlas003")
    assert out.strip() == "bash=5 two", (out, err)
    assert record["exit_status"] == "0"


def test_job_of_no_vo_is_rejected_with_a_message(cell):
    record = wait_done(cell.jobs["reject"])[0]
    _, err = cell.output("reject", "dteam001")
    assert "belongs to no VO configured on this node" in err
    assert record["exit_status"] == "1"


def test_qdel_while_running_leaves_no_vm(cell):
    job_id = cell.jobs["qdel"]
    wait_for(lambda: "started" in cell.output("qdel", "atlas001")[0], "qdel job to start")
    from vmimagemanager.leases import LeaseStore

    lease = LeaseStore(cell.cfg.leases_db).find_job(job_id, "0")
    assert lease is not None
    sge("qdel", job_id)
    wait_done(job_id)
    wait_for(lambda: LeaseStore(cell.cfg.leases_db).find_job(job_id, "0") is None,
             "the qdel'd job's lease to go", timeout=60, interval=1)
    domains = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--name"],
                             capture_output=True, text=True).stdout
    from vmimagemanager.domain_xml import lease_metadata

    for name in domains.split():
        xml = subprocess.run(["virsh", "-c", "qemu:///system", "dumpxml", name],
                             capture_output=True, text=True).stdout
        assert lease_metadata(xml).get("job") != f"{job_id}.0"


def test_boot_failure_is_retried_then_held_with_a_clear_reason(cell):
    job_id = cell.jobs["noboot"]
    wait_for(lambda: "E" in job_state(job_id), "the never-booting job to be held (Eqw)")
    _, err = cell.output("noboot", "atlassgm")
    assert "the VM failed to start (attempt 1 of 2); the job is rescheduled" in err
    assert "the VM failed to start 2 times; the job is held (Eqw)" in err
    assert "no ssh host key" in err
    info = sge("qstat", "-j", job_id)
    assert re.search(r"error reason", info), info
    sge("qdel", job_id)


def test_nothing_left_behind(cell):
    for name in cell.jobs:
        if name != "noboot":
            wait_done(cell.jobs[name], tasks=3 if name == "array" else 1)
    wait_for(lambda: not any(job_state(j) for j in cell.jobs.values()), "queue to drain",
             timeout=120)
    from vmimagemanager.leases import LeaseStore

    wait_for(lambda: not LeaseStore(cell.cfg.leases_db).all(), "leases to be released",
             timeout=60, interval=1)
    assert not list(cell.cfg.overlay_dir.iterdir())
    assert not list((cell.cfg.run_dir / "jobs").iterdir())
    domains = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--name"],
                             capture_output=True, text=True).stdout.split()
    assert not [d for d in domains if d in [s.domain_name for s in cell.cfg.slots]]
    cli = str(Path(sys.executable).parent / "vmimagemanager")
    r = subprocess.run([cli, "--config", str(cell.config_path), "reconcile", "--dry-run"],
                       capture_output=True, text=True)
    assert r.stdout.strip() == "nothing to do: leases, domains and files agree", r.stdout
