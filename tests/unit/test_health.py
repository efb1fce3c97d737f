"""`vmimagemanager health`: each check's state, since when, and the exit status monitoring reads
(0 healthy, 1 degraded, 2 out of service), on libvirt's test driver and real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support import testdriver
from vmimagemanager import health
from vmimagemanager.hypervisor import LibvirtHypervisor
from vmimagemanager.images import ImageStore
from vmimagemanager.leases import LeaseStore
from vmimagemanager.node import Node, open_node
from vmimagemanager.states import LeaseState

CLI = str(Path(sys.executable).parent / "vmimagemanager")
VOS = {"atlas": {"image": "atlas", "groups": ["atlas"]}, "cms": {"image": "cms", "groups": ["cms"]}}


def _node(tmp_path, **kwargs) -> Node:
    cfg = testdriver.node_config(tmp_path, slots=2, vos=VOS, **kwargs)
    life = open_node(cfg)
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "1M"], check=True)
    for name in ("atlas", "cms"):
        ImageStore(cfg.image_dir).import_image(name, disk)
    return life


def by_check(results) -> dict[str, health.CheckResult]:
    return {r.check: r for r in results}


def test_a_healthy_node_and_a_vos_missing_image(tmp_path):
    life = _node(tmp_path)
    results = health.run_checks(life)
    assert all(r.ok for r in results), results
    assert health.status(results) == health.HEALTHY
    assert {"libvirtd", "overlay_dir", "state_dir", "leases_db", "leases_agree",
            "image:atlas", "image:cms"} == set(by_check(results))
    first = by_check(results)["image:cms"].since
    life.images.remove("cms", [])
    results = health.run_checks(life)
    cms = by_check(results)["image:cms"]
    assert not cms.ok and cms.scope == "vo" and "VO cms" in cms.detail
    assert cms.since > first and by_check(results)["image:atlas"].since == first  # since when
    assert health.status(results) == health.DEGRADED  # atlas jobs still run


def test_node_checks_that_fail_put_it_out_of_service(tmp_path):
    life = _node(tmp_path)
    life.leases.allocate(["s1"], "7", "0", "atlas001", "atlas")  # a lease without its VM
    life.leases.transition("s1", LeaseState.BOOTING)
    life.leases.transition("s1", LeaseState.RUNNING)
    agree = by_check(health.run_checks(life))["leases_agree"]
    assert not agree.ok and "release" in agree.detail and "reconcile" in agree.detail
    down = Node(life.cfg, LibvirtHypervisor("test:///nonexistent/libvirt.xml"),
                LeaseStore(life.cfg.leases_db))
    results = health.run_checks(down)
    assert not by_check(results)["libvirtd"].ok
    assert health.status(results) == health.OUT_OF_SERVICE


def test_free_space_below_the_floor_fails(tmp_path):
    result = health._free_space("overlay_dir", tmp_path, 1 << 40)  # more than any disk has
    assert not result.ok and "free space" in result.detail


def test_the_command_prints_json_and_exits_with_the_status(tmp_path):
    path = testdriver.write_node_config(tmp_path / "c.yaml", slots=1, vos=VOS)
    r = subprocess.run([CLI, "--config", str(path), "health", "--json"], capture_output=True,
                       text=True, timeout=60)
    report = json.loads(r.stdout)
    # test:///default is per process: the CLI's node has no image imported
    assert r.returncode == health.DEGRADED and report["status"] == "degraded", r.stderr
    assert {c["check"] for c in report["checks"] if not c["ok"]} == {"image:atlas", "image:cms"}
    r = subprocess.run([CLI, "--config", str(path), "health"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and "degraded: see the failed check (a VO's jobs are held" in r.stdout
