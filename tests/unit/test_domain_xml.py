"""Domain XML built from data, checked by libvirt's own test driver (real libvirt code)."""

from __future__ import annotations

from pathlib import Path

import pytest
from lxml import etree

from tests.support import testdriver
from vmimagemanager.config import BridgeNetwork, Slot, UserNetwork
from vmimagemanager.domain_meta import QEMU_NS, lease_metadata, shares_memory
from vmimagemanager.domain_xml import DomainSpec, build_domain_xml
from vmimagemanager.images import BootSpec
from vmimagemanager.shape import Shape
from vmimagemanager.shares import GuestShare

libvirt = pytest.importorskip("libvirt")


def spec(network, **kw) -> DomainSpec:
    data = dict(slot=Slot("s1", 2, 512, network), shape=Shape(2, 512), domain_type="qemu",
                overlay=Path("/var/lib/o/s1.1.0.qcow2"), seed=Path("/var/lib/o/s1.1.0.seed.iso"),
                console_log=Path("/var/lib/s/console/s1.log"),
                boot=BootSpec(Path("/img/a.kernel"), Path("/img/a.initrd"), "console=ttyS0"),
                job_label="1.0", image="atlas", owner="atlas001")
    data.update(kw)
    return DomainSpec(**data)


def test_user_network_uses_restricted_loopback_forward():
    root = etree.fromstring(build_domain_xml(spec(UserNetwork(2222))).encode())
    args = [a.get("value") for a in root.iter(f"{{{QEMU_NS}}}arg")]
    netdev = args[args.index("-netdev") + 1]
    assert "restrict=on" in netdev
    assert "hostfwd=tcp:127.0.0.1:2222-:22" in netdev
    assert "addr=0x10" in args[args.index("-device") + 1]
    assert root.find("devices/interface") is None
    assert root.findtext("name") == "vmim-s1"
    assert root.findtext("os/kernel") == "/img/a.kernel"
    assert root.findtext("os/cmdline") == "console=ttyS0"
    assert root.find("devices/serial/source").get("path") == "/var/lib/s/console/s1.log"
    assert [d.find("target").get("dev") for d in root.findall("devices/disk")] == ["vda", "vdb"]
    assert root.find("devices/disk[2]/readonly") is not None
    assert root.find("genid") is not None and not root.findtext("genid")  # libvirt's value


def test_bridge_network_and_disk_boot():
    net = BridgeNetwork("br0", "52:54:00:aa:bb:cc", "wn01-vm1.example.org")
    root = etree.fromstring(build_domain_xml(spec(net, boot=BootSpec(),
                                                  domain_type="kvm")).encode())
    iface = root.find("devices/interface")
    assert iface.get("type") == "bridge"
    assert iface.find("source").get("bridge") == "br0"
    assert iface.find("mac").get("address") == "52:54:00:aa:bb:cc"
    assert root.find(f"{{{QEMU_NS}}}commandline") is None
    assert root.find("os/boot").get("dev") == "hd"
    assert root.find("cpu").get("mode") == "host-passthrough"
    ref = iface.find("filterref")
    assert ref.get("filter") == "clean-traffic"  # its own MAC and (DHCP-learnt) IP only
    assert [(p.get("name"), p.get("value")) for p in ref] == [("CTRL_IP_LEARNING", "dhcp")]
    fixed = BridgeNetwork("br0", "52:54:00:aa:bb:cc", "wn01-vm1.example.org", ip="192.0.2.7")
    ref = etree.fromstring(build_domain_xml(spec(fixed)).encode()).find(
        "devices/interface/filterref")
    assert [(p.get("name"), p.get("value")) for p in ref] == [("IP", "192.0.2.7")]


def test_hostile_values_are_escaped_not_injected():
    weird = Path("/var/lib/o/x'\"<disk>&.qcow2")
    xml = build_domain_xml(spec(UserNetwork(2222), overlay=weird, owner="a<b>&c"))
    root = etree.fromstring(xml.encode())
    assert root.find("devices/disk/source").get("file") == str(weird)
    assert len(root.findall("devices/disk")) == 2
    assert lease_metadata(xml)["owner"] == "a<b>&c"


def test_shares_become_9p_filesystems_guest_mounted_ones_do_not(tmp_path):
    (tmp_path / "common").mkdir()
    shares = (GuestShare("/home", "hypervisor", "home", "passthrough"),
              GuestShare(str(tmp_path / "common"), "hypervisor", "sge", "passthrough", True),
              GuestShare("/work", "guest", "work"))
    root = etree.fromstring(build_domain_xml(spec(UserNetwork(2222), shares=shares)).encode())
    fss = root.findall("devices/filesystem")
    assert len(fss) == 2
    assert fss[0].get("accessmode") == "passthrough"
    assert fss[0].find("source").get("dir") == "/home"
    assert fss[0].find("target").get("dir") == "home"
    assert fss[0].find("readonly") is None
    assert fss[1].find("readonly") is not None
    assert fss[1].find("source").get("dir") == str(tmp_path / "common")


def test_an_owners_home_is_a_virtiofs_device_on_its_servers_socket_with_shared_memory():
    """The owner's home is never a 9p export (QEMU would serve it as its own user); its
    virtiofsd's socket is the device's source, and the guest's RAM is shared with it."""
    shares = (GuestShare("/home/atlas001", "hypervisor", "v0_home", scope="owner"),)
    xml = build_domain_xml(spec(UserNetwork(2222), shares=shares, shared_memory=True,
                                home_servers=(("v0_home", "/run/vmim/vhost/1.0.v0_home.sock"),)))
    root = etree.fromstring(xml.encode())
    (fs,) = root.findall("devices/filesystem")
    assert fs.find("driver").get("type") == "virtiofs"
    assert fs.find("source").get("socket") == "/run/vmim/vhost/1.0.v0_home.sock"
    assert fs.find("source").get("dir") is None and fs.find("target").get("dir") == "v0_home"
    assert root.find("memoryBacking/source").get("type") == "memfd"
    assert root.find("memoryBacking/access").get("mode") == "shared"
    assert shares_memory(xml)
    assert not shares_memory(build_domain_xml(spec(UserNetwork(2222))))


def test_libvirt_test_driver_accepts_the_xml_and_keeps_metadata():
    conn = libvirt.open(testdriver.URI)
    try:
        xml = build_domain_xml(spec(UserNetwork(2222), domain_type="test"))
        dom = conn.createXML(xml, 0)
        assert dom.name() == "vmim-s1"
        assert dom.isActive()
        assert lease_metadata(dom.XMLDesc(0)) == {"job": "1.0", "image": "atlas",
                                                  "owner": "atlas001", "slot": "s1",
                                                  "ssh_port": "2222"}
        dom.destroy()
        assert "vmim-s1" not in [d.name() for d in conn.listAllDomains()]
    finally:
        conn.close()
