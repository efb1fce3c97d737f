"""Integration: another local account takes a VM's ssh forward port between the moment it is
chosen and QEMU's bind (ports.py): QEMU refuses to start, the VM is started on another port.
Real libvirtd and QEMU; the squatter is a process of atlas002, not root. Squatters against jobs of
the real cell: tests/cell/test_port_squatting.py; the same logic without daemons:
tests/unit/test_ports.py.
"""

from __future__ import annotations

import socket
import subprocess

import pytest

from tests.support.squat import SQUATTER, squat_as, stop
from vmimagemanager.domain_meta import forwarded_port
from vmimagemanager.node import JobRequest

pytestmark = pytest.mark.integration


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
        started = life.start_vm(JobRequest("9301", "0", "cms001", "cms", "cms"),
                                    slots=["t2"])
        ctx = started.context
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
