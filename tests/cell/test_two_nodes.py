"""Two worker nodes of one cell, each with its own vmimagemanager state, slots and libvirt.

The second node (harness/sge-node.sh) is an sge_execd in its own network, UTS and mount
namespaces, with its own host name, loopback, libvirtd and /etc/hosts; it reaches the qmaster
through a loopback relay that connects from the node's own 127.0.0.2 (no other address is used).
Its vmimagemanager configuration is the node's own file at the path the queue's hook wrappers
name (bind-mounted in its mount namespace, as every real node has its own /etc), and it gets its
images from a catalog the first node publishes (`images publish` / `images sync`).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.support import HARNESS, make_base_dir, require, run_script, write_config
from tests.support.sgecell import CLI, JOB, close_vm_cell, open_vm_cell, wait_done, wait_for
from vmimagemanager.audit import vm_starts
from vmimagemanager.config import load_config
from vmimagemanager.leases import LeaseStore

pytestmark = [pytest.mark.integration, pytest.mark.sge]

NODE = "vmim-node2"
QUEUE = "vm2n.q"
USERS = ["atlas001", "cms001", "atlas002", "cms002"]


def on_node(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(HARNESS / "sge-node.sh"), "exec", NODE, "--", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def two_nodes(libvirt_system, guest_images):
    cell = open_vm_cell(QUEUE, "vmim-2n-", guest_images, slots=1)
    up = run_script(str(HARNESS / "sge-node.sh"), "up", NODE)
    require(up.returncode == 0, f"the second node did not come up: {up.stderr.strip()}")
    base = make_base_dir("vmim-node2-")
    path = write_config(base, slots=1, prefix="n2s", extra={
        "boot_timeout": 60, "shared_paths": [{"path": "/home", "mode": "hypervisor"}]})
    node2 = load_config(str(path))
    # a catalog only root can write, up to / (cell.base is below /var/tmp: refused by sync)
    catalog = Path(tempfile.mkdtemp(prefix="vmim-catalog-", dir="/srv"))
    os.chmod(catalog, 0o755)
    try:
        for image in ("atlas", "cms"):
            r = cell.cli("images", "publish", image, str(catalog))
            assert r.returncode == 0, r.stderr
        # the node's own configuration where the hook wrappers look for it
        r = on_node("mount", "--bind", str(path), str(cell.config_path))
        assert r.returncode == 0, r.stderr
        r = on_node(CLI, "--config", str(cell.config_path), "images", "sync", str(catalog))
        assert r.returncode == 0 and "imported atlas" in r.stdout, (r.stdout, r.stderr)
        # install-queue runs on the first node; every other node makes its own admin key
        r = on_node(CLI, "--config", str(cell.config_path), "admin-key")
        assert r.returncode == 0, r.stderr
        r = cell.cli("sge", "install-queue", "--queue", QUEUE, "--slots", "1", "--hosts",
                     socket.gethostname(), NODE, "--wrapper-dir", str(cell.base / "libexec"))
        assert r.returncode == 0, r.stderr
        # both queue instances must take jobs (not 'u'nknown) before jobs are submitted, or the
        # scheduler may give every job to the first node
        wait_for(lambda: len(states := cell.queue_states()) == 2 and not any(states),
                 "both queue instances to be usable", timeout=120, interval=0.5)
        yield cell, node2
    finally:
        close_vm_cell(cell)
        on_node(CLI, "--config", str(path), "reconcile")
        run_script(str(HARNESS / "sge-node.sh"), "down", NODE)
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(catalog, ignore_errors=True)


def test_jobs_of_one_cell_run_on_two_nodes_each_with_its_own_slots_and_state(two_nodes):
    cell, node2 = two_nodes
    jobs = {cell.submit(f"twonode{i}", user, "-v", "SLEEP=6", JOB): user
            for i, user in enumerate(USERS)}
    records = {job: wait_done(job)[0] for job in jobs}
    ran_on = {job: record["hostname"] for job, record in records.items()}
    assert set(ran_on.values()) == {socket.gethostname(), NODE}, ran_on
    guests = {socket.gethostname(): {s.guest_hostname for s in cell.cfg.slots},
              NODE: {s.guest_hostname for s in node2.slots}}
    assert not guests[NODE] & guests[socket.gethostname()]
    for (job, user), name in zip(jobs.items(), [f"twonode{i}" for i in range(len(USERS))],
                                 strict=True):
        assert records[job]["exit_status"] == "0", records[job]
        out, err = cell.output(name, user)
        lines = out.splitlines()
        assert lines[-1] == "finished" and lines[0].startswith("started on "), (out, err)
        assert lines[0].removeprefix("started on ") in guests[ran_on[job]], (ran_on[job], out)
    # each node's own state: its starts record exactly the jobs that ran there
    for host, cfg in ((socket.gethostname(), cell.cfg), (NODE, node2)):
        starts = list(vm_starts(cfg))
        assert sorted(starts) == sorted(f"{j}.0" for j, h in ran_on.items() if h == host)
    cell.assert_clean(within=120)
    # node 2's teardowns are detached too: its slot is free and its files gone within 120 s
    wait_for(lambda: not LeaseStore(node2.leases_db).all()
             and not list(node2.overlay_dir.iterdir()), "node 2 to be clean", timeout=120,
             interval=1)
    assert on_node("virsh", "-c", "qemu:///system", "list", "--name").stdout.strip() == ""
