"""Integration: another local account squats the loopback ports of the VMs' ssh forwards.

Before, a slot's port was fixed in the configuration: a pool account listening on it made every
boot in that slot fail ("Could not set up host forwarding rule") and its jobs were held. Now the
port is chosen at boot among those free (ports.py). Real libvirtd, QEMU and gridengine cell; the
squatter is a process of atlas002, not root. A start whose port is taken between the choice and
QEMU's bind, on real QEMU: tests/vm/test_port_squatting.py; the same logic without daemons:
tests/unit/test_ports.py.
"""

from __future__ import annotations

import pytest

from tests.support.sgecell import close_vm_cell, open_vm_cell, qacct, wait_done
from tests.support.squat import SQUATTER, squat_as, stop
from vmimagemanager import ports

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def squat_cell(libvirt_system, guest_images):
    cell = open_vm_cell("vmport.q", "vmim-port-", guest_images)
    yield cell
    close_vm_cell(cell)


@pytest.mark.sge
def test_two_jobs_run_while_another_account_squats_every_slots_configured_port(squat_cell):
    cell = squat_cell
    squatters = [squat_as(SQUATTER, slot.network.ssh_port) for slot in cell.cfg.slots]
    try:
        jobs = {"portsq-atlas": cell.run_job("portsq-atlas", "atlas001", sleep=2),
                "portsq-cms": cell.run_job("portsq-cms", "cms001", sleep=2)}
        for name, job_id in jobs.items():
            user = "atlas001" if "atlas" in name else "cms001"
            record = wait_done(job_id)[0]
            out, err = cell.output(name, user)
            assert record["exit_status"] == "0" and record["failed"] == "0", (record, err)
            assert "started on" in out and "finished" in out, (out, err)
            # never held, never rescheduled for a failed boot
            assert [r for r in qacct(job_id) if r.get("failed", "").split()[:1]
                    in (["25"], ["30"])] == []
        assert all(proc.poll() is None for proc in squatters)  # they kept their ports
        assert not any(ports.is_free("127.0.0.1", s.network.ssh_port) for s in cell.cfg.slots)
    finally:
        stop(squatters)
    cell.assert_clean()
