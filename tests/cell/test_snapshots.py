"""Starts from memory snapshots on real parts (docs/snapshots.md): real libvirtd and QEMU, the
real gridengine cell, the agent as cron or systemd runs it.

A job that finds no snapshot of its image boots and asks the agent for one; the next jobs are
restored from it, each a machine of its own (host key, random output, machine-id, host name,
clock); a corrupt snapshot or a changed image never fails a job, it boots; spares are
restored from the snapshot. The save file's head, the restored XML and the renew script:
tests/unit/test_snapshots.py.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.support.sgecell import agent_once, close_vm_cell, open_vm_cell, virsh, wait_done
from vmimagemanager.audit import read_history, vm_starts
from vmimagemanager.config import load_config
from vmimagemanager.errors import GuestError
from vmimagemanager.guest import Endpoint, connect
from vmimagemanager.images import ImageStore
from vmimagemanager.metrics import read_totals
from vmimagemanager.node.snapshots import all_snapshots, snapshots_dir
from vmimagemanager.node.state import admin_key
from vmimagemanager.savefile import stream_offset

QUEUE = "vmsnap.q"
PROBE = "/tmp/vmim-test-snapshot-probe.sh"
PROBE_SCRIPT = """#!/bin/sh
# What a job sees right after its start: is its machine its own?
echo "random $(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n')"
echo "machine $(cat /etc/machine-id)"
echo "host $(hostname)"
echo "home $(stat -c %d "$HOME") $(stat -c %d /)"
echo "tree $(cat TREE/marker)"
sleep ${SLEEP:-0}
echo done
"""
KEEP = ("snapshots",)  # what assert_clean may find in overlay_dir


@pytest.fixture(scope="module")
def snap_cell(libvirt_system, guest_images):
    metrics = Path(tempfile.mkdtemp(prefix="vmim-snap-metrics-", dir="/var/tmp"))
    # a read-only tree over 9p: QEMU refuses to save a VM with it mounted, so a snapshot's VM
    # unmounts it before the save and each restore mounts it again
    tree = Path(tempfile.mkdtemp(prefix="vmim-snap-tree-", dir="/var/tmp"))
    os.chmod(tree, 0o755)
    (tree / "marker").write_text("from the tree\n")
    os.chmod(tree / "marker", 0o644)
    Path(PROBE).write_text(PROBE_SCRIPT.replace("TREE", str(tree)))
    os.chmod(PROBE, 0o755)
    cell = open_vm_cell(QUEUE, "vmim-snap-", guest_images, slots=2, queue_slots=2,
                        extra={"snapshot_starts": True, "health": {"back_after": 0},
                               "metrics_dir": str(metrics), "shared_paths": [
                                   {"path": "/home", "mode": "hypervisor"},
                                   {"path": str(tree), "mode": "hypervisor", "scope": "tree",
                                    "readonly": True}]})
    yield cell
    close_vm_cell(cell)
    shutil.rmtree(metrics, ignore_errors=True)
    shutil.rmtree(tree, ignore_errors=True)


def probe(cell, name: str, user: str = "atlas001", sleep: int = 0) -> str:
    return cell.submit(name, user, "-v", f"SLEEP={sleep}", PROBE)


def seen(cell, name: str, user: str) -> dict[str, str]:
    out = cell.output(name, user)[0]
    assert "done" in out, (out, cell.output(name, user)[1])
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


def snapshot_rows(cell) -> list[dict]:
    r = cell.cli("snapshots", "list", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["snapshots"]


def ensure_snapshot(cell) -> None:
    if not [row for row in snapshot_rows(cell) if row["usable"]]:
        lines = agent_once(cell)
        assert any("snapshot of atlas" in line and "made" in line for line in lines), lines


@pytest.mark.integration
def test_a_job_without_a_snapshot_boots_and_the_agent_makes_one(snap_cell):
    cell = snap_cell
    job = probe(cell, "cold")
    wait_done(job)
    start = vm_starts(cell.cfg)[f"{job}.0"]
    assert not start.get("snapshot") and not start.get("snapshot_failed"), start
    assert not snapshot_rows(cell)
    lines = agent_once(cell)  # the job asked for one
    assert any("snapshot of atlas (1 core and 256 MiB) made" in line for line in lines), lines
    (row,) = snapshot_rows(cell)
    assert row["usable"] and row["image"] == "atlas" and row["memory_mib"] > 10, row
    images = {r["name"]: r for r in json.loads(cell.cli("images", "list", "--json").stdout)}
    assert images["atlas"]["snapshots"] == ["atlas.1c256m"], images
    assert images["atlas"]["snapshots_mib"] >= row["memory_mib"] and not images["cms"]["snapshots"]
    # its files are root's: the saved memory (it holds the guest's old host key) root's only
    (snap,) = all_snapshots(cell.cfg)
    state = snap.state.stat()
    assert (state.st_uid, stat.S_IMODE(state.st_mode)) == (0, 0o600)
    assert stat.S_IMODE(snap.path.stat().st_mode) == 0o711
    assert stat.S_IMODE((snap.path / "private").stat().st_mode) == 0o700
    assert cell.domains() == []  # a snapshot costs no running VM
    cell.assert_clean(within=30, keep=KEEP)


def _host_key_refused(host: str, port: int, cfg, old_key: str) -> bool:
    try:
        connect(Endpoint(host, port, "root", admin_key(cfg)[0], old_key), timeout=10).close()
    except GuestError:
        return True
    return False


@pytest.mark.integration
def test_two_jobs_restored_from_one_snapshot_are_machines_of_their_own(snap_cell):
    cell = snap_cell
    ensure_snapshot(cell)
    (snap,) = all_snapshots(cell.cfg)
    jobs = {"atlas001": probe(cell, "twin1", "atlas001", sleep=15),
            "atlas002": probe(cell, "twin2", "atlas002", sleep=15)}
    facts = {}
    for user, job in jobs.items():
        lease = cell.wait_lease_state(job, "running", timeout=120)
        ctx = json.loads((cell.cfg.run_dir / "jobs" / f"{job}.0" / "context.json").read_text())
        before = time.time()
        r = cell.cli("exec", lease.slot, "--", "date", "+%s")
        after = time.time()
        assert r.returncode == 0, r.stderr
        facts[user] = {"slot": lease.slot, "host_key": ctx["host_key"],
                       "clock": int(r.stdout.strip()), "window": (before, after),
                       "old_key_refused": _host_key_refused(ctx["host"], ctx["port"], cell.cfg,
                                                            snap.host_key)}
    # while VMs run on it, what later restores read is still root's (libvirt relabelled none)
    owners = {path.name: (path.stat().st_uid, stat.S_IMODE(path.stat().st_mode))
              for path in (snap.path / "disk.qcow2", snap.path / "seed.iso", snap.state)}
    for job in jobs.values():
        wait_done(job)
    assert owners == {"disk.qcow2": (0, 0o640), "seed.iso": (0, 0o640), "state": (0, 0o600)}
    one, two = facts["atlas001"], facts["atlas002"]
    assert one["slot"] != two["slot"]
    # each pinned its own new host key; the snapshot's is refused by both
    assert len({one["host_key"], two["host_key"], snap.host_key}) == 3
    assert one["old_key_refused"] and two["old_key_refused"]
    for fact in (one, two):  # the guest's clock is the host's, not the snapshot's
        assert fact["window"][0] - 2 <= fact["clock"] <= fact["window"][1] + 2, fact
    out1, out2 = seen(cell, "twin1", "atlas001"), seen(cell, "twin2", "atlas002")
    assert out1["random"] != out2["random"] and len(out1["random"]) == 64
    assert out1["machine"] != out2["machine"] and len(out1["machine"]) == 32
    assert out1["host"] != out2["host"]
    for out in (out1, out2):  # the owner's home, hot-plugged at the bind; the tree again
        home_dev, root_dev = out["home"].split()
        assert home_dev != root_dev, out
        assert out["tree"] == "from the tree", out
    starts = vm_starts(cell.cfg)
    for job in jobs.values():
        start = starts[f"{job}.0"]
        assert start["snapshot"] == "atlas.1c256m" and not start.get("spare"), start
        assert "restore" in start["phases"] and "guest boot (to host key on console)" not in \
            start["phases"], start
    totals = read_totals(cell.cfg)
    assert totals["vmimagemanager_vm_starts_total"][json.dumps(["atlas", "snapshot"])] >= 2, \
        totals
    cell.assert_clean(within=30, keep=KEEP)


@pytest.mark.integration
def test_a_corrupt_snapshot_is_removed_and_the_job_boots(snap_cell):
    cell = snap_cell
    ensure_snapshot(cell)
    (snap,) = all_snapshots(cell.cfg)
    fd = os.open(snap.state, os.O_RDWR)
    try:  # QEMU's stream is not where the header says any more
        os.pwrite(fd, b"\0" * 4, stream_offset(fd))
    finally:
        os.close(fd)
    job = probe(cell, "corrupt")
    wait_done(job)
    assert seen(cell, "corrupt", "atlas001")["host"]
    start = vm_starts(cell.cfg)[f"{job}.0"]
    assert "unusable" in start["snapshot_failed"] and not start.get("snapshot"), start
    assert "guest boot (to host key on console)" in start["phases"], start
    assert not all_snapshots(cell.cfg)
    totals = read_totals(cell.cfg)
    assert sum(totals["vmimagemanager_snapshot_fallbacks_total"].values()) >= 1, totals
    cell.assert_clean(within=30, keep=KEEP)
    ensure_snapshot(cell)  # the agent makes it again


@pytest.mark.integration
def test_spares_are_restored_from_the_snapshot(snap_cell):
    cell = snap_cell
    ensure_snapshot(cell)
    original = cell.config_path.read_text()
    data = yaml.safe_load(original)
    # the node's own configuration, as an admin changes it: the jobs' hooks read it too
    cell.config_path.write_text(yaml.safe_dump({**data, "spares": {"vos": {"atlas": 1}}},
                                               sort_keys=False))
    try:
        lines = agent_once(cell)
        assert any("ready in slot" in line for line in lines), lines
        (spare,) = [lease for lease in cell.all_leases() if str(lease.state) == "spare"]
        (event,) = [e for e in read_history(cell.cfg)
                    if e["event"] == "spare" and e.get("job") == spare.job_label]
        assert "restore" in event["phases"] and "guest boot (to host key on console)" not in \
            event["phases"], event
        r = cell.cli("exec", spare.slot, "--", "hostname")  # its pinned key is the node's
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == cell.cfg.slot(spare.slot).guest_hostname
        job = probe(cell, "onspare")
        wait_done(job)
        start = vm_starts(cell.cfg)[f"{job}.0"]
        assert start["spare"] == spare.job_label, start
        assert seen(cell, "onspare", "atlas001")["host"]
        r = cell.cli("spares", "--retire")
        assert r.returncode == 0, r.stderr
    finally:
        cell.config_path.write_text(original)
    cell.assert_clean(within=30, keep=KEEP)


@pytest.mark.integration
def test_a_changed_image_invalidates_its_snapshot(snap_cell, guest_images):
    cell = snap_cell
    ensure_snapshot(cell)
    d = guest_images["dir"]
    store = ImageStore(cell.cfg.image_dir)
    store.import_image("atlas", d / guest_images["images"]["cms"]["disk"],
                       kernel=d / guest_images["kernel"], initrd=d / guest_images["initrd"],
                       cmdline=guest_images["cmdline"], update=True)
    (row,) = snapshot_rows(cell)
    assert not row["usable"] and "changed" in row["why_not"], row
    job = probe(cell, "changed")
    wait_done(job)
    start = vm_starts(cell.cfg)[f"{job}.0"]
    assert not start.get("snapshot") and not start.get("snapshot_failed"), start
    assert not all_snapshots(cell.cfg)  # removed before it could be used
    lines = agent_once(cell)
    assert any("snapshot of atlas" in line and "made" in line for line in lines), lines
    r = cell.cli("images", "remove", "cms")
    assert r.returncode == 0, r.stderr
    r = cell.cli("images", "remove", "atlas")
    assert r.returncode == 0 and "removed the snapshot of atlas" in r.stdout, r.stdout
    assert not all_snapshots(cell.cfg) and snapshots_dir(cell.cfg).is_dir()
    assert virsh("list", "--name").returncode == 0
    cell.assert_clean(within=30, keep=KEEP)
    assert load_config(str(cell.config_path)).snapshot_starts
