"""Integration: another local account squats the loopback ports of the VMs' ssh forwards.

Before, a slot's port was fixed in the configuration: a pool account listening on it made every
boot in that slot fail ("Could not set up host forwarding rule") and its jobs were held. Now the
port is chosen at boot among those free (ports.py) and a start whose port is taken between the
choice and QEMU's bind is retried on another. Real libvirtd, QEMU and gridengine cell; the
squatter is a process of atlas002, not root. The same logic without daemons: test_ports.py.
"""

from __future__ import annotations

import socket
import subprocess

import pytest
from sgecell import close_vm_cell, open_vm_cell, qacct, wait_done

from vmimagemanager import ports
from vmimagemanager.domain_xml import forwarded_port
from vmimagemanager.lifecycle import JobRequest

pytestmark = pytest.mark.integration

SQUATTER = "atlas002"
SQUAT = ("import socket, sys, time\n"
         "s = socket.socket()\n"
         "s.bind(('127.0.0.1', int(sys.argv[1])))\n"
         "s.listen()\n"
         "print('bound', flush=True)\n"
         "time.sleep(3600)\n")


def squat_as(user: str, port: int) -> subprocess.Popen:
    """A process of `user` listening on 127.0.0.1:port (what any local account may do)."""
    proc = subprocess.Popen(["runuser", "-u", user, "--", "python3", "-c", SQUAT, str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    if line != "bound":
        proc.kill()
        raise AssertionError(f"squatter on port {port} did not bind: {proc.stderr.read()}")
    return proc


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.kill()
        proc.wait()


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


def test_a_start_whose_port_another_account_takes_in_between_is_retried_on_real_qemu(
        life, vm_setup, monkeypatch):
    """The port was free when chosen; atlas002 binds it just before libvirt starts QEMU. QEMU
    refuses to start, the VM is started on another port, the job's context carries that one,
    and the job's own login works there."""
    from vmimagemanager.context import key_path, read_context
    from vmimagemanager.guest import Endpoint, connect

    cfg = vm_setup[1]
    real_start = life.hv.start
    squatters: list[subprocess.Popen] = []
    tried: list[int] = []

    def start(domain_xml: str) -> None:
        port = forwarded_port(domain_xml)
        tried.append(port)
        if not squatters:
            squatters.append(squat_as(SQUATTER, port))
        real_start(domain_xml)

    monkeypatch.setattr(life.hv, "start", start)
    try:
        _lease, ctx = life.start_vm(JobRequest("9301", "0", "cms001", "cms", "cms"),
                                    slots=["t2"])
        try:
            assert len(tried) == 2 and tried[1] != tried[0], tried
            assert ctx.port == tried[1] == read_context(cfg.run_dir, "9301.0").port
            assert life.ssh_address(cfg.slot("t2")) == ("127.0.0.1", ctx.port)
            session = connect(Endpoint(ctx.host, ctx.port, ctx.user,
                                       key_path(cfg.run_dir, ctx.label), ctx.host_key))
            try:
                assert session.check_call("id -un") == "cms001\n"
            finally:
                session.close()
            assert squatters[0].poll() is None  # the squatter still holds the first port
            with socket.socket() as probe:  # ... and the VM's port is QEMU's, not free
                assert probe.connect_ex(("127.0.0.1", ctx.port)) == 0
        finally:
            life.end_vm("t2")
    finally:
        stop(squatters)
