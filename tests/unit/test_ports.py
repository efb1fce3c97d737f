"""A user-network VM's ssh forward gets a port chosen at boot, never a fixed one (ports.py).

Any local account can bind a loopback port. With the port fixed in the configuration, one that
did so before QEMU made every boot in that slot fail and its jobs were held. These tests squat
ports with sockets of their own and check that the port is never used, that the chosen one is
what libvirt, the job's context and every login see, and that a start whose forward loses the
race for its port is retried on another, never counted as a failed boot, never held.

libvirt's test driver (real libvirt code, no QEMU) runs the domains; QemuForward adds what QEMU's
user networking does at start: bind the forward's port and hold it while the domain runs, or
fail the start with QEMU's own message when the port is taken. The same with the real QEMU and
a squatter of another account: tests/vm/test_port_squatting.py and
tests/cell/test_port_squatting.py (integration).
"""

from __future__ import annotations

import os
import pwd
import socket
import sqlite3
import subprocess
from xml.etree import ElementTree

import pytest

from tests.support import testdriver
from vmimagemanager import ports
from vmimagemanager.context import read_context
from vmimagemanager.domain_meta import SSH_PORT_KEY, forwarded_port, lease_metadata
from vmimagemanager.domain_xml import DomainSpec, build_domain_xml
from vmimagemanager.errors import BootError, NoFreePort, RetryLater
from vmimagemanager.hypervisor import LibvirtHypervisor
from vmimagemanager.images import BootSpec
from vmimagemanager.states import LeaseState

ME = pwd.getpwuid(os.getuid()).pw_name
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeHostKeyPrintedOnTheConsoleAtBoot0000000"
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def free_block(size: int) -> int:
    """The first port of `size` consecutive ports free on loopback now (for ssh_ports)."""
    for _ in range(200):
        base = free_port()
        if base + size <= 65535 and all(ports.is_free(LOOPBACK, base + i) for i in range(size)):
            return base
    raise AssertionError("no block of free ports")


def squat(port: int, address: str = LOOPBACK) -> socket.socket:
    """What any local account can do: listen on the port before QEMU does."""
    sock = socket.socket()
    sock.bind((address, port))
    sock.listen()
    return sock


class QemuForward(LibvirtHypervisor):
    """The test driver plus QEMU's hostfwd: the start binds the forward's port (as slirp does:
    SO_REUSEADDR, listen) and holds it while the domain runs; a taken port fails the start with
    what libvirt reports of QEMU. `before_start(port)` runs first: a squatter that wins the race
    between the probe and QEMU's bind."""

    def __init__(self) -> None:
        super().__init__(testdriver.URI)
        self.held: dict[str, socket.socket] = {}
        self.starts: list[int] = []
        self.before_start = None

    def start(self, domain_xml: str) -> None:
        name = ElementTree.fromstring(domain_xml).findtext("name")
        port = forwarded_port(domain_xml)
        self.starts.append(port)
        if self.before_start is not None:
            self.before_start(port)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
            sock.listen()
        except OSError:
            sock.close()
            rule = f"tcp:{LOOPBACK}:{port}-:22"
            raise BootError(f"libvirt refused to start the domain: internal error: qemu "
                            f"unexpectedly closed the monitor: qemu-system-x86_64: -netdev "
                            f"user,id=vmimnet0,restrict=on,hostfwd={rule}: Could not set up "
                            f"host forwarding rule '{rule}'") from None
        super().start(domain_xml)
        self.held[name] = sock

    def destroy(self, name: str) -> bool:
        sock = self.held.pop(name, None)
        if sock is not None:
            sock.close()
        return super().destroy(name)


@pytest.fixture
def node(tmp_path, monkeypatch):
    """A Node with two user-network slots (configured first ports P1, P2), a small
    ssh_ports range, one image, and the guest's console and sshd stood in for."""
    from vmimagemanager.images import ImageStore
    from vmimagemanager.node import Node, coldboot
    from vmimagemanager.node.state import ensure_admin_key, ensure_state_dirs

    low = free_block(8)
    first = [free_port(), free_port()]
    while first[0] == first[1] or any(low <= p < low + 8 for p in first):
        first = [free_port(), free_port()]
    cfg = testdriver.node_config(
        tmp_path, slots=[{"name": f"s{i}", "network": {"type": "user", "ssh_port": port}}
                         for i, port in enumerate(first, 1)],
        max_boot_attempts=1,  # a counted failed boot would hold the job at once
        ssh_ports=f"{low}-{low + 7}", vos={"mine": {"image": "img", "users": [ME]}})
    disk = tmp_path / "img.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    ImageStore(cfg.image_dir).import_image("img", disk)
    ensure_admin_key(cfg)
    logins = []

    class Session:
        def close(self) -> None:
            pass

    def wait_for_ssh(endpoint, deadline, console, running, keep_in=None):
        logins.append(endpoint)
        return Session()

    monkeypatch.setattr(coldboot, "wait_for_host_key", lambda *args, **kwargs: HOST_KEY)
    monkeypatch.setattr(coldboot, "wait_for_ssh", wait_for_ssh)
    hv = testdriver.clean(QemuForward())
    ensure_state_dirs(cfg)
    life = Node(cfg, hv)
    yield life, cfg, hv, logins
    testdriver.clean(hv)


def _job(job_id: str):
    from vmimagemanager.jobs import Job

    return Job(job_id=job_id, task_id="0", owner=ME, queue="vm.q")


def _counted_boot_failures(cfg) -> list:
    with sqlite3.connect(cfg.leases_db) as db:
        return db.execute("SELECT * FROM boot_failures").fetchall()


# -- the choice ---------------------------------------------------------------------------------
@pytest.mark.parametrize("address", [LOOPBACK, "0.0.0.0"])
def test_a_port_another_socket_listens_on_is_never_chosen(address):
    taken = free_port()
    low = free_block(4)
    with squat(taken, address):
        assert not ports.is_free(LOOPBACK, taken)
        chosen = {ports.choose(LOOPBACK, taken, (low, low + 3)) for _ in range(20)}
    assert taken not in chosen and chosen <= set(range(low, low + 4))


def test_the_configured_port_is_the_first_tried_when_free():
    first = free_port()
    assert ports.choose(LOOPBACK, first, (20000, 29999)) == first


def test_when_every_candidate_is_taken_the_job_is_retried_later():
    low = free_block(3)
    first = free_port()
    squatters = [squat(p) for p in (first, low, low + 1, low + 2)]
    try:
        with pytest.raises(NoFreePort) as info:
            ports.choose(LOOPBACK, first, (low, low + 2))
    finally:
        for sock in squatters:
            sock.close()
    assert isinstance(info.value, RetryLater)  # flow: RETRY, never a hold
    assert f"ssh_ports {low}-{low + 2}" in str(info.value)


# -- the boot -----------------------------------------------------------------------------------
def test_a_vm_gets_a_port_free_at_boot_that_libvirt_the_context_and_logins_all_carry(node):
    """s1's configured port is squatted: its VM gets another one, noted in the domain's lease
    metadata, and everything that logs in uses it; s2's (free) configured port is used as
    before."""
    from vmimagemanager.node import JobRequest

    life, cfg, hv, logins = node
    s1, s2 = cfg.slots
    with squat(s1.network.ssh_port):
        started = life.start_vm(JobRequest("301", "0", ME, "img", "mine"), slots=["s1"])
        ctx = started.context
        assert life.leases.get("s1").state is LeaseState.RUNNING
        port = ctx.port
        assert port != s1.network.ssh_port
        assert hv.starts == [port]  # never even tried the squatted one
        assert ctx.host == LOOPBACK
        assert read_context(cfg.run_dir, "301.0").port == port  # what the starter reads
        assert forwarded_port(hv.domain_xml(s1.domain_name)) == port  # libvirt's record
        assert lease_metadata(hv.domain_xml(s1.domain_name))[SSH_PORT_KEY] == str(port)
        assert life.ssh_address(s1) == (LOOPBACK, port)  # _guest_poweroff, exec, bind
        assert (logins[-1].host, logins[-1].port) == (LOOPBACK, port)  # the boot's own login
        assert not ports.is_free(LOOPBACK, port)  # QEMU (here: its stand-in) holds it
        started = life.start_vm(JobRequest("302", "0", ME, "img", "mine"), slots=["s2"])
        ctx2 = started.context
        assert ctx2.port == s2.network.ssh_port  # an old configuration works as it did
        rows = {row["slot"]: row["ssh"] for row in life.status()}
        assert rows == {"s1": f"{LOOPBACK}:{port}", "s2": f"{LOOPBACK}:{ctx2.port}"}
    life.end_vm("s1")
    life.end_vm("s2")
    assert {row["ssh"] for row in life.status()} == {""}  # no VM, no port


def test_a_start_whose_port_is_taken_in_between_is_retried_on_another_and_not_counted(node):
    """The port was free when chosen, but another process bound it before QEMU could: the
    start fails with QEMU's 'Could not set up host forwarding rule', the VM is started on
    another port, the job runs, and no failed boot is counted (max_boot_attempts is 1 here:
    one counted failure would have held the job)."""
    from vmimagemanager.decision import Outcome
    from vmimagemanager.flow import start_job

    life, cfg, hv, _logins = node
    squatters = []

    def race(port: int) -> None:
        if not squatters:  # the first start only
            squatters.append(squat(port))

    hv.before_start = race
    try:
        decision = start_job(cfg, _job("303"), make_life=lambda _cfg: life)
        assert decision.outcome is Outcome.READY, decision.reason
        first, second = hv.starts
        assert first == cfg.slots[0].network.ssh_port and second != first
        assert read_context(cfg.run_dir, "303.0").port == second
        assert life.ssh_address(cfg.slots[0]) == (LOOPBACK, second)
        assert _counted_boot_failures(cfg) == []
    finally:
        for sock in squatters:
            sock.close()


def test_a_vm_whose_every_start_loses_its_port_goes_back_to_the_queue_never_held(node):
    """A squatter that wins every race: after ports.START_ATTEMPTS starts the job is retried
    later (RETRY, not counted), the slot is free again and nothing is left behind."""
    from vmimagemanager.decision import Outcome
    from vmimagemanager.flow import start_job

    life, cfg, hv, _logins = node
    squatters: list[socket.socket] = []
    hv.before_start = lambda port: squatters.append(squat(port))
    try:
        for _ in range(2):  # max_boot_attempts is 1: a counted failure would hold it
            decision = start_job(cfg, _job("304"), make_life=lambda _cfg: life)
            assert decision.outcome is Outcome.RETRY, decision.reason
            assert decision.facts["cause"] == "no_free_port"
            assert "lost the race for 5 ports" in decision.reason
            while squatters:  # the squatter lets go; the next attempt finds them free again
                squatters.pop().close()
    finally:
        for sock in squatters:
            sock.close()
    assert len(hv.starts) == 2 * ports.START_ATTEMPTS
    assert len(set(hv.starts[:ports.START_ATTEMPTS])) == ports.START_ATTEMPTS  # each another
    assert _counted_boot_failures(cfg) == []
    assert life.leases.all() == [] and hv.domain_names() == []


def test_another_start_failure_is_still_a_failed_boot(node):
    """Only a lost port is retried: a start that fails otherwise (its port free) is reported."""
    from vmimagemanager.node import JobRequest

    life, _cfg, hv, _logins = node

    def refuse(_port: int) -> None:
        raise BootError("libvirt refused to start the domain: no such kernel")

    hv.before_start = refuse
    with pytest.raises(BootError, match="no such kernel"):
        life.start_vm(JobRequest("305", "0", ME, "img", "mine"), slots=["s1"])
    assert len(hv.starts) == 1


def test_a_spares_rewritten_lease_metadata_keeps_its_port(node):
    """A spare's lease element is replaced right after its start (and again at bind): the
    forward's port must stay in it, or nothing could log in to the VM any more."""
    from vmimagemanager.node import JobRequest
    from vmimagemanager.node.spares import IMAGE_KEY, _into_background

    life, cfg, hv, _logins = node
    started = life.start_vm(JobRequest("306", "0", ME, "img", "mine"), slots=["s1"])
    ctx = started.context
    slot = cfg.slots[0]
    _into_background(life, slot, "306.0", life.images.get("img"))
    meta = lease_metadata(hv.domain_xml(slot.domain_name))
    assert IMAGE_KEY in meta and meta[SSH_PORT_KEY] == str(ctx.port)
    assert life.ssh_address(slot) == (LOOPBACK, ctx.port)


# -- reading it back ----------------------------------------------------------------------------
def test_the_port_of_a_domain_started_before_it_was_noted_comes_from_its_hostfwd(tmp_path):
    """A VM started by an earlier version (no ssh_port in its metadata) still has its port
    read from libvirt: the hostfwd rule QEMU was started with."""
    from pathlib import Path

    from vmimagemanager.config import Slot, UserNetwork
    from vmimagemanager.shape import Shape

    spec = DomainSpec(slot=Slot("s1", 1, 256, UserNetwork(2201)), shape=Shape(1, 256),
                      domain_type="qemu",
                      overlay=Path("/o"), seed=None, console_log=Path("/c"), boot=BootSpec(),
                      job_label="1.0", image="img", owner=ME, ssh_port=24242)
    xml = build_domain_xml(spec)
    assert forwarded_port(xml) == 24242
    old = xml.replace(f' {SSH_PORT_KEY}="24242"', "")
    assert SSH_PORT_KEY not in lease_metadata(old) and forwarded_port(old) == 24242
    assert forwarded_port("<domain><name>x</name></domain>") is None


def test_a_bridged_slot_keeps_its_host_name_and_port_without_a_forward(tmp_path):
    from vmimagemanager.node import Node
    from vmimagemanager.node.state import ensure_state_dirs

    cfg = testdriver.node_config(tmp_path, slots=[
        {"name": "b1", "network": {"type": "bridge", "bridge": "br0", "mac": "52:54:00:00:00:01",
                                   "hostname": "wn01-vm1.example.org"}}])
    ensure_state_dirs(cfg)
    life = Node(cfg, testdriver.hypervisor())
    assert life.ssh_address(cfg.slots[0]) == ("wn01-vm1.example.org", 22)
