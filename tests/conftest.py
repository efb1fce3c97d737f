"""Fixtures only: real libvirtd + QEMU guests, libvirt's test driver, and the switch that makes
the daemons mandatory. Helpers the tests import are in tests/support/.

Integration tests skip on a machine without the daemons, unless VMIM_INTEGRATION=1 (set by
.ci/run and `make test`): then a missing daemon is a failure, never a silent skip
(tests.support.require, which every fixture below that needs a daemon goes through). Booted
guests are shared per session where a test does not need a fresh one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.support import (
    HARNESS,
    INTEGRATION,
    REPO,
    import_test_images,
    make_base_dir,
    require,
    run_script,
    testdriver,
    write_config,
)


def pytest_report_header(config) -> str:
    return ("VMIM_INTEGRATION=1: an integration test without its daemon fails" if INTEGRATION
            else "VMIM_INTEGRATION unset: an integration test without its daemon skips")


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


@pytest.fixture(scope="session")
def vm_setup(libvirt_system, guest_images):
    """A configuration with two slots and the test images imported; removed at the end."""
    from vmimagemanager.config import load_config

    base = make_base_dir("vmim-it-")
    path = write_config(base, slots=2)
    cfg = load_config(str(path))
    import_test_images(cfg, guest_images)
    yield path, cfg
    from vmimagemanager.node import open_node

    open_node(cfg).reconcile()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def life(vm_setup):
    from vmimagemanager.node import open_node

    _path, cfg = vm_setup
    return open_node(cfg)


@pytest.fixture(scope="session")
def atlas_vm(life):
    """One booted atlas guest shared by the tests that only run commands in it."""
    from vmimagemanager.node import JobRequest

    started = life.start_vm(JobRequest("9001", "0", "atlas001", "atlas", "atlas"),
                               slots=["t1"])
    lease, ctx = started.lease, started.context
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
    """A Node on libvirt's in-process test driver (real libvirt code, no QEMU), four slots."""
    return testdriver.node_life(tmp_path)
