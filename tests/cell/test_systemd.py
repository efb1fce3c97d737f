"""The shipped systemd units under a real systemd, and a node's reboot with them.

systemd is not PID 1 on these machines, so the node boots as a container (systemd-nspawn): the
host's own tree, read-only below a tmpfs (`--volatile=overlay`: /run and every file the boot
writes are new each boot), its own network namespace (nothing of the host's cell is reached),
its own systemd, journald, dbus and libvirtd. /etc/systemd/system is the test's: the units as
the packages ship them, enabled with `systemctl enable` as a site does (nothing else of the
host's is enabled, and the host's init.d scripts are not made units: its SGE cell and the rest
stay the host's alone). The node's state_dir and overlay_dir are the host's directories, kept over
a reboot, as on a node's disk. A reboot is the container's PID 1 killed with SIGKILL: the
kernel kills every process of the node at once, QEMU included; nothing shuts down.
The units' entry points on the host's own cell: tests/cell/test_faults.py (reboot),
tests/unit/test_systemd_units.py (systemd-analyze verify).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support import REPO, import_test_images, make_base_dir, require, write_config
from tests.support.sgecell import wait_for
from vmimagemanager.config import DEFAULT_CONFIG_PATH, load_config
from vmimagemanager.leases import LeaseStore
from vmimagemanager.states import LeaseState

UNITS = ("vmimagemanager-agent.service", "vmimagemanager-reconcile.service",
         "vmimagemanager-reconcile.timer")
ENABLED = ("vmimagemanager-agent.service", "vmimagemanager-reconcile.timer")  # README's


class Node:
    """A booted container of this host's tree under its own systemd."""

    def __init__(self, base: Path, cfg) -> None:
        self.base, self.cfg = base, cfg
        self.process: subprocess.Popen | None = None
        self.init: int | None = None  # the node's PID 1 (the host's view) while it runs
        self.log = base / "nspawn.log"

    def boot(self) -> None:
        require(shutil.which("systemd-nspawn") is not None,
                "systemd-nspawn is missing; run harness/install-deps.sh")
        keep = [f"--bind={self.cfg.state_dir}", f"--bind={self.cfg.overlay_dir}"]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                ["systemd-nspawn", "--register=no", "--keep-unit", "--quiet",
                 f"--directory={self.base / 'tree'}", "--volatile=overlay",
                 "--private-network", "--console=passive",
                 f"--bind-ro={self.base / 'root/etc/systemd/system'}:/etc/systemd/system",
                 f"--bind-ro={self.base / 'root/etc/systemd/system-generators'}"
                 ":/etc/systemd/system-generators",
                 f"--bind-ro={self.cfg.path}:{DEFAULT_CONFIG_PATH}",
                 f"--bind-ro={self.base / 'root/etc/libvirt/qemu.conf'}:/etc/libvirt/qemu.conf",
                 *keep, "--boot"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        self.init = wait_for(self._child, "systemd-nspawn to start the node", timeout=60,
                             interval=0.2)
        wait_for(lambda: self.run("systemctl", "is-system-running", check=False).strip()
                 in ("running", "degraded"), "the node's systemd to finish its boot",
                 timeout=120, interval=0.5)

    def _child(self) -> int | None:
        assert self.process is not None and self.process.poll() is None, self.journal()
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        pids = children.read_text().split()
        return int(pids[0]) if pids else None

    @property
    def init_pid(self) -> int:
        """The node's PID 1, as the host sees it (systemd-nspawn's child)."""
        pid = self._child()
        assert pid is not None, "systemd-nspawn has no child"
        return pid

    def run(self, *argv: str, check: bool = True) -> str:
        r = subprocess.run(["nsenter", "-t", str(self.init_pid), "-a", "--", *argv],
                           capture_output=True, text=True, timeout=120,
                           env={"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
                                "LANG": "C.UTF-8"})
        if check:
            assert r.returncode == 0, f"{argv}: {r.stderr}{r.stdout}"
        return r.stdout

    def show(self, unit: str, *keys: str) -> dict[str, str]:
        out = self.run("systemctl", "show", "-p", ",".join(keys), unit)
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self) -> str:
        if self.process is None or self.process.poll() is not None:
            return self.log.read_text(errors="replace")[-3000:]
        return self.run("journalctl", "--no-pager", "-n", "40", "-u", "vmimagemanager-*",
                        "-u", "libvirtd.service", check=False)

    def wait(self, predicate, what: str, timeout: float) -> None:
        """wait_for, with the node's journal of our units when it times out."""
        try:
            wait_for(predicate, what, timeout=timeout, interval=1)
        except AssertionError:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; the "
                                 f"node's journal:\n{self.journal()}") from None

    def power_cut(self) -> None:
        """Every process of the node dies at once (the kernel kills a PID namespace with its
        PID 1); nothing of ours runs a shutdown path."""
        assert self.process is not None and self.init is not None
        os.kill(self.init, signal.SIGKILL)
        self.process.wait(timeout=60)
        self.init = None

    def shut_down(self) -> None:
        """Power off (nspawn asks the node's systemd on SIGTERM); a node still there after
        60 s loses its PID 1, and with it every process: none may outlive the test (a
        libvirtd or QEMU of the node's would look like the host's to pgrep)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=60)
        if self.process.poll() is None and self.init is not None:
            os.kill(self.init, signal.SIGKILL)  # still nspawn's child: the node's PID 1
        self.process.wait(timeout=60)
        self.init = None


@pytest.fixture(scope="module")
def node(libvirt_system, guest_images):
    base = make_base_dir("vmim-sd-")
    path = write_config(base, slots=2, extra={
        "vos": {"atlas": {"image": "atlas", "groups": ["atlas"]}},
        "spares": {"vos": {"atlas": 1}, "interval": 2},
        "health": {"back_after": 0, "gone_after": 0}})
    cfg = load_config(str(path))
    import_test_images(cfg, guest_images, names=("atlas",))
    units = base / "root/etc/systemd/system"
    units.mkdir(parents=True)
    for name in UNITS:
        shutil.copy(REPO / "systemd" / name, units / name)
    r = subprocess.run(["systemctl", f"--root={base / 'root'}", "enable", *ENABLED],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # nspawn mounts the host's cgroup v1 controllers read-only in the container: its libvirtd
    # uses none (a spare then runs at a job's CPU weight: logged, spares.py)
    qemu_conf = base / "root/etc/libvirt/qemu.conf"
    qemu_conf.parent.mkdir(parents=True)
    qemu_conf.write_text(Path("/etc/libvirt/qemu.conf").read_text()
                         + "\ncgroup_controllers = [ ]\n")
    generators = base / "root/etc/systemd/system-generators"
    generators.mkdir()
    (generators / "systemd-sysv-generator").symlink_to("/dev/null")  # masked
    # systemd-nspawn refuses to boot the host's / itself: the same tree, bound elsewhere
    tree = base / "tree"
    tree.mkdir()
    subprocess.run(["mount", "--bind", "/", str(tree)], check=True)
    container = Node(base, cfg)
    yield container
    container.shut_down()
    subprocess.run(["umount", str(tree)], check=False)
    shutil.rmtree(base, ignore_errors=True)


def spares(cfg) -> list:
    return [lease for lease in LeaseStore(cfg.leases_db).all()
            if lease.is_spare and lease.state == LeaseState.SPARE]


def test_the_agent_starts_after_libvirtd_and_keeps_a_spare(node):
    node.boot()
    assert node.run("systemctl", "is-system-running", check=False).strip() == "running", \
        node.run("systemctl", "--failed", "--no-pager", check=False)
    libvirtd = node.show("libvirtd.service", "ActiveState", "ActiveEnterTimestampMonotonic")
    agent = node.show("vmimagemanager-agent.service", "ActiveState",
                      "ExecMainStartTimestampMonotonic")
    assert libvirtd["ActiveState"] == agent["ActiveState"] == "active", (libvirtd, agent)
    # ordered after libvirtd (Type=notify: active once it answers)
    assert int(agent["ExecMainStartTimestampMonotonic"]) >= int(
        libvirtd["ActiveEnterTimestampMonotonic"]), (libvirtd, agent)
    node.wait(lambda: spares(node.cfg), "the agent under systemd to boot a spare", timeout=300)
    assert "vmim-t" in node.run("virsh", "-c", "qemu:///system", "list", "--name")


def test_after_a_power_cut_the_node_comes_back_clean_with_the_units(node):
    """The spare of the last boot is left in the leases database and overlay_dir, its domain
    gone with the node; the next boot's agent round and the timer's reconcile leave no lease,
    domain or file of it, and a new spare is booted."""
    before = spares(node.cfg)
    assert before, "the first test leaves a spare"
    old = before[0].job_label
    node.power_cut()
    assert any(lease.job_label == old for lease in LeaseStore(node.cfg.leases_db).all())
    assert any(old in p.name for p in node.cfg.overlay_dir.iterdir())

    node.boot()
    booted = time.monotonic()
    node.wait(lambda: (spares(node.cfg) and all(lease.job_label != old
                                                for lease in LeaseStore(node.cfg.leases_db).all())),
                "the old spare's lease to go and a new spare to be booted", timeout=300)
    assert not any(old in p.name for p in node.cfg.overlay_dir.iterdir())
    # the timer's first reconcile (OnBootSec=15s) ran and found nothing it could not finish
    node.wait(lambda: node.show("vmimagemanager-reconcile.service", "ExecMainExitTimestamp")
              ["ExecMainExitTimestamp"], "the timer's reconcile to run",
              timeout=max(10.0, 60 - (time.monotonic() - booted)))
    reconcile = node.show("vmimagemanager-reconcile.service", "Result", "ExecMainStatus")
    assert reconcile == {"Result": "success", "ExecMainStatus": "0"}, (reconcile, node.journal())
    assert node.run("vmimagemanager", "reconcile", "--dry-run").strip() == \
        "nothing to do: leases, domains and files agree"
    health = json.loads(node.run("vmimagemanager", "health", "--json"))
    assert health["status"] == "healthy" and not health["out_of_service"], health
    # stopping the agent (TERM) is clean and leaves its idle spare for the next agent
    node.run("systemctl", "stop", "vmimagemanager-agent.service")
    stopped = node.show("vmimagemanager-agent.service", "ActiveState", "Result")
    assert stopped == {"ActiveState": "inactive", "Result": "success"}, stopped
    assert spares(node.cfg)
