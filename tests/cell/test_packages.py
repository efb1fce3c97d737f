"""The Debian package as a site installs it: built from this tree (debian/, pybuild), installed on
this machine, it runs one job through the real cell and, removed, leaves the site's configuration
and images. The RPM spec: tests/unit/test_packages.py."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support import require
from tests.support.packages import packaged_hooks, source_tree
from tests.support.sgecell import SGE_ENV, close_vm_cell, open_vm_cell, sge, wait_done
from vmimagemanager.config import DEFAULT_CONFIG_PATH

QUEUE = "vmdeb.q"


def dpkg(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["dpkg", *args], capture_output=True, text=True)
    assert not check or r.returncode == 0, r.stderr
    return r


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def deb(tmp_path_factory) -> Path:
    require(shutil.which("dpkg-buildpackage") is not None, "dpkg-buildpackage is missing; run "
            "harness/install-deps.sh")
    top = tmp_path_factory.mktemp("deb")
    src = source_tree(top / "src")
    r = subprocess.run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=src, capture_output=True,
                       text=True)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    (package,) = top.glob("vmimagemanager_0.1.0_all.deb")
    return package


@pytest.mark.integration
@pytest.mark.sge
def test_the_deb_installs_runs_a_job_through_the_cell_and_leaves_the_site_when_removed(
        deb, libvirt_system, guest_images):
    site_config = Path(DEFAULT_CONFIG_PATH)
    ours = not site_config.exists()  # a machine without one gets one, as a site would write
    if ours:
        site_config.parent.mkdir(parents=True, exist_ok=True)
        site_config.write_text("# the site's own configuration\n")
    before = digest(site_config)
    cell = open_vm_cell(QUEUE, "vmim-deb-", guest_images)
    try:
        r = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                            str(deb)], capture_output=True, text=True,
                           env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:"
                                "/sbin:/bin"})
        assert r.returncode == 0, r.stderr
        listed = dpkg("-L", "vmimagemanager").stdout.split()
        for path in ("/usr/bin/vmimagemanager", "/lib/systemd/system/vmimagemanager-agent.service",
                     "/lib/systemd/system/vmimagemanager-reconcile.timer",
                     "/etc/logrotate.d/vmimagemanager", "/usr/lib/vmimagemanager/sge/prolog",
                     "/etc/vmimagemanager/vmimagemanager.yaml.example"):
            assert path in listed and Path(path).exists(), path
        assert str(site_config) not in listed  # the site's file is never the package's
        for hook, text in packaged_hooks().items():
            assert Path(f"/usr/lib/vmimagemanager/sge/{hook}").read_text() == text
        # Debian's python3 with Debian's libvirt, lxml and yaml: not the test venv
        r = subprocess.run(["/usr/bin/vmimagemanager", "--config", str(cell.config_path),
                            "slots"], capture_output=True, text=True)
        assert r.returncode == 0 and cell.cfg.slots[0].name in r.stdout, r.stderr
        head = Path("/usr/bin/vmim-sge-prolog").read_text().splitlines()[0]
        assert head == "#!/usr/bin/python3"
        wrappers = cell.base / "pkg-libexec"
        r = subprocess.run(["/usr/bin/vmimagemanager", "--config", str(cell.config_path), "sge",
                            "install-queue", "--queue", QUEUE, "--wrapper-dir", str(wrappers)],
                           capture_output=True, text=True, env={**SGE_ENV, "PATH": "/usr/bin:/bin"})
        assert r.returncode == 0, r.stderr
        assert f"root@{wrappers}/prolog" in sge("qconf", "-sq", QUEUE)
        assert "hook=/usr/bin/vmim-sge-prolog" in (wrappers / "prolog").read_text()
        job = cell.run_job("deb-job", "atlas001")
        (record,) = wait_done(job)
        out, err = cell.output("deb-job", "atlas001")
        assert record["exit_status"] == "0", err
        hostnames = {s.guest_hostname for s in cell.cfg.slots}
        assert any(f"started on {h}" in out for h in hostnames), out
        r = cell.cli("history", "--job", job)
        assert "atlas" in r.stdout and "ready" in r.stdout, r.stdout
        cell.assert_clean()

        dpkg("-r", "vmimagemanager")
        assert not Path("/usr/bin/vmimagemanager").exists()
        assert Path("/etc/vmimagemanager/vmimagemanager.yaml.example").exists()  # a conffile
        assert digest(site_config) == before
        assert cell.cfg.image_dir.is_dir() and list(cell.cfg.image_dir.glob("*.json"))
        dpkg("-P", "vmimagemanager")
        assert not Path("/etc/vmimagemanager/vmimagemanager.yaml.example").exists()
        assert digest(site_config) == before  # purged: still the site's own file
    finally:
        dpkg("-P", "vmimagemanager", check=False)
        close_vm_cell(cell)
        if ours:
            site_config.unlink(missing_ok=True)
