"""Node health through the real cell: with libvirtd down the agent's round disables this host's
VM queue instance (a job waits pending, its .e file gains no line), `vmimagemanager health`
says why and since when; libvirtd back, the next round enables it and the job runs. An admin's
own `qmod -d` is never undone (batch/service.py)."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

from tests.support import HARNESS, run_script
from tests.support.sgecell import (
    agent_once,
    close_vm_cell,
    job_state,
    open_vm_cell,
    sge,
    stop_libvirtd,
    wait_done,
)
from vmimagemanager.audit import read_history

pytestmark = [pytest.mark.integration, pytest.mark.sge]

QUEUE = "vmhealth.q"


@pytest.fixture(scope="module")
def health_cell(libvirt_system, guest_images):
    cell = open_vm_cell(QUEUE, "vmim-health-", guest_images, small_overlay_fs=True, extra={
        "health": {"back_after": 0, "min_free_mib": 16, "gone_after": 0}})
    yield cell
    run_script(str(HARNESS / "libvirt-up.sh"))
    sge("qmod", "-e", f"{QUEUE}@{socket.gethostname().split('.')[0]}", check=False)
    close_vm_cell(cell)


def instance() -> str:
    return f"{QUEUE}@{socket.gethostname().split('.')[0]}"


def disabled() -> bool:
    return instance() in sge("qselect", "-q", instance(), "-qs", "d", check=False).split()


def health(cell) -> tuple[int, dict]:
    r = cell.cli("health", "--json")
    return r.returncode, json.loads(r.stdout)


def test_libvirtd_down_takes_the_node_out_and_back_with_the_reason(health_cell):
    cell = health_cell
    agent_once(cell)
    assert not disabled()
    stop_libvirtd()
    try:
        agent_once(cell)
        assert disabled()
        code, report = health(cell)
        assert code == 2 and report["status"] == "out of service", report
        assert "libvirtd" in report["out_of_service"]["reason"]
        assert report["out_of_service"]["sge"] == [instance()]
        job = cell.run_job("healthwait")
        time.sleep(20)  # several scheduling intervals: the job is not sent here
        assert job_state(job) == "qw", job_state(job)
        assert cell.output("healthwait", "atlas001") == ("", "")  # no line in its .e file
    finally:
        assert run_script(str(HARNESS / "libvirt-up.sh")).returncode == 0
    agent_once(cell)
    assert not disabled()
    wait_done(job)
    out, _ = cell.output("healthwait", "atlas001")
    assert "finished" in out, out
    actions = [e["action"] for e in read_history(cell.cfg) if e["event"] == "health"]
    assert any(a.startswith(f"disabled queue instance {instance()}: libvirtd") for a in actions)
    assert f"enabled queue instance {instance()} again" in actions
    assert health(cell)[0] == 0
    cell.assert_clean()


def test_a_full_overlay_directory_takes_the_node_out_and_back(health_cell):
    """overlay_dir (a 64 MiB tmpfs here) with less than health.min_free_mib (16) free: the
    next round disables the instance with the reason; space freed, the next enables it."""
    cell = health_cell
    free = os.statvfs(cell.cfg.overlay_dir)
    # unlinked at once (reconcile removes a file no lease explains): held by its descriptor
    fd = os.open(cell.cfg.overlay_dir, os.O_TMPFILE | os.O_WRONLY, 0o600)
    try:
        os.write(fd, b"\0" * (free.f_bavail * free.f_frsize - 8 * 1024 * 1024))
        agent_once(cell)
        assert disabled()
        code, report = health(cell)
        assert code == 2 and "overlay_dir" in report["out_of_service"]["reason"], report
    finally:
        os.close(fd)
    agent_once(cell)
    assert not disabled()
    actions = [e["action"] for e in read_history(cell.cfg) if e["event"] == "health"]
    assert any(a.startswith(f"disabled queue instance {instance()}: overlay_dir")
               for a in actions), actions
    assert health(cell)[0] == 0
    cell.assert_clean()


def test_an_admins_qmod_d_is_left_alone(health_cell):
    cell = health_cell
    sge("qmod", "-d", instance())
    try:
        agent_once(cell)
        assert disabled()  # healthy, but the admin's: not enabled
        stop_libvirtd()
        try:
            agent_once(cell)
        finally:
            assert run_script(str(HARNESS / "libvirt-up.sh")).returncode == 0
        agent_once(cell)
        assert disabled()  # taken out while the admin had it out: still the admin's
        actions = [e["action"] for e in read_history(cell.cfg) if e["event"] == "health"]
        assert any("was disabled already (left to the admin)" in a for a in actions)
    finally:
        sge("qmod", "-e", instance())


def test_a_vm_whose_job_is_gone_without_its_epilog_is_torn_down_in_two_rounds(health_cell):
    """The queue's epilog turned off for one job (as if it could not reach the leases
    database, or the job was `qdel -f`ed from a lost execd): the job ends, its lease stays
    running with a live VM. The agent asks qstat once a round; the second round that finds
    no such job tears the VM down and says so in the audit trail. A job running beside it
    keeps its VM through every round."""
    cell = health_cell
    conf = sge("qconf", "-sq", QUEUE)
    sge("qconf", "-mattr", "queue", "epilog", "NONE", QUEUE)
    try:
        job = cell.run_job("noepilog")
        wait_done(job)
    finally:
        path = cell.base / "queue.conf"
        path.write_text(conf)
        sge("qconf", "-Mq", str(path))
    out, _ = cell.output("noepilog", "atlas001")
    assert "finished" in out, out
    lease = cell.lease(job)
    assert lease is not None and str(lease.state) == "running", lease
    assert cell.domains(), "the job's VM went without an epilog"
    alive = cell.run_job("stillthere", sleep=30)
    cell.wait_started("stillthere")
    agent_once(cell)
    assert cell.lease(job) is not None  # once gone is not yet gone
    lines = agent_once(cell)
    assert any(f"tear down the VM of job {job}.0" in line for line in lines), lines
    assert cell.lease(job) is None
    actions = [e.get("action", "") for e in read_history(cell.cfg, job=f"{job}.0")
               if e["event"] == "reconcile"]
    assert any("the batch system has not known its job for two rounds" in a for a in actions)
    agent_once(cell)
    assert str(cell.lease(alive).state) == "running"  # its job is known: never torn down
    wait_done(alive)
    out, _ = cell.output("stillthere", "atlas001")
    assert "finished" in out, out
    cell.assert_clean()
