"""Disk-boot images: a partitioned disk with its own boot loader, imported without --kernel.

This is the form in which sites' SL/EL cloud images come. The test image (build_images.py,
`<vo>-diskboot`) has an MBR, SYSLINUX on a FAT partition with the kernel, the initramfs and the
kernel command line, and the root file system in partition 2; the VM boots it through the
firmware (SeaBIOS), as a real cloud image would.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from lxml import etree

pytestmark = pytest.mark.integration

IMAGE = "atlas-diskboot"


@pytest.fixture(scope="module")
def cli(vm_setup, guest_images):
    path = str(vm_setup[0])

    def run(*args, timeout: float = 300):
        return subprocess.run([sys.executable, "-m", "vmimagemanager.cli", "--config", path,
                               *args], capture_output=True, text=True, timeout=timeout)

    assert guest_images["images"][IMAGE]["boot"] == "disk"
    r = run("images", "import", IMAGE, str(guest_images["dir"] / f"{IMAGE}.qcow2"))
    assert r.returncode == 0, r.stderr
    yield run
    run("down", "t2")
    run("images", "remove", IMAGE)


def test_a_disk_boot_image_boots_through_its_own_boot_loader(cli, vm_setup):
    import libvirt

    rows = {row["name"]: row for row in json.loads(cli("images", "list", "--json").stdout)}
    assert rows[IMAGE]["boot"] == "disk" and rows["atlas"]["boot"] == "kernel"
    r = cli("up", "t2", "--image", IMAGE)
    assert r.returncode == 0, r.stderr
    conn = libvirt.open(vm_setup[1].libvirt_uri)
    try:
        xml = etree.fromstring(conn.lookupByName("vmim-t2").XMLDesc())
    finally:
        conn.close()
    assert xml.find("os/kernel") is None and xml.find("os/cmdline") is None
    assert xml.find("os/boot").get("dev") == "hd"
    r = cli("exec", "t2", "--", "sh", "-c",
            "cat /proc/cmdline /etc/grid-middleware-release; grep ' / ' /proc/mounts")
    assert r.returncode == 0, r.stderr
    cmdline, release, root_mount = r.stdout.splitlines()
    assert "root=/dev/vda2" in cmdline.split()  # from the image's SYSLINUX configuration
    assert release.startswith("VO=atlas ")
    assert root_mount.startswith("/dev/vda2 / ext4")
    console = (vm_setup[1].state_dir / "console" / "t2.log").read_text(errors="replace")
    assert "SYSLINUX" in console  # the boot loader's banner, on the serial console
    assert cli("down", "t2").returncode == 0


def test_images_check_passes_on_a_disk_boot_image(cli):
    r = cli("images", "check", IMAGE, timeout=600)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "FAIL" not in r.stdout, r.stdout
