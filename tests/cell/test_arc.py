"""NorduGrid's ARC CE in the loop: A-REX (its web service) with the SGE back end, unchanged, in
front of the cell's VM queue (harness/ce-arc.sh: arc.conf only; the test CA, host certificate
and grid-mapfile from harness/ce-gram.sh). Jobs are submitted as the Grid user does, with
arcsub/arcstat/arcget/arckill and a proxy of the user's certificate, to this host's name.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from tests.support import HARNESS, node_budget, require, run_script
from tests.support.sgecell import SGE_ENV, close_vm_cell, home, open_vm_cell, wait_for
from tests.support.sgecell import grid_client as arc
from vmimagemanager.audit import read_history
from vmimagemanager.homeserver import SERVER_OWN_MIB

pytestmark = [pytest.mark.integration, pytest.mark.sge, pytest.mark.ce]

QUEUE = "vmarc.q"
CE = f"https://{os.uname().nodename}:443/arex"
JOB_SH = """#!/bin/sh
id -un
cat /etc/grid-middleware-release
for a in "$@"; do printf '<%s>\\n' "$a"; done
echo "env=<$GRID_TEST>"
cat in.txt
tr a-z A-Z < in.txt > out.txt
echo to-stderr >&2
exit 3
"""
# ARC's SGE job script puts the arguments in double quotes: "$HOME" would be expanded (natively
# too), so the arguments here are the ones ARC passes through as they are
ARGS = ["two words", "it's", "*", "a;b|c"]


def user_dir(user: str, name: str, files: dict[str, str]):
    d = home(user) / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    for file_name, text in files.items():
        (d / file_name).write_text(text)
    subprocess.run(["chown", "-R", f"{user}:", str(d)], check=True)
    return d


def arc_state(user: str, jobs_list) -> str:
    out = arc(user, "arcstat", "-i", str(jobs_list)).stdout
    m = re.search(r"State: (\w+)", out)
    return m.group(1) if m else ""


@pytest.fixture(scope="module")
def arc_cell(libvirt_system, guest_images):
    common = f"{SGE_ENV['SGE_ROOT']}/{SGE_ENV['SGE_CELL']}/common"
    cell = open_vm_cell(QUEUE, "vmim-arc-", guest_images, extra={
        **node_budget(cores=2, memory_mib=2048),
        "shared_paths": [{"path": "/home", "mode": "hypervisor"},
                         {"path": common, "mode": "hypervisor", "scope": "tree",
                          "readonly": True}]})
    up = run_script(str(HARNESS / "ce-gram.sh"), "up", QUEUE, "atlas001", "cms001")
    require(up.returncode == 0, f"certificates for the CE: {up.stderr.strip()}")
    up = run_script(str(HARNESS / "ce-arc.sh"), "up", QUEUE)
    require(up.returncode == 0, f"A-REX did not come up: {up.stderr.strip()}")
    for user in ("atlas001", "cms001"):
        assert run_script(str(HARNESS / "ce-gram.sh"), "proxy", user).returncode == 0
    yield cell
    close_vm_cell(cell)
    run_script(str(HARNESS / "ce-arc.sh"), "down")
    run_script(str(HARNESS / "ce-gram.sh"), "down")


def test_an_arc_job_runs_in_its_vos_vm_with_files_environment_and_exit_code(arc_cell):
    user = "atlas001"
    args = " ".join(f'"{a}"' for a in ARGS)
    d = user_dir(user, "vmim-arc-job", {
        "job.sh": JOB_SH, "in.txt": "input from the client\n",
        "job.xrsl": f'&(executable="job.sh")(arguments={args})'
                    '(environment=("GRID_TEST" "value with spaces"))'
                    '(inputfiles=("job.sh" "")("in.txt" ""))(outputfiles=("out.txt" ""))'
                    '(stdout="stdout.txt")(stderr="stderr.txt")(jobname="vmim-arc")'})
    r = arc(user, "arcsub", "-c", CE, "-o", "jobs.list", "job.xrsl", cwd=d)
    assert r.returncode == 0 and "Job submitted with jobid" in r.stdout, (r.stdout, r.stderr)
    wait_for(lambda: arc_state(user, d / "jobs.list") in ("Finished", "Failed"), "the ARC job",
             timeout=600, interval=3)
    status = arc(user, "arcstat", "-l", "-i", "jobs.list", cwd=d).stdout
    assert "Exit Code: 3" in status, status  # the payload's code, as ARC reports it natively
    r = arc(user, "arcget", "-i", "jobs.list", cwd=d)
    assert "successfully retrieved: 1" in r.stdout, (r.stdout, r.stderr)
    results = next(p for p in d.iterdir() if p.is_dir())
    lines = (results / "stdout.txt").read_text().splitlines()
    assert lines[0] == user
    assert lines[1].startswith("VO=atlas ")
    assert lines[2:2 + len(ARGS)] == [f"<{a}>" for a in ARGS]
    assert "env=<value with spaces>" in lines and "input from the client" in lines
    assert (results / "stderr.txt").read_text().strip().endswith("to-stderr")
    assert (results / "out.txt").read_text() == "INPUT FROM THE CLIENT\n"
    arc_cell.assert_clean(within=120)


def test_arckill_of_a_running_job_leaves_no_vm(arc_cell):
    user = "cms001"
    d = user_dir(user, "vmim-arc-kill", {
        "job.xrsl": '&(executable="/bin/sleep")(arguments="600")(jobname="vmim-arc-kill")'})
    r = arc(user, "arcsub", "-c", CE, "-o", "jobs.list", "job.xrsl", cwd=d)
    assert r.returncode == 0, (r.stdout, r.stderr)
    wait_for(lambda: arc_state(user, d / "jobs.list") == "Running" and arc_cell.domains(),
             "the job running in its VM", timeout=600, interval=2)
    r = arc(user, "arckill", "-i", "jobs.list", cwd=d)
    assert r.returncode == 0, (r.stdout, r.stderr)
    wait_for(lambda: not arc_cell.domains(), "the VM to go", timeout=180, interval=2)
    arc_cell.assert_clean(within=120)


def test_an_arc_multicore_job_gets_a_vm_of_its_count_and_memory(arc_cell):
    """xRSL count and memory (per slot, as ATLAS's pilots send them) through ARC's SGE back end
    with the runtime environment docs/job-shapes.md gives (harness/ce-arc.sh makes it a default
    one): `-pe smp 2 -l h_vmem=512M`, and the VM has 2 vCPUs and 1 GiB."""
    user = "atlas001"
    d = user_dir(user, "vmim-arc-multicore", {
        "job.sh": "#!/bin/sh\nnproc\nawk '/^MemTotal/ {print $2}' /proc/meminfo\n",
        "job.xrsl": '&(executable="job.sh")(inputfiles=("job.sh" ""))(stdout="stdout.txt")'
                    '(count=2)(countpernode=2)(memory=512)(jobname="vmim-arc-mc")'})
    r = arc(user, "arcsub", "-c", CE, "-o", "jobs.list", "job.xrsl", cwd=d)
    assert r.returncode == 0 and "Job submitted with jobid" in r.stdout, (r.stdout, r.stderr)
    wait_for(lambda: arc_state(user, d / "jobs.list") in ("Finished", "Failed"), "the ARC job",
             timeout=600, interval=3)
    r = arc(user, "arcget", "-i", "jobs.list", cwd=d)
    assert "successfully retrieved: 1" in r.stdout, (r.stdout, r.stderr)
    results = next(p for p in d.iterdir() if p.is_dir())
    nproc, memtotal_kib = (results / "stdout.txt").read_text().split()[:2]
    assert nproc == "2"
    (start,) = [e for e in read_history(arc_cell.cfg) if e["event"] == "start"
                and e.get("cores") == 2]
    # 2 x 512 MiB; less the owner's file server's room where the prolog cannot lift the
    # job's h_vmem limit (root without CAP_SYS_RESOURCE, as on this machine)
    assert start["memory_mib"] in (1024, 1024 - SERVER_OWN_MIB), start
    assert start["memory_mib"] - 128 <= int(memtotal_kib) // 1024 <= start["memory_mib"]
    arc_cell.assert_clean(within=120)
