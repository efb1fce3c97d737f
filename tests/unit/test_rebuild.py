"""Rebuild instead of wait: a leases database that cannot be used is kept aside and rebuilt from
the domains libvirt runs (node/rebuild.py), on libvirt's test driver."""

from __future__ import annotations

import multiprocessing

import pytest

from tests.support import testdriver
from vmimagemanager.domain_meta import VMIM_NS
from vmimagemanager.errors import HypervisorUnavailable
from vmimagemanager.hypervisor import LibvirtHypervisor
from vmimagemanager.leases import LeaseStore
from vmimagemanager.node import open_node
from vmimagemanager.node.rebuild import open_leases, rebuild_leases
from vmimagemanager.shape import Shape
from vmimagemanager.states import LeaseState


def domain(slot: str, job: str, vcpus: int = 2, mib: int = 1024) -> str:
    return (f"<domain type='test'><name>vmim-{slot}</name><vcpu>{vcpus}</vcpu>"
            f"<memory unit='MiB'>{mib}</memory><os><type>hvm</type></os><metadata>"
            f"<vmim:lease xmlns:vmim='{VMIM_NS}' job='{job}' image='atlas' owner='atlas001' "
            f"slot='{slot}'/></metadata></domain>")


@pytest.fixture
def node(tmp_path):
    cfg = testdriver.node_config(tmp_path, slots=3, node={"cores": 8, "memory_mib": 8192})
    life = open_node(cfg)
    life.hv.start(domain("s1", "7.0"))
    life.hv.start(domain("s2", "vmim-spare.ab12", 1, 256))
    life.hv.start(domain("s9", "8.0"))  # a slot this node does not configure: not adopted
    yield life
    for name in ("vmim-s1", "vmim-s2", "vmim-s9"):
        if life.hv.is_running(name):
            life.hv.destroy(name)


def test_a_broken_database_is_kept_aside_and_rebuilt_from_the_running_domains(node):
    cfg = node.cfg
    node.leases.close()
    cfg.leases_db.write_bytes(b"this is not an SQLite database\n" * 100)
    rebuilt = open_node(cfg)  # what the next hook does: no admin command
    leases = {lease.slot: lease for lease in rebuilt.leases.all()}
    assert sorted(leases) == ["s1", "s2"]
    assert (leases["s1"].job_label, leases["s1"].state, leases["s1"].shape) == (
        "7.0", LeaseState.RUNNING, Shape(2, 1024))
    assert leases["s2"].state is LeaseState.SPARE and leases["s2"].shape == Shape(1, 256)
    (kept,) = cfg.state_dir.glob("leases.broken-*")
    assert (kept / "leases.sqlite").read_bytes().startswith(b"this is not an SQLite")
    assert kept.stat().st_mode & 0o077 == 0
    # the rebuilt database is used as it is from now on: nothing is rebuilt a second time
    open_node(cfg)
    assert len(list(cfg.state_dir.glob("leases.broken-*"))) == 1
    # what the trail says
    history = (cfg.state_dir / "audit.jsonl").read_text()
    assert "rebuilt the leases database from libvirt" in history
    assert "adopted domain vmim-s1: job 7.0, running, 2 cores and 1024 MiB" in history
    # and reconcile leaves the adopted VMs alone, and s9's too: it is in no slot of this
    # configuration (another's on the same libvirtd, as far as this node can tell)
    assert [a for a in rebuilt.reconcile() if "destroy" in a] == []
    assert "vmim-s9" in rebuilt.hv.domain_names()


def test_without_libvirt_nothing_is_moved_and_the_job_is_retried(node, tmp_path):
    cfg = node.cfg
    node.leases.close()
    cfg.leases_db.write_bytes(b"garbage" * 100)
    down = LibvirtHypervisor("test:///nonexistent/libvirt.xml")
    with pytest.raises(HypervisorUnavailable):
        open_leases(cfg, down)
    assert cfg.leases_db.read_bytes().startswith(b"garbage")
    assert not list(cfg.state_dir.glob("leases.broken-*"))


def _open(path: str, done) -> None:
    from vmimagemanager.config import load_config

    cfg = load_config(path)
    life = open_node(cfg)
    done.put(sorted(lease.slot for lease in life.leases.all()))


def test_processes_that_find_it_broken_at_once_rebuild_it_once(node, tmp_path):
    import yaml

    cfg = node.cfg
    node.leases.close()
    cfg.leases_db.write_bytes(b"garbage" * 100)
    path = tmp_path / "c2.yaml"
    path.write_text(yaml.safe_dump(testdriver.node_data(tmp_path, slots=3,
                                                        node={"cores": 8, "memory_mib": 8192})))
    ctx = multiprocessing.get_context("fork")
    done = ctx.Queue()
    procs = [ctx.Process(target=_open, args=(str(path), done)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    # each (forked: the test driver's domains with it) finds the same leases; one rebuilt
    assert [done.get(timeout=5) for _ in procs] == [["s1", "s2"]] * 4
    assert len(list(cfg.state_dir.glob("leases.broken-*"))) == 1


def test_reconcile_rebuild_rebuilds_a_readable_database_too(node):
    cfg = node.cfg
    node.leases.allocate(["s3"], "5", "0", "cms001", "cms")  # a lease no domain explains
    store = rebuild_leases(cfg, node.hv, None, "asked", force=True)
    assert sorted(lease.slot for lease in store.all()) == ["s1", "s2"]
    (kept,) = cfg.state_dir.glob("leases.broken-*")
    assert [lease.slot for lease in LeaseStore(kept / "leases.sqlite").all()] == ["s3"]
