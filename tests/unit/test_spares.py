"""Warm spares without a VM: their configuration, the lease store's spare states and races,
waiting for a spare that boots, a spare's kept login, and the bind's shares. On real VMs and the
real cell: tests/cell/test_spares.py.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from vmimagemanager.config import ConfigError, parse_config
from vmimagemanager.leases import DEFAULT_SHAPE, SPARE_JOB_ID, LeaseStore
from vmimagemanager.shape import Shape
from vmimagemanager.states import LeaseState


# -- configuration and lease store (no VM) -----------------------------------------------------
def _config(tmp_path: Path, spares) -> dict:
    return {"image_dir": str(tmp_path), "overlay_dir": str(tmp_path),
            "state_dir": str(tmp_path), "run_dir": str(tmp_path),
            "slots": [{"name": f"s{i}", "network": {"type": "user", "ssh_port": 40000 + i}}
                      for i in range(3)],
            "vos": {"atlas": {"image": "atlas-wn", "groups": ["atlas"]},
                    "cms": {"image": "cms-wn", "groups": ["cms"]}},
            "spares": spares}


def test_spares_config_counts_by_image(tmp_path):
    cfg = parse_config(_config(tmp_path, {"vos": {"atlas": 1}, "images": {"atlas-wn": 1,
                                                                          "other": 0},
                                          "max_age": 600}), "c.yaml")
    one = Shape(1, 512)  # a VO's default shape: one core, the default memory per core
    assert cfg.spares.counts == (("atlas-wn", one, 2),)
    assert cfg.spares.count("atlas-wn", one) == 2 and cfg.spares.count("cms-wn", one) == 0
    assert cfg.spares.count("atlas-wn", Shape(2, 1024)) == 0
    assert cfg.spares.max_age == 600.0
    assert parse_config(_config(tmp_path, None), "c.yaml").spares.counts == ()


@pytest.mark.parametrize("spares, says", [
    ({"vos": {"lhcb": 1}}, "spares.vos.lhcb: unknown key"),
    ({"vos": {"atlas": 2}, "images": {"cms-wn": 2}}, "at most as many spares as VM places (3)"),
    ({"vos": {"atlas": -1}}, "a number of spares >= 0"),
    ({"images": {"../x": 1}}, "an image name"),
    ({"max_age": 0}, "seconds > 0"),
])
def test_spares_config_errors_say_what_to_fix(tmp_path, spares, says):
    with pytest.raises(ConfigError, match="c.yaml: " + ".*" + says.replace("(", r"\(")
                       .replace(")", r"\)")):
        parse_config(_config(tmp_path, spares), "c.yaml")


def _spare(store: LeaseStore, slot: str, image: str) -> None:
    store.allocate([slot], SPARE_JOB_ID, f"x{slot}", "", image)
    store.transition(slot, LeaseState.BOOTING)
    store.transition(slot, LeaseState.SPARE)


def test_a_spare_goes_to_exactly_one_of_racing_jobs(tmp_path):
    store = LeaseStore(tmp_path / "l.sqlite")
    _spare(store, "s1", "atlas")
    _spare(store, "s2", "cms")
    results = []

    def claim(job: str) -> None:
        results.append(LeaseStore(tmp_path / "l.sqlite").claim_spare("atlas", job, "0",
                                                                     "atlas001", "atlas"))

    threads = [threading.Thread(target=claim, args=(str(100 + i),)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [r for r in results if r is not None]
    assert len(won) == 1
    spare, lease = won[0]
    assert spare.is_spare and spare.slot == "s1" and spare.state is LeaseState.SPARE
    assert lease.state is LeaseState.BINDING and lease.owner == "atlas001" and not lease.is_spare
    # the cms spare is not the atlas job's; a job that holds a lease claims nothing more
    assert store.claim_spare("atlas", "200", "0", "atlas001", "atlas") is None
    assert store.claim_spare("cms", lease.job_id, "0", "atlas001", "atlas") is None
    # retiring takes only idle spares, and never one of the image the caller needs
    assert store.retire_spare(keep=("cms", DEFAULT_SHAPE)) is None
    assert store.retire_spare(slot="s1") is None  # bound: a job's now
    assert store.retire_spare(keep=("atlas", DEFAULT_SHAPE)).slot == "s2"


def test_spare_states_follow_the_table(tmp_path):
    store = LeaseStore(tmp_path / "l.sqlite")
    store.allocate(["s1"], SPARE_JOB_ID, "a", "", "atlas")
    from vmimagemanager.errors import LeaseError

    with pytest.raises(LeaseError, match="cannot go from preparing to spare"):
        store.transition("s1", LeaseState.SPARE)
    store.transition("s1", LeaseState.BOOTING)
    store.transition("s1", LeaseState.SPARE)
    with pytest.raises(LeaseError, match="cannot go from spare to running"):
        store.transition("s1", LeaseState.RUNNING)  # only through binding


def test_a_job_waits_for_the_spare_of_its_image_that_is_booting(test_life):
    """Under a burst a job must not boot a second VM beside the spare the agent is booting for
    its image: it takes that spare once it is ready. It stops waiting (and boots its own) as
    soon as no spare of its image is booting: the agent died, or the boot failed."""
    import subprocess

    from vmimagemanager.node import JobRequest
    from vmimagemanager.node.spares import _wait_for_booting_spare

    life, cfg = test_life
    agent = subprocess.Popen(["sleep", "60"])  # the agent process booting the spares
    try:
        for slot, image in (("s1", "atlas"), ("s2", "cms")):
            life.leases.allocate([slot], SPARE_JOB_ID, f"x{slot}", "", image)
            life.leases.transition(slot, LeaseState.BOOTING, f"{SPARE_JOB_ID}.x{slot}")
            life.leases.hand_over(slot, f"{SPARE_JOB_ID}.x{slot}", agent.pid)
        request = JobRequest("300", "0", "atlas001", "atlas", "atlas")
        threading.Timer(0.6, lambda: LeaseStore(cfg.leases_db).transition(
            "s1", LeaseState.SPARE, f"{SPARE_JOB_ID}.xs1")).start()
        started = time.monotonic()
        spare, lease = _wait_for_booting_spare(life, request)
        assert time.monotonic() - started >= 0.5
        assert (spare.slot, lease.job_label, str(lease.state)) == ("s1", "300.0", "binding")
        assert life.phase.seconds["wait for a booting spare"] >= 0.5  # history shows the wait
        life.phase.seconds.clear()
        # nothing of atlas is booting any more: the next atlas job does not wait for cms's
        started = time.monotonic()
        assert _wait_for_booting_spare(life, JobRequest("301", "0", "atlas001", "atlas",
                                                        "atlas")) is None
        assert time.monotonic() - started < 0.5
        assert "wait for a booting spare" not in life.phase.seconds
        agent.kill()
        agent.wait()
        # the agent died while booting: a cms job does not wait for its spare
        started = time.monotonic()
        assert _wait_for_booting_spare(life, JobRequest("302", "0", "cms001", "cms",
                                                        "cms")) is None
        assert time.monotonic() - started < 0.5
    finally:
        agent.kill()
        agent.wait()


def test_a_job_waits_for_a_slot_being_torn_down_before_it_retires_another_images_spare(
        test_life):
    """A slot whose VM is being destroyed is free in a second or two; retiring an idle spare of
    another image throws its boot away. The job waits for the teardown and the spare stays."""
    import subprocess

    from vmimagemanager.node import JobRequest

    life, cfg = test_life
    lease, _ = life.leases.allocate(["s1"], "50", "0", "atlas001", "atlas")
    life.leases.transition("s1", LeaseState.TEARING_DOWN, lease.job_label)
    teardown = subprocess.Popen(["sleep", "60"])
    try:
        life.leases.hand_over("s1", lease.job_label, teardown.pid)
        _spare(life.leases, "s2", "atlas")
        life.hv.start("<domain type='test'><name>vmim-s2</name><memory>65536</memory>"
                      "<os><type>hvm</type></os></domain>")  # the spare's VM runs
        threading.Timer(0.5, lambda: LeaseStore(cfg.leases_db).transition(
            "s1", LeaseState.FREE, lease.job_label)).start()
        request = JobRequest("51", "0", "cms001", "cms", "cms")
        got, created = life._allocate(["s1", "s2"], request, life.shape_of(request))
    finally:
        teardown.kill()
        teardown.wait()
    assert created and got.slot == "s1"
    assert str(life.leases.get("s2").state) == "spare"


def test_a_spares_kept_login_goes_with_its_lease_or_as_an_orphan(test_life):
    """The agent's kept root login (its directory among the job contexts) lives as long as the
    spare's lease: its teardown removes it, and reconcile removes one no lease holds."""
    from vmimagemanager.context import context_dir, ensure_jobs_dir

    life, cfg = test_life
    lease, _ = life.leases.allocate(["s1"], SPARE_JOB_ID, "k1", "", "atlas")  # booting here
    kept = context_dir(cfg.run_dir, lease.job_label)  # spares.kept_login, whatever its length
    ensure_jobs_dir(cfg.run_dir)
    kept.mkdir(mode=0o700)
    (kept / "known_hosts").write_text("vmim-guest ssh-ed25519 AAAA\n")
    assert life.reconcile() == [] and kept.is_dir()  # its lease lives: kept
    life.abandon("s1", lease.job_label)
    assert not kept.exists()
    orphan = context_dir(cfg.run_dir, f"{SPARE_JOB_ID}.k2")
    orphan.mkdir(mode=0o700)
    assert life.reconcile() == [f"remove orphan job context {orphan}"]
    assert not orphan.exists()
    # A job claimed a spare: its lease has the job's label, and its bind still uses the login
    # kept in the spare's directory, which the agent's reconcile leaves alone until it is done.
    _spare(life.leases, "s2", "atlas")
    (spare,) = [x for x in life.leases.all() if x.is_spare]
    kept = context_dir(cfg.run_dir, spare.job_label)
    kept.mkdir(mode=0o700)
    _, bound = life.leases.claim_spare("atlas", "77", "0", "atlas001", "atlas")
    assert str(bound.state) == "binding" and bound.job_label == "77.0"
    assert life.reconcile() == [] and kept.is_dir()
    life.leases.transition("s2", LeaseState.RUNNING, "77.0")
    assert f"remove orphan job context {kept}" in life.reconcile()  # one the bind left
    assert not kept.exists()


def test_no_kept_login_where_its_socket_path_would_be_too_long(tmp_path):
    """A unix socket's path has 108 bytes, and ssh adds a suffix while it makes it: beyond
    that the bind logs in itself rather than the spare's boot failing."""
    import shutil
    import tempfile
    from dataclasses import replace

    from vmimagemanager.node.spares import kept_login

    cfg = parse_config(_config(tmp_path, {"vos": {"atlas": 1}}), "c.yaml")
    short = Path(tempfile.mkdtemp(prefix="k", dir="/tmp"))
    try:
        label = "vmim-spare.0123456789ab"
        assert kept_login(replace(cfg, run_dir=short), label) == short / "jobs" / label
        assert kept_login(replace(cfg, run_dir=short / ("r" * 50)), label) is None
    finally:
        shutil.rmtree(short)
