"""The RPM spec (packaging/vmimagemanager.spec) builds from this tree into a package with the
commands, hooks, units and example configuration (needs only rpmbuild, no daemon). The Debian
package, installed and running a job through the real cell: tests/cell/test_packages.py."""

from __future__ import annotations

import shutil
import subprocess

from tests.support import require
from tests.support.packages import packaged_hooks, source_tree


def test_the_rpm_spec_builds_a_package_with_the_commands_hooks_units_and_example(tmp_path):
    require(shutil.which("rpmbuild") is not None, "rpmbuild is missing; run "
            "harness/install-deps.sh")
    src = source_tree(tmp_path / "src")
    r = subprocess.run(["rpmbuild", "-bb", "packaging/vmimagemanager.spec", "--nodeps",
                        "--load", "packaging/rpm-macros.debian", "--define", f"_sourcedir {src}",
                        "--define", f"_topdir {tmp_path / 'rpm'}"],
                       cwd=src, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    (rpm,) = (tmp_path / "rpm" / "RPMS" / "noarch").glob("vmimagemanager-0.1.0-1*.noarch.rpm")
    files = subprocess.run(["rpm", "-qlp", str(rpm)], capture_output=True, text=True,
                           check=True).stdout.split()
    for path in ("/usr/bin/vmimagemanager", "/usr/bin/vmim-sge-prolog",
                 "/usr/lib/vmimagemanager/sge/prolog", "/usr/lib/vmimagemanager/sge/vm.q.conf",
                 "/etc/vmimagemanager/vmimagemanager.yaml.example",
                 "/etc/logrotate.d/vmimagemanager",
                 "/usr/lib/systemd/system/vmimagemanager-agent.service",
                 "/usr/lib/systemd/system/vmimagemanager-reconcile.timer"):
        assert path in files, path
    assert not any(f.endswith("/etc/vmimagemanager/vmimagemanager.yaml") for f in files)
    config = subprocess.run(["rpm", "-qcp", str(rpm)], capture_output=True, text=True,
                            check=True).stdout.split()
    assert "/etc/vmimagemanager/vmimagemanager.yaml.example" in config  # %config(noreplace)
    requires = subprocess.run(["rpm", "-qRp", str(rpm)], capture_output=True, text=True,
                              check=True).stdout
    for name in ("python3-libvirt", "python3-lxml", "python3-pyyaml", "qemu-img", "busybox"):
        assert name in requires
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    subprocess.run(f"rpm2cpio {rpm} | cpio -idm --quiet", shell=True, cwd=unpacked, check=True)
    for hook, text in packaged_hooks(busybox="/usr/sbin/busybox").items():
        assert (unpacked / f"usr/lib/vmimagemanager/sge/{hook}").read_text() == text
