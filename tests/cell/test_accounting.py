"""Accounting on the real cell: a job's VM usage is the job's.

gridengine 8.1.9 counts a process in a job's usage only if it carries the job's additional group
id *and* started after the job did; a job's VM boots in the prolog, so qacct never sees it
(docs/accounting.md has the evidence). The epilog therefore writes the job's true usage, VM
included, as a line in gridengine's accounting format (what APEL's SGE parser reads) to
state_dir/accounting. These tests check that record against libvirt's own figures sampled while
the job ran, and against qacct's record of the same job.
"""

from __future__ import annotations

import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.sgecell import (
    close_vm_cell,
    final_records,
    job_state,
    open_vm_cell,
    sge,
    wait_done,
)
from vmimagemanager.batch.sge_accounting import FIELDS

pytestmark = [pytest.mark.integration, pytest.mark.sge]

QUEUE = "vmacct.q"
BURN = "/tmp/vmim-test-burn.sh"
BURN_SCRIPT = """#!/bin/sh
# CPU inside the VM: a shell loop, then a few idle seconds
i=0
while [ $i -lt ${N:-400000} ]; do i=$((i + 1)); done
echo "burned $i"
sleep 3
"""


@pytest.fixture(scope="module")
def acct(libvirt_system, guest_images):
    with open(BURN, "w") as fh:
        fh.write(BURN_SCRIPT)
    os.chmod(BURN, 0o755)
    cell = open_vm_cell(QUEUE, "vmim-acct-", guest_images)
    yield cell
    close_vm_cell(cell)


def records(cell) -> dict[str, list[dict[str, str]]]:
    """Our accounting lines by job.task, parsed with APEL's SGE parser's field positions."""
    path = cell.cfg.state_dir / "accounting"
    result: dict[str, list[dict[str, str]]] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        values = line.split(":")
        assert len(values) == len(FIELDS), line
        rec = dict(zip(FIELDS, values, strict=True))
        # what APEL reads: x[3] owner, x[5] job, x[9]/x[10] times, x[13] wall, x[36] cpu, x[42]
        assert (values[3], values[5], values[13], values[36], values[42]) == (
            rec["owner"], rec["job_number"], rec["ru_wallclock"], rec["cpu"], rec["maxvmem"])
        result.setdefault(f"{rec['job_number']}.{rec['task_number']}", []).append(rec)
    return result


def vm_cpu(domain: str) -> float | None:
    out = subprocess.run(["virsh", "-c", "qemu:///system", "domstats", domain, "--cpu-total"],
                         capture_output=True, text=True).stdout
    for line in out.split():
        if line.startswith("cpu.time="):
            return int(line.split("=")[1]) / 1e9
    return None


def sample_until_done(cell, jobs: list[str], tasks: int = 1) -> dict[str, float]:
    """libvirt's CPU seconds of each job's domain, last seen while the job ran."""
    last: dict[str, float] = {}
    deadline = time.monotonic() + 600
    while any(job_state(j) for j in jobs) and time.monotonic() < deadline:
        for lease in cell.all_leases():
            if lease.job_id in jobs and str(lease.state) == "running":
                cpu = vm_cpu(f"vmim-{lease.slot}")
                if cpu is not None:
                    last[lease.job_label] = cpu
        time.sleep(0.5)
    return last


def check(rec: dict[str, str], qacct_rec: dict[str, str], sampled: float) -> float:
    """The record is the job's (same identity and times as qacct's) and holds its VM's CPU."""
    for ours, theirs in (("owner", "owner"), ("qname", "qname"), ("hostname", "hostname"),
                         ("group", "group"), ("job_number", "jobnumber")):
        assert rec[ours] == qacct_rec[theirs], (ours, rec, qacct_rec)
    assert rec["exit_status"] == qacct_rec["exit_status"].split()[0]
    assert int(rec["start_time"]) <= int(rec["end_time"])
    cpu = float(rec["cpu"])
    assert sampled <= cpu <= sampled * 1.1 + 1.0, (cpu, sampled)
    assert float(rec["maxvmem"]) > 100 * 2**20  # the VM's memory, not the ssh client's 41 MB
    return cpu


def test_a_cpu_burning_job_is_accounted_with_its_vm_and_far_above_a_sleeper(acct):
    burner = acct.submit("burn", "atlas001", BURN)
    sleeper = acct.submit("sleep", "cms001", "-v", "SLEEP=10", "/tmp/vmim-test-sleep-job.sh")
    sampled = sample_until_done(acct, [burner, sleeper])
    burn_q, sleep_q = wait_done(burner)[0], wait_done(sleeper)[0]
    assert "burned 400000" in acct.output("burn", "atlas001")[0]
    ours = records(acct)
    assert len(ours[f"{burner}.0"]) == 1 and len(ours[f"{sleeper}.0"]) == 1
    burn_cpu = check(ours[f"{burner}.0"][0], burn_q, sampled[f"{burner}.0"])
    sleep_cpu = check(ours[f"{sleeper}.0"][0], sleep_q, sampled[f"{sleeper}.0"])
    assert burn_cpu > sleep_cpu + 3, (burn_cpu, sleep_cpu)  # both booted; one also burned
    print(f"burner: ours {burn_cpu:.2f} s, qacct {burn_q['cpu']}; "
          f"sleeper: ours {sleep_cpu:.2f} s, qacct {sleep_q['cpu']}")


def test_array_tasks_and_a_deleted_job_are_each_accounted_once(acct):
    array = acct.submit("arr", "cms002", "-t", "1-2", "-v", "N=50000", BURN)
    victim = acct.submit("victim", "atlas002", "-v", "N=100000000", BURN)
    with ThreadPoolExecutor(1) as pool:
        sampling = pool.submit(sample_until_done, acct, [array, victim])
        acct.wait_lease_state(victim, "running", timeout=240)
        time.sleep(6)  # it burns CPU in its VM for a while, then is deleted
        sge("qdel", victim)
        sampled = sampling.result()
    tasks = wait_done(array, tasks=2)
    killed = wait_done(victim)[0]
    ours = records(acct)
    for rec in tasks:
        label = f"{array}.{rec['taskid']}"
        assert len(ours[label]) == 1, ours.get(label)
        check(ours[label][0], rec, sampled[label])
    assert len(ours[f"{victim}.0"]) == 1
    victim_cpu = check(ours[f"{victim}.0"][0], killed, sampled[f"{victim}.0"])
    assert victim_cpu > 6  # its boot and its seconds of burning are not lost at qdel
    assert len(final_records(victim)) == 1
    acct.assert_clean()
