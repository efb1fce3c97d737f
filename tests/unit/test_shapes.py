"""Job-shaped VMs: the node's budget in the configuration, what a job is granted, and the lease
store never holding more cores or memory than the budget (docs/job-shapes.md)."""

from __future__ import annotations

import multiprocessing
import sqlite3
from pathlib import Path

import pytest

from tests.support import testdriver
from vmimagemanager.batch.sge_accounting import record_fields
from vmimagemanager.batch.sge_spool import granted_shape, memory_mib, read_spool_file
from vmimagemanager.config import parse_config
from vmimagemanager.context import JobContext
from vmimagemanager.errors import ConfigError, JobTooBig, NoFreeSlot, VmimError
from vmimagemanager.hypervisor import LibvirtHypervisor
from vmimagemanager.jobs import Job
from vmimagemanager.leases import SPARE_JOB_ID, LeaseStore
from vmimagemanager.node import JobRequest, Node
from vmimagemanager.runner import out_of_memory_line
from vmimagemanager.shape import Budget, Shape
from vmimagemanager.states import LeaseState

PLACES = [f"p{i}" for i in range(1, 7)]
FOUR = Budget(cores=4, memory_mib=4096, vm_overhead_mib=128)


def _cfg(tmp_path: Path, **settings):
    data = testdriver.node_data(tmp_path, slots=settings.pop("slots", 6), **settings)
    data.setdefault("vos", {"atlas": {"image": "atlas", "groups": ["atlas"],
                                      "memory_per_core_mib": 2000},
                            "cms": {"image": "cms", "groups": ["cms"]}})
    return parse_config(data, "c.yaml")


# -- the configuration ---------------------------------------------------------------------------
def test_a_node_section_gives_the_budget_and_the_defaults(tmp_path):
    cfg = _cfg(tmp_path, node={"cores": 8, "memory_mib": 20000, "vm_overhead_mib": 200},
               job_defaults={"memory_per_core_mib": 1000})
    assert cfg.budget == Budget(cores=8, memory_mib=20000, vm_overhead_mib=200)
    assert cfg.job_shape("atlas", 8, None) == Shape(8, 16000)  # the VO's 2000 MiB per core
    assert cfg.job_shape("cms", 2, None) == Shape(2, 2000)  # the node's default per core
    assert cfg.job_shape("cms", 2, 700) == Shape(2, 700)  # what the job was granted
    assert cfg.job_shape("cms", 1, 10) == Shape(1, 128)  # never below a bootable VM


@pytest.mark.parametrize("domain_type, overhead", [("kvm", 256), ("qemu", 384)])
def test_qemus_overhead_is_the_accelerators_unless_given(tmp_path, domain_type, overhead):
    """TCG's translation buffer makes QEMU's own memory larger than under KVM
    (docs/performance.md): `auto`, the default, counts the one the domains run with."""
    cfg = _cfg(tmp_path, node={"cores": 2, "memory_mib": 4096}, domain_type=domain_type)
    assert cfg.budget.vm_overhead_mib == overhead
    cfg = _cfg(tmp_path, node={"cores": 2, "memory_mib": 4096, "vm_overhead_mib": "auto"},
               domain_type=domain_type)
    assert cfg.budget.vm_overhead_mib == overhead


def test_auto_takes_the_hosts_cores_and_memory_less_the_reserve(tmp_path):
    import os

    cfg = _cfg(tmp_path, node={"host_reserve_mib": 1024})
    with open("/proc/meminfo") as fh:
        total = int(fh.readline().split()[1]) // 1024
    assert cfg.budget.cores == os.cpu_count()
    assert cfg.budget.memory_mib == total - 1024


def test_a_configuration_of_fixed_slots_keeps_its_size(tmp_path):
    """Today's one-core set-up, unchanged: the budget is what its slots add up to, and a job
    that asks for nothing gets the slots' size."""
    cfg = _cfg(tmp_path, slot_defaults={"vcpus": 1, "memory_mib": 256})
    assert cfg.budget == Budget(cores=6, memory_mib=6 * 256, vm_overhead_mib=0)
    assert cfg.job_shape("cms", 1, None) == Shape(1, 256)


@pytest.mark.parametrize("settings, says", [
    ({"node": {"cores": 0}}, "node.cores: expected a number of cores >= 1, or auto"),
    ({"node": {"memory_mib": 100}}, "node.memory_mib: expected MiB for all VMs together"),
    ({"node": {"colour": 1}}, "node.colour: unknown key"),
    ({"node": {"host_reserve_mib": 1 << 30}}, "node.host_reserve_mib: expected less than"),
    ({"node": {"cores": 4}, "slot_defaults": {"vcpus": 1}},
     "slot_defaults: with node: a VM's size is its job's"),
    ({"node": {"cores": 4}, "slots": [{"name": "a", "vcpus": 2, "network": {"type": "user"}}]},
     "slots[0]: with node: a slot is a place for a VM, sized by its job"),
    ({"job_defaults": {"memory_per_core_mib": 10}}, "job_defaults.memory_per_core_mib"),
    ({"node": {"cores": 2, "memory_mib": 8192},
      "spares": {"vos": {"atlas": [{"cores": 4, "count": 1}]}}},
     "spares.vos.atlas: expected spares that fit the node's budget"),
    ({"node": {"cores": 4, "memory_mib": 8192},
      "spares": {"vos": {"atlas": [{"cores": 2, "memory_mib": 1024, "count": 3}]}}},
     "spares: expected spares that fit the node's budget together"),
])
def test_budget_errors_say_what_to_fix(tmp_path, settings, says):
    with pytest.raises(ConfigError) as caught:
        _cfg(tmp_path, **settings)
    assert str(caught.value).startswith("c.yaml: ") and says in str(caught.value)


def test_spares_are_configured_by_shape(tmp_path):
    cfg = _cfg(tmp_path, node={"cores": 16, "memory_mib": 32768},
               spares={"vos": {"atlas": [{"cores": 8, "memory_mib": 16384, "count": 1},
                                         {"cores": 1, "count": 2}],
                               "cms": 1}})
    assert cfg.spares.counts == (("atlas", Shape(1, 2000), 2), ("atlas", Shape(8, 16384), 1),
                                 ("cms", Shape(1, 512), 1))


# -- the lease store -----------------------------------------------------------------------------
def test_no_allocation_exceeds_the_cores_or_the_memory(tmp_path):
    store = LeaseStore(tmp_path / "l.sqlite")
    two = Shape(2, 1024)
    for job in ("1", "2"):
        store.allocate(PLACES, job, "0", "atlas001", "atlas", shape=two, budget=FOUR)
    with pytest.raises(NoFreeSlot, match="free: 0 of 4 cores"):
        store.allocate(PLACES, "3", "0", "atlas001", "atlas", shape=two, budget=FOUR)
    store.allocate(PLACES, "4", "0", "atlas001", "atlas", shape=Shape(1, 64),
                   budget=Budget(5, 4096, 128))  # a fifth core, memory left: fits
    with pytest.raises(NoFreeSlot, match="free: .* of 4096 MiB"):
        store.allocate(PLACES, "5", "0", "atlas001", "atlas", shape=Shape(1, 2000),
                       budget=Budget(8, 4096, 128))  # cores enough, memory not
    assert [(lease.vcpus, lease.memory_mib) for lease in store.all()] == [
        (2, 1024), (2, 1024), (1, 64)]


def _race(db: str, job: int, start, results) -> None:
    store = LeaseStore(Path(db))
    start.wait()
    try:
        lease, _ = store.allocate(PLACES, str(job), "0", "atlas001", "atlas",
                                  shape=Shape(2, 1024), budget=FOUR)
        results.put(("ok", lease.slot))
    except NoFreeSlot as exc:
        results.put(("full", str(exc)))


def test_racing_processes_never_hold_more_than_the_budget(tmp_path):
    db = str(tmp_path / "l.sqlite")
    LeaseStore(Path(db)).close()
    ctx = multiprocessing.get_context("fork")
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(db, n, start, results)) for n in range(12)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(30)
    got = [results.get(timeout=5) for _ in procs]
    assert sorted(kind for kind, _ in got) == ["full"] * 10 + ["ok"] * 2
    assert sum(lease.vcpus for lease in LeaseStore(Path(db)).all()) == 4


def test_an_earlier_versions_lease_holds_the_budget_until_reconcile_sizes_it(tmp_path):
    """A lease made before leases had a size: its VM's size is unknown, so it holds the whole
    budget (no new VM can be over-allocated beside it); reconcile reads the size from the
    running domain."""
    from vmimagemanager.domain_meta import VMIM_NS
    from vmimagemanager.shape import UNKNOWN

    cfg = _cfg(tmp_path, node={"cores": 4, "memory_mib": 8192})
    cfg.state_dir.mkdir(parents=True)
    with sqlite3.connect(cfg.leases_db) as conn:
        conn.execute("CREATE TABLE leases (slot TEXT PRIMARY KEY, job_id TEXT NOT NULL, "
                     "task_id TEXT NOT NULL, owner TEXT NOT NULL, image TEXT NOT NULL, "
                     "vo TEXT NOT NULL DEFAULT '', state TEXT NOT NULL, pid INTEGER NOT NULL, "
                     "created REAL NOT NULL, updated REAL NOT NULL, UNIQUE (job_id, task_id))")
        conn.execute("INSERT INTO leases VALUES ('s1','7','0','atlas001','atlas','atlas',"
                     "'running',1,0,0)")
    node = Node(cfg, LibvirtHypervisor(testdriver.URI), LeaseStore(cfg.leases_db))
    (lease,) = node.leases.all()
    assert lease.shape == UNKNOWN
    with pytest.raises(NoFreeSlot, match="free: 0 of 4 cores"):
        node.leases.allocate(["s2"], "8", "0", "cms001", "cms", shape=Shape(1, 256),
                             budget=cfg.budget)
    node.hv.start(f"<domain type='test'><name>vmim-s1</name><vcpu>2</vcpu>"
                  f"<memory unit='MiB'>1024</memory><os><type>hvm</type></os><metadata>"
                  f"<vmim:lease xmlns:vmim='{VMIM_NS}' job='7.0' image='atlas' owner='atlas001'"
                  f" slot='s1'/></metadata></domain>")
    try:
        actions = node.reconcile()
        assert any("sized lease 7.0 in slot s1: 2 cores and 1024 MiB" in a for a in actions)
        assert node.leases.get("s1").shape == Shape(2, 1024)
        node.leases.allocate(["s2"], "8", "0", "cms001", "cms", shape=Shape(1, 256),
                             budget=cfg.budget)
    finally:
        node.hv.destroy("vmim-s1")


def test_a_job_binds_only_a_spare_of_its_shape_and_others_are_retired_for_it(tmp_path):
    store = LeaseStore(tmp_path / "l.sqlite")
    for place, shape in (("p1", Shape(8, 16384)), ("p2", Shape(1, 2000))):
        store.allocate([place], SPARE_JOB_ID, place, "", "atlas", shape=shape)
        store.transition(place, LeaseState.BOOTING)
        store.transition(place, LeaseState.SPARE)
    assert store.claim_spare("atlas", "9", "0", "atlas001", "atlas", Shape(2, 4000)) is None
    spare, lease = store.claim_spare("atlas", "9", "0", "atlas001", "atlas", Shape(1, 2000))
    assert spare.slot == "p2" and lease.shape == Shape(1, 2000)
    # a 2-core job makes room: the 8-core spare is not its shape
    assert store.retire_spare(keep=("atlas", Shape(8, 16384))) is None
    assert store.retire_spare(keep=("atlas", Shape(2, 4000))).slot == "p1"


# -- the node ------------------------------------------------------------------------------------
def test_a_job_larger_than_the_node_is_refused_before_anything_is_leased(tmp_path):
    cfg = _cfg(tmp_path, node={"cores": 4, "memory_mib": 8192})
    node = Node(cfg, LibvirtHypervisor(testdriver.URI), LeaseStore(tmp_path / "l.sqlite"))
    with pytest.raises(JobTooBig, match="can never run on this node: it asks for 8 cores"):
        node.start_vm(JobRequest("77", "0", "atlas001", "atlas", "atlas", Shape(8, 1024)))
    with pytest.raises(JobTooBig, match="at most 4 cores and 8192 MiB"):
        node.start_vm(JobRequest("78", "0", "atlas001", "atlas", "atlas", Shape(1, 8192)))
    assert node.leases.all() == []


# -- what the batch system granted -----------------------------------------------------------------
@pytest.mark.parametrize("spool, shape", [
    ({}, (1, None)),
    # as execd spools them (gridengine 8.1.9): a serial job, h_vmem consumable with default 0
    # (gridengine itself then kills the job at its start): the smallest VM, never a default
    ({"pe": "none", "pe_slots": "1", "host_slots": "1", "h_vmem": "0"}, (1, 0)),
    ({"pe": "none", "pe_slots": "1", "host_slots": "1", "h_vmem": "300M"}, (1, 300)),
    ({"pe": "smp", "pe_slots": "2", "host_slots": "2", "h_vmem": "512M"}, (2, 1024)),
    ({"pe": "smp", "pe_slots": "4", "host_slots": "2", "h_vmem": "1G"}, (2, 2048)),
    ({"pe": "smp", "pe_slots": "2", "h_vmem": "3G", "h_vmem_is_consumable_job": "1"}, (2, 3072)),
    ({"pe": "smp", "pe_slots": "8", "h_vmem": "INFINITY"}, (8, None)),
    ({"pe": "NONE", "pe_slots": "8"}, (1, None)),
])
def test_sge_grants_the_slots_here_and_h_vmem_per_slot(spool, shape):
    assert granted_shape(spool) == shape


@pytest.mark.parametrize("text, mib", [
    ("512M", 512), ("536870912", 512), ("2G", 2048), ("1.5G", 1536), ("1g", 954),
    ("1000k", 1), ("", None), ("INFINITY", None),
    # as gridengine reads them (strtod; strtol with base 0 for a leading 0)
    ("1e9", 954), ("+2G", 2048), ("0x10000000", 256), ("0400M", 256), ("010G", 8192),
    ("0", 0),  # not "none asked": the smallest VM
])
def test_sge_memory_values(text, mib):
    assert memory_mib(text) == mib


@pytest.mark.parametrize("text", ["x", "-1G", "1e999", "9" * 400, "²", "1 G", "1GG"])
def test_an_sge_memory_value_that_is_not_one_holds_the_job(text):
    with pytest.raises(VmimError, match="h_vmem=.* in the job's spooled config"):
        memory_mib(text)


def test_a_spooled_config_with_a_shape_line_twice_holds_the_job(tmp_path):
    """A job argument with a line break adds lines to execd's config (job_argN is written as
    it is): which pe or h_vmem is execd's cannot be told. Other separators do not split."""
    config = tmp_path / "config"
    config.write_text("pe=none\npe_slots=1\nhost_slots=1\nh_vmem=300M\n"
                      "job_arg1=x\x1cpe=smp\x1chost_slots=8\u2028h_vmem=4G\n")
    assert granted_shape(read_spool_file(str(tmp_path))) == (1, 300)
    config.write_text(config.read_text() + "job_arg2=y\nhost_slots=8\nh_vmem=4G\n")
    with pytest.raises(VmimError, match="names h_vmem, host_slots more than once"):
        granted_shape(read_spool_file(str(tmp_path)))


def test_the_accounting_record_covers_the_vms_cores_and_wall_time():
    """A cold job's CPU time includes its VM's boot: its wall time does too, so that
    CPU <= wall x cores holds; slots is the job's cores."""
    job = Job(job_id="5", task_id="0", owner="root")
    config = {"pe": "smp", "pe_slots": "2", "host_slots": "2"}
    usage = {"start_time": "1000", "end_time": "1002", "ru_wallclock": "2"}
    vm = {"cpu_seconds": 11.0, "user_seconds": 9.0, "system_seconds": 2.0, "rss_kib": 1,
          "cores": 2.0, "wall_seconds": 7.5}
    fields = record_fields(job, "node", config, usage, vm)
    assert fields["slots"] == 2 and fields["granted_pe"] == "smp"
    assert float(fields["cpu"]) <= float(fields["ru_wallclock"]) * fields["slots"] * 1.05
    assert int(fields["start_time"]) <= 1002 - 7


def test_an_out_of_memory_job_is_told_its_size():
    line = out_of_memory_line(Job("5", "0", "atlas001"), JobContext(
        mode="vm", label="5.0", cores=2, memory_mib=1024))
    assert "job 5.0 ran out of its 1 GiB" in line and "2 core(s)" in line
    assert "h_vmem" in line and "--mem" in line


CAPPED = """
import sys
from tests.support import testdriver
from vmimagemanager.config import parse_config
from vmimagemanager.hypervisor import LibvirtHypervisor
from vmimagemanager.leases import LeaseStore
from vmimagemanager.node import JobRequest, Node
from vmimagemanager.shape import Shape
from pathlib import Path
base = Path(sys.argv[1])
cfg = parse_config(testdriver.node_data(base, slots=1, node={"cores": 4, "memory_mib": 8192},
                   shared_paths=[{"path": "/home", "mode": "hypervisor"}]), "c.yaml")
node = Node(cfg, LibvirtHypervisor(testdriver.URI), LeaseStore(base / "l.sqlite"))
print(node.shape_of(JobRequest("5", "0", "atlas001", "atlas", "atlas", Shape(2, 1024))))
"""


def test_a_vm_whose_file_server_inherits_a_limit_leaves_it_room(tmp_path):
    """A hook under an address-space limit it cannot lift (SGE's h_vmem; root without
    CAP_SYS_RESOURCE) gives the VM what leaves the owner's file server room within it."""
    import os
    import subprocess
    import sys

    from tests.support import REPO
    from vmimagemanager.homeserver import SERVER_OWN_MIB

    run = lambda *limit: subprocess.run(  # noqa: E731
        [*limit, sys.executable, "-c", CAPPED, str(tmp_path)], capture_output=True, text=True,
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    unlimited = run()
    assert unlimited.stdout.strip() == "2 cores and 1024 MiB", unlimited.stderr
    limited = run("prlimit", f"--as={1 << 30}", "--")
    assert limited.stdout.strip() == f"2 cores and {1024 - SERVER_OWN_MIB} MiB", limited.stderr


def test_idle_spares_are_retired_only_when_that_makes_room(tmp_path):
    """Jobs hold 2 of 4 cores and two 1-core spares are idle: a 4-core job cannot fit even
    without them, so both stay (a job retried again and again must not destroy the node's
    spares each time); a 2-core job retires one."""
    cfg = _cfg(tmp_path, node={"cores": 4, "memory_mib": 8192})
    node = Node(cfg, LibvirtHypervisor(testdriver.URI), LeaseStore(tmp_path / "l.sqlite"))
    node.leases.allocate(["s1"], "1", "0", "atlas001", "atlas", shape=Shape(2, 512))
    for place in ("s2", "s3"):
        node.leases.allocate([place], SPARE_JOB_ID, place, "", "atlas", shape=Shape(1, 256))
        node.leases.transition(place, LeaseState.BOOTING)
        node.leases.transition(place, LeaseState.SPARE)
    places = [s.name for s in cfg.slots]
    big = JobRequest("2", "0", "cms001", "cms", "cms", Shape(4, 512))
    assert not node._spares_make_room(places, big.shape, ("cms", big.shape))
    two = Shape(2, 512)
    assert node._spares_make_room(places, two, ("cms", two))
    assert node._spares_make_room(places, Shape(1, 256), ("cms", Shape(1, 256)))


def test_fixed_size_slots_without_defaults_give_a_job_the_smallest_slots_share(tmp_path):
    """An earlier version's slots of 2 vCPUs and 4 GiB each: a job that asks for nothing gets
    2 GiB a core (not the built-in 512 MiB), and the budget still holds one VM a slot."""
    slots = [{"name": f"s{i}", "vcpus": 2, "memory_mib": 4096,
              "network": {"type": "user", "ssh_port": 30000 + i}} for i in range(3)]
    cfg = _cfg(tmp_path, slots=slots)
    assert cfg.budget == Budget(cores=6, memory_mib=3 * 4096, vm_overhead_mib=0)
    assert cfg.job_shape("cms", 1, None) == Shape(1, 2048)
    assert cfg.job_shape("cms", 2, None) == Shape(2, 4096)
