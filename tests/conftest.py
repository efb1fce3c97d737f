"""Shared fixtures: real libvirtd + QEMU guests, and the switch that makes them mandatory.

Integration tests skip on a machine without the daemons, unless VMIM_INTEGRATION=1 (set by
.ci/run and `make test`): then a missing daemon is a failure, never a silent skip. Booted guests
are shared per session where a test does not need a fresh one.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
HARNESS = REPO / "harness"
INTEGRATION = os.environ.get("VMIM_INTEGRATION") == "1"
CMDLINE = "console=ttyS0 quiet panic=-1"


def require(ok: bool, what: str) -> None:
    if ok:
        return
    if INTEGRATION:
        pytest.fail(f"{what} (VMIM_INTEGRATION=1: integration tests must not be skipped)")
    pytest.skip(what)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], capture_output=True, text=True)


# Python's temporary directory as the test session started (pytest's own tmp_path lives there).
SESSION_TEMPDIR = tempfile.tempdir


@pytest.fixture(autouse=True)
def _tempdir_of_the_test_process():
    """A root entry point makes its run_dir/tmp Python's temporary directory for the rest of
    its process (rootenv.use_private_tmp); tests share one process, and a module's fixture may
    have set it (before this fixture runs, or in its teardown) and removed the directory since:
    each test starts with the session's own if that one is gone, and ends with it."""
    if tempfile.tempdir is not None and not os.path.isdir(tempfile.tempdir):
        tempfile.tempdir = SESSION_TEMPDIR
    yield
    tempfile.tempdir = SESSION_TEMPDIR


@pytest.fixture(scope="session")
def as_root() -> None:
    require(os.geteuid() == 0, "needs root (libvirt qemu:///system, pool accounts)")


@pytest.fixture(scope="session")
def libvirt_system(as_root) -> str:
    result = run_script(str(HARNESS / "libvirt-up.sh"))
    require(result.returncode == 0, f"libvirtd not usable: {result.stderr.strip()}")
    return "qemu:///system"


@pytest.fixture(scope="session")
def pool_accounts(as_root) -> None:
    result = run_script(str(HARNESS / "pool-accounts.sh"))
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="session")
def guest_images(pool_accounts) -> dict:
    result = subprocess.run([sys.executable, str(REPO / "examples/guest/build_images.py"),
                             "--json"], capture_output=True, text=True)
    require(result.returncode == 0, f"building test guest images failed: {result.stderr}")
    manifest = json.loads(result.stdout)
    manifest["dir"] = Path(manifest["dir"])
    return manifest


def make_base_dir(prefix: str) -> Path:
    """A directory pool accounts can traverse (the starter reads its context below it)."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    os.chmod(base, 0o755)
    return base


def write_config(base: Path, slots: int, extra: dict | None = None, prefix: str = "t") -> Path:
    data = {
        "libvirt_uri": "qemu:///system",
        "domain_type": "auto",
        "image_dir": str(base / "images"),
        "overlay_dir": str(base / "overlays"),
        "state_dir": str(base / "state"),
        "run_dir": str(base / "run"),
        "boot_timeout": 150,
        "slot_defaults": {"vcpus": 1, "memory_mib": 256},
        "slots": [{"name": f"{prefix}{i}", "network": {"type": "user", "ssh_port": free_port()}}
                  for i in range(1, slots + 1)],
        "vos": {"atlas": {"image": "atlas", "groups": ["atlas"]},
                "cms": {"image": "cms", "groups": ["cms"]}},
        "unmatched": "reject",
    }
    data.update(extra or {})
    path = base / "vmimagemanager.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))  # VO order matters
    os.chmod(path, 0o644)
    return path


def import_test_images(cfg, manifest: dict, names=("atlas", "cms", "atlas-nossh")) -> None:
    """The test node's admin set-up: its images, and its admin key (made at install time,
    never by a job's hook)."""
    from vmimagemanager.images import ImageStore
    from vmimagemanager.lifecycle import ensure_admin_key

    ensure_admin_key(cfg)

    store = ImageStore(cfg.image_dir)
    d = manifest["dir"]
    for name in names:
        if not store.exists(name):
            store.import_image(name, d / manifest["images"][name]["disk"],
                               kernel=d / manifest["kernel"], initrd=d / manifest["initrd"],
                               cmdline=manifest["cmdline"])


@pytest.fixture(scope="session")
def vm_setup(libvirt_system, guest_images):
    """A configuration with two slots and the test images imported; removed at the end."""
    from vmimagemanager.config import load_config

    base = make_base_dir("vmim-it-")
    path = write_config(base, slots=2)
    cfg = load_config(str(path))
    import_test_images(cfg, guest_images)
    yield path, cfg
    from vmimagemanager.hypervisor import LibvirtHypervisor
    from vmimagemanager.lifecycle import LifeCycle

    LifeCycle(cfg, LibvirtHypervisor(cfg.libvirt_uri)).reconcile()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def life(vm_setup):
    from vmimagemanager.hypervisor import LibvirtHypervisor
    from vmimagemanager.lifecycle import LifeCycle

    _path, cfg = vm_setup
    return LifeCycle(cfg, LibvirtHypervisor(cfg.libvirt_uri))


@pytest.fixture(scope="session")
def atlas_vm(life):
    """One booted atlas guest shared by the tests that only run commands in it."""
    from vmimagemanager.lifecycle import JobRequest

    lease, ctx = life.start_vm(JobRequest("9001", "0", "atlas001", "atlas", "atlas"),
                               slots=["t1"])
    yield lease, ctx
    life.end_vm(lease.slot)


@pytest.fixture
def atlas_session(atlas_vm, vm_setup):
    from vmimagemanager.context import key_path
    from vmimagemanager.guest import Endpoint, connect

    _lease, ctx = atlas_vm
    cfg = vm_setup[1]
    session = connect(Endpoint(ctx.host, ctx.port, ctx.user, key_path(cfg.run_dir, ctx.label),
                               ctx.host_key))
    yield session
    session.close()


@pytest.fixture
def test_life(tmp_path):
    """A LifeCycle on libvirt's in-process test driver (real libvirt code, no QEMU)."""
    from vmimagemanager.config import parse_config
    from vmimagemanager.hypervisor import LibvirtHypervisor
    from vmimagemanager.lifecycle import LifeCycle

    data = {"libvirt_uri": "test:///default", "domain_type": "qemu",
            "image_dir": str(tmp_path / "images"), "overlay_dir": str(tmp_path / "overlays"),
            "state_dir": str(tmp_path / "state"), "run_dir": str(tmp_path / "run"),
            "slots": [{"name": f"s{i}", "network": {"type": "user", "ssh_port": 30000 + i}}
                      for i in range(1, 5)]}
    cfg = parse_config(data, str(tmp_path / "c.yaml"))
    hv = LibvirtHypervisor("test:///default")
    for name in hv.domain_names():  # the test driver is per process; start clean
        hv.destroy(name)
    return LifeCycle(cfg, hv), cfg
