"""The systemd units the packages ship, checked by systemd's own parser (`systemd-analyze
verify`: syntax, known settings, the ExecStart command found on systemd's PATH). Under a real
systemd (a container, with a power cut and a boot): tests/cell/test_systemd.py; their entry
points on the host's cell: `agent --once` after a simulated reboot (tests/cell/test_faults.py),
`reconcile` (test_sge.py)."""

from __future__ import annotations

import configparser
import shutil
import subprocess

import pytest

from tests.support import REPO, require

UNITS = sorted((REPO / "systemd").iterdir())


def verify(*paths) -> subprocess.CompletedProcess:
    require(shutil.which("systemd-analyze") is not None, "systemd-analyze is missing; run "
            "harness/install-deps.sh")
    return subprocess.run(["systemd-analyze", "verify", *map(str, paths)], capture_output=True,
                          text=True, timeout=60)


def test_systemd_accepts_every_shipped_unit():
    r = verify(*UNITS)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


def test_verify_rejects_a_unit_with_a_missing_command(tmp_path):
    """The check above can fail: a unit naming a command systemd cannot find."""
    bad = tmp_path / "vmimagemanager-agent.service"
    bad.write_text((REPO / "systemd" / bad.name).read_text().replace(
        "ExecStart=vmimagemanager agent", "ExecStart=vmimagemanager-not-installed agent"))
    r = verify(bad)
    assert r.returncode != 0 and "vmimagemanager-not-installed" in r.stderr, r.stderr


@pytest.mark.parametrize("unit", ["vmimagemanager-agent.service",
                                  "vmimagemanager-reconcile.service"])
def test_the_agent_and_reconcile_start_after_libvirtd(unit):
    """After a reboot the first round must find libvirtd answering: every stale lease is
    then released at once, before the first job comes."""
    parsed = configparser.ConfigParser(strict=False, interpolation=None)
    parsed.read_string((REPO / "systemd" / unit).read_text())
    after = parsed["Unit"]["After"].split()
    assert "libvirtd.service" in after and "virtqemud.service" in after
    command = parsed["Service"]["ExecStart"].split()
    assert command[0] == "vmimagemanager" and command[1] in ("agent", "reconcile")
