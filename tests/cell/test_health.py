"""Node health through the real cell: with libvirtd down the agent's round disables this host's
VM queue instance (a job waits pending, its .e file gains no line), `vmimagemanager health`
says why and since when; libvirtd back, the next round enables it and the job runs. An admin's
own `qmod -d` is never undone (batch/service.py)."""

from __future__ import annotations

import json
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
    cell = open_vm_cell(QUEUE, "vmim-health-", guest_images, extra={
        "health": {"back_after": 0}})
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
