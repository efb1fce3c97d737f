"""Job-shaped VMs through the real gridengine cell (docs/job-shapes.md).

The module's node gives VMs 4 cores and 4 GiB (with QEMU's overhead) in 5 places; its queue
has 6 slots and the PE smp, so that SGE dispatches more than the node holds and the prolog's
own decisions (fit now, wait, never fits) are what is tested. The configuration, the lease
store's arithmetic and the accounting fields: tests/unit/test_shapes.py.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.support import node_budget
from tests.support.sgecell import (
    CLI,
    SGE_ENV,
    agent_once,
    close_vm_cell,
    job_state,
    open_vm_cell,
    sge,
    wait_done,
    wait_for,
)
from vmimagemanager.audit import read_history
from vmimagemanager.leases import LeaseStore
from vmimagemanager.shape import Shape

QUEUE = "vmshape.q"
SHAPE_JOB = "/tmp/vmim-test-shape-job.sh"
SHAPE_SCRIPT = """#!/bin/sh
echo "nproc $(nproc 2>/dev/null || grep -c ^processor /proc/cpuinfo)"
echo "memtotal_kib $(awk '/^MemTotal/ {print $2}' /proc/meminfo)"
echo "nslots ${NSLOTS:-unset} pe ${PE:-unset}"
if [ -n "$HOG" ]; then tail /dev/zero; fi
if [ -n "$BURN" ]; then  # every vCPU busy for $BURN seconds of the guest's clock
  end=$(( $(date +%s) + BURN ))
  for cpu in $(seq "$(nproc)"); do
    ( while [ "$(date +%s)" -lt "$end" ]; do :; done ) &
  done
  wait
fi
sleep ${SLEEP:-0}
echo finished
"""


@pytest.fixture(scope="module")
def shape_cell(libvirt_system, guest_images):
    Path(SHAPE_JOB).write_text(SHAPE_SCRIPT)
    os.chmod(SHAPE_JOB, 0o755)
    cell = open_vm_cell(QUEUE, "vmim-shape-", guest_images, slots=5, queue_slots=6, extra={
        **node_budget(cores=4, memory_mib=4096),
        # no home served: the payload needs none, and its VM gets all of its h_vmem (a file
        # server under the job's limit: tests/unit/test_shapes.py)
        "shared_paths": [],
        "spares": {"vos": {"atlas": [{"cores": 2, "memory_mib": 512, "count": 1}]}}})
    yield cell
    close_vm_cell(cell)


def report(cell, name: str, user: str) -> dict[str, str]:
    out, _ = cell.output(name, user)
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


def held_cores(cell) -> int:
    return sum(lease.vcpus for lease in LeaseStore(cell.cfg.leases_db).all())


def test_the_pe_and_the_queue_install_queue_made(shape_cell):
    pe = sge("qconf", "-sp", "smp")
    assert re.search(r"^allocation_rule\s+\$pe_slots$", pe, re.M), pe
    queue = sge("qconf", "-sq", QUEUE)
    assert re.search(r"^pe_list\s+smp$", queue, re.M), queue


def test_a_pe_job_gets_its_cores_and_memory_and_a_serial_job_one_core(shape_cell):
    cell = shape_cell
    multi = cell.submit("pe2", "atlas001", "-pe", "smp", "2", "-l", "h_vmem=512M",
                        "-v", "SLEEP=3", SHAPE_JOB)
    serial = cell.submit("serial", "cms001", "-v", "SLEEP=3", SHAPE_JOB)
    wait_done(multi)
    wait_done(serial)
    two, one = report(cell, "pe2", "atlas001"), report(cell, "serial", "cms001")
    assert two["nproc"] == "2" and one["nproc"] == "1", (two, one)
    # the guest's MemTotal is its RAM less what its kernel keeps: within 128 MiB of the shape
    assert 1024 - 128 <= int(two["memtotal_kib"]) // 1024 <= 1024, two
    assert 256 - 128 <= int(one["memtotal_kib"]) // 1024 <= 256, one
    assert two["nslots"] == "2 pe smp" and one["nslots"].startswith("1 "), (two, one)
    starts = {e["job"]: e for e in read_history(cell.cfg) if e["event"] == "start"}
    assert (starts[f"{multi}.0"]["cores"], starts[f"{multi}.0"]["memory_mib"]) == (2, 1024)
    assert (starts[f"{serial}.0"]["cores"], starts[f"{serial}.0"]["memory_mib"]) == (1, 256)


def test_the_accounting_record_of_a_cold_job_has_its_cores_and_covers_its_cpu(shape_cell):
    cell = shape_cell
    """The payload keeps both vCPUs busy for 3 s: the record's CPU is the job's and its boot's,
    and its wall time covers both (docs/accounting.md, "Cores and wall time")."""
    job = cell.submit("acct", "cms001", "-pe", "smp", "2", "-v", "BURN=3", SHAPE_JOB)
    wait_done(job)
    lines = [line.split(":") for line in (cell.cfg.state_dir / "accounting").read_text()
             .splitlines() if line.split(":")[5] == job]
    assert len(lines) == 1, lines
    fields = lines[0]
    slots, pe, wall, cpu = int(fields[34]), fields[33], float(fields[13]), float(fields[36])
    assert (slots, pe) == (2, "smp")
    assert cpu >= 3, f"the record misses the payload's CPU: {cpu} s"
    assert cpu <= wall * slots * 1.05, (cpu, wall, slots)


def test_more_cores_than_the_node_has_is_held_with_the_reason(shape_cell):
    cell = shape_cell
    job = cell.submit("toobig", "atlas001", "-pe", "smp", "6", SHAPE_JOB)
    wait_for(lambda: "E" in job_state(job), "the job to be held (Eqw)", timeout=300)
    _, err = cell.output("toobig", "atlas001")
    assert "can never run on this node: it asks for 6 cores" in err, err
    assert "at most 4 cores" in err, err
    sge("qdel", "-f", job, check=False)
    cell.assert_queue_usable()


def test_three_two_core_jobs_on_four_cores_two_run_the_third_waits_then_runs(shape_cell):
    cell = shape_cell
    cell.cli("spares", "--retire")
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(held_cores(cell))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        jobs = [cell.submit(f"three{i}", "cms001", "-pe", "smp", "2", "-v", "SLEEP=20",
                            SHAPE_JOB) for i in range(3)]
        for job in jobs:
            wait_done(job)
    finally:
        stop.set()
        sampler.join()
    assert max(samples) <= 4, samples
    assert 4 in samples, samples  # two ran at once
    for i in range(3):
        assert report(cell, f"three{i}", "cms001")["nproc"] == "2"
    waited = [e for e in read_history(cell.cfg) if e["event"] == "start"
              and e["job"].split(".")[0] in jobs and e["outcome"] == "retry"]
    assert waited and all("not enough free cores" in e["reason"] for e in waited), waited
    cell.assert_clean(keep=())


def test_a_job_past_its_memory_ends_non_zero_with_the_line_and_the_node_goes_on(shape_cell):
    cell = shape_cell
    job = cell.submit("hog", "cms001", "-l", "h_vmem=384M", "-v", "HOG=1", SHAPE_JOB)
    (record,) = wait_done(job)
    # the script goes on after its hog is killed and exits 0: the job still failed
    assert record["exit_status"].split()[0] == "137", record  # qacct: "137 (Killed)"
    _, err = cell.output("hog", "cms001")
    assert "ran out of its 0.375 GiB" in err, err
    after = cell.submit("afterhog", "cms001", SHAPE_JOB)
    wait_done(after)
    assert report(cell, "afterhog", "cms001")["nproc"] == "1"
    cell.assert_clean()


def test_a_job_binds_a_spare_of_its_shape_and_a_big_job_retires_it(shape_cell):
    cell = shape_cell
    agent_once(cell)
    (spare,) = [lease for lease in cell.all_leases() if lease.is_spare]
    assert spare.shape == Shape(2, 512) and str(spare.state) == "spare"
    bound = cell.submit("onspare", "atlas001", "-pe", "smp", "2", "-l", "h_vmem=256M",
                        SHAPE_JOB)
    wait_done(bound)
    starts = {e["job"]: e for e in read_history(cell.cfg) if e["event"] == "start"}
    assert starts[f"{bound}.0"].get("spare") == spare.job_label, starts[f"{bound}.0"]
    assert report(cell, "onspare", "atlas001")["nproc"] == "2"
    agent_once(cell)  # the next spare of the shape
    (spare,) = [lease for lease in cell.all_leases() if lease.is_spare]
    big = cell.submit("big", "cms001", "-pe", "smp", "4", SHAPE_JOB)
    wait_done(big)
    assert report(cell, "big", "cms001")["nproc"] == "4"
    retired = [e for e in read_history(cell.cfg) if e["event"] == "start"
               and e["job"] == f"{big}.0"]
    assert retired[-1]["outcome"] == "ready" and retired[-1]["cores"] == 4, retired
    assert all(lease.job_label != spare.job_label for lease in cell.all_leases())
    cell.cli("spares", "--retire")
    cell.assert_clean()


def test_install_queue_h_vmem_makes_sge_schedule_the_nodes_memory(shape_cell):
    """--h-vmem: h_vmem consumable, its default the memory per core (0 would kill every job
    that asks for none at once), and this host's h_vmem the VMs' memory less QEMU's per core."""
    cell, host = shape_cell, socket.gethostname()
    complexes, exechost = sge("qconf", "-sc"), sge("qconf", "-se", host)
    try:
        r = subprocess.run([CLI, "--config", str(cell.config_path), "sge", "install-queue",
                            "--queue", "vmshapeh.q", "--wrapper-dir", str(cell.base / "libexec"),
                            "--h-vmem"], capture_output=True, text=True,
                           env={**os.environ, **SGE_ENV})
        assert r.returncode == 0, r.stderr
        assert "h_vmem consumable (3584 MiB a host)" in r.stdout, r.stdout
        h_vmem = next(line.split() for line in sge("qconf", "-sc").splitlines()
                      if line.startswith("h_vmem "))
        assert (h_vmem[5], h_vmem[6]) == ("YES", "256M"), h_vmem
        assert "h_vmem=3584M" in sge("qconf", "-se", host)
        # no --slots: the queue's slots are the node's cores
        assert re.search(r"^slots\s+4$", sge("qconf", "-sq", "vmshapeh.q"), re.M)
    finally:
        sge("qconf", "-dq", "vmshapeh.q", check=False)
        _qconf_file("-Mc", complexes)
        _qconf_file("-Me", "\n".join(
            _line(exechost, "complex_values") if line.startswith("complex_values") else line
            for line in _joined(sge("qconf", "-se", host))
            if not line.startswith(("load_values", "processors"))))
    assert _line(sge("qconf", "-se", host), "complex_values") == \
        _line(exechost, "complex_values")


def _joined(text: str) -> list[str]:
    """qconf's lines with its continuations (a backslash at the end) joined."""
    return text.replace("\\\n", " ").splitlines()


def _line(text: str, key: str) -> str:
    return next(line for line in _joined(text) if line.startswith(key))


def _qconf_file(option: str, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".conf", delete=False) as fh:
        fh.write(text if text.endswith("\n") else text + "\n")
    try:
        sge("qconf", option, fh.name)
    finally:
        os.unlink(fh.name)
