"""End to end on a real gridengine cell: qsub as pool accounts -> prolog -> VM -> output -> qacct.

All jobs are submitted at once by one module fixture (two VM slots, more jobs than slots), then
each test checks its own job: the node runs them in parallel, and the suite stays short.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import (
    HARNESS,
    import_test_images,
    make_base_dir,
    require,
    run_script,
    write_config,
)
from tests.support.ce_submit import (
    CE_ARGS,
    CE_ENV,
    parse,
    remove_ce_files,
    submit_blah_job,
    submit_gram_job,
    user_file,
)
from tests.support.sgecell import SGE_ENV, Cell, home, job_state, sge, wait_done, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.sge]

QUEUE = "vmtest.q"

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
        # As at a site: each job's guest sees its owner's home (9p, owner scope) and the SGE
        # cell's common directory read-only (CE job scripts source its settings.sh).
        "shared_paths": [{"path": "/home", "mode": "hypervisor"},
                         {"path": f"{SGE_ENV['SGE_ROOT']}/{SGE_ENV['SGE_CELL']}/common",
                          "mode": "hypervisor", "scope": "tree", "readonly": True}],
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
    c = Cell(cfg, path, base, QUEUE)
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
    c.ce = {"gram": submit_gram_job(c, "atlas002"), "blah": submit_blah_job(c, "cms001")}
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
        remove_ce_files(getattr(c, "ce", {}))


@pytest.fixture(scope="module", autouse=True)
def job_files():
    user_file(home("cms001") / "vmim-not-yours.txt", "cms001 data\n", "cms001", 0o644)
    for name, text in (("vmim-test-job.sh", JOB_SCRIPT), ("vmim-test-bash-only.sh", BASH_ONLY)):
        path = Path("/tmp") / name
        path.write_text(text)
        os.chmod(path, 0o755)
    yield
    (home("cms001") / "vmim-not-yours.txt").unlink(missing_ok=True)


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
    from vmimagemanager.domain_meta import lease_metadata

    for name in domains.split():
        xml = subprocess.run(["virsh", "-c", "qemu:///system", "dumpxml", name],
                             capture_output=True, text=True).stdout
        if not xml.strip():  # another job's VM, destroyed since `virsh list` (teardowns run
            continue  # detached from the epilogs); this job's was gone before its lease
        assert lease_metadata(xml).get("job") != f"{job_id}.0"


def test_boot_failure_is_retried_then_held_with_a_clear_reason(cell):
    job_id = cell.jobs["noboot"]
    wait_for(lambda: "E" in job_state(job_id), "the never-booting job to be held (Eqw)")
    _, err = cell.output("noboot", "atlassgm")
    lines = err.splitlines()
    assert any("the VM failed to start (attempt 1 of 2" in line
               and line.endswith("; the job is rescheduled") for line in lines), err
    assert any("the VM failed to start 2 times" in line and "the job is held (Eqw)" in line
               and f"'qmod -cj {job_id}'" in line for line in lines), err
    assert "no ssh host key" in err
    info = sge("qstat", "-j", job_id)
    assert re.search(r"error reason", info), info
    sge("qdel", job_id)


def _owned_by(path: Path, user: str) -> bool:
    entry, st = pwd.getpwnam(user), path.stat()
    return (st.st_uid, st.st_gid) == (entry.pw_uid, entry.pw_gid)


def test_gram_shaped_job_runs_unchanged_in_the_vo_vm_with_the_shared_home(cell):
    """An lcg-CE job (GRAM SGE job manager shape) runs in the VM as written, in its directory."""
    job = cell.ce["gram"]
    user, jobdir, workdir = job["user"], job["jobdir"], job["workdir"]
    record = wait_done(job["job_id"])[0]
    out = (jobdir / "stdout").read_text()
    err = (jobdir / "stderr").read_text()
    info = parse(out)
    assert record["exit_status"] == "3", (record, out, err)  # the executable's own status
    assert info["marker"][0].startswith("VO=atlas "), (out, err)
    assert info["host"][0] in [s.guest_hostname for s in cell.cfg.slots]
    entry = pwd.getpwnam(user)
    assert info["user"] == [f"{user} uid={entry.pw_uid} gid={entry.pw_gid}"]
    assert info["pwd"] == [str(workdir)]  # the script's `cd` into the shared directory
    assert info["arg"] == [f"<{a}>" for a in CE_ARGS]
    assert info["stdin"] == ["line from stdin"]
    assert info["gridtest"] == [CE_ENV["GRID_TEST"]]
    assert info["proxy"] == [f"GRAM-PROXY-FOR-{user}"]  # 0600 proxy in the home, read via 9p
    assert info["cms001_file"] == ["absent"]  # another user's home is not in this VM
    assert err.strip() == "payload stderr line", err  # settings.sh sourced without complaint
    result = workdir / "result.dat"
    assert result.read_text() == f"written in the VM on {info['host'][0]}\n"
    assert _owned_by(result, user)  # on the host, owned by the pool account


def test_blah_shaped_job_runs_unchanged_and_its_sandbox_lands_in_the_home(cell):
    """A CREAM CE job (BLAH sge_submit.sh shape): temporary home, staged proxy, redirections."""
    job = cell.ce["blah"]
    user, new_home = job["user"], job["new_home"]
    record = wait_done(job["job_id"])[0]
    out_file = new_home / "out.txt"
    assert out_file.exists(), sorted(p.name for p in home(user).iterdir())
    out = out_file.read_text()
    info = parse(out)
    assert record["exit_status"] == "5", (record, out)  # the wrapper's `exit $user_retcode`
    assert info["marker"][0].startswith("VO=cms "), out
    assert info["pwd"] == [str(new_home)] and info["home"] == [str(new_home)]
    assert info["arg"] == ["<blah arg>", "<two>"]
    assert info["stdin"] == ["blah stdin"]
    assert info["gridtest"] == ["from cream"]
    assert info["proxy"] == [f"BLAH-PROXY-FOR-{user}"]
    assert info["cms001_file"] == ["visible"]  # the owner's own home is (positive control)
    assert (new_home / "err.txt").read_text() == "payload stderr line\n"
    assert (new_home / "result.dat").read_text().startswith("written in the VM on ")
    for name in ("out.txt", "err.txt", "result.dat"):
        assert _owned_by(new_home / name, user), name
    assert _owned_by(new_home, user)
    # The wrapper moved the staged files into its temporary home and removed them there.
    assert not any((home(user) / name).exists() or (new_home / name).exists()
                   for name in job["staged"])


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
