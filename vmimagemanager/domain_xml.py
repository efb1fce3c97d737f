"""libvirt domain XML, built with lxml from a slot, an image and a lease's files.

Built from data, never from string templates: values such as paths and host names are escaped by
lxml, so a strange file name can never inject XML.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from xml.etree import ElementTree

from .config import BridgeNetwork, Slot, UserNetwork
from .shares import GuestShare, hypervisor_source

if TYPE_CHECKING:
    from lxml import etree

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
VMIM_NS = "https://vmimagemanager.example.org/xmlns/lease/1.0"
# In a user-network domain's lease metadata: the host port its ssh forward got at boot
# (ports.py). It stays for the domain's life: a rewrite of the lease element carries it over.
SSH_PORT_KEY = "ssh_port"
HOSTFWD_RE = re.compile(r"hostfwd=tcp:[0-9.]*:(\d+)-")


@dataclass(frozen=True)
class BootSpec:
    """How the guest boots: from its disk, or a kernel/initrd given directly (test images)."""

    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str | None = None


@dataclass(frozen=True)
class DomainSpec:
    slot: Slot
    domain_type: str  # kvm or qemu
    overlay: Path
    seed: Path | None
    console_log: Path
    boot: BootSpec
    job_label: str
    image: str
    owner: str
    shares: tuple[GuestShare, ...] = ()  # this job's shares (resolve_shares)
    ssh_port: int | None = None  # user network: the forward's port chosen at boot (ports.py)

    @property
    def forward_port(self) -> int | None:
        """The host port of a user-network slot's ssh forward; None for a bridged slot."""
        if not isinstance(self.slot.network, UserNetwork):
            return None
        port = self.ssh_port or self.slot.network.ssh_port
        if not port:
            raise ValueError(f"slot {self.slot.name}: no port chosen for its ssh forward")
        return port


def _sub(parent: etree._Element, tag: str, text: str | None = None, **attrs: str) -> etree._Element:
    from lxml import etree  # imported where XML is built: the epilog only reads metadata

    element = etree.SubElement(parent, tag, {k.rstrip("_"): v for k, v in attrs.items()})
    if text is not None:
        element.text = text
    return element


def _disk(devices: etree._Element, path: Path, fmt: str, target: str, readonly: bool) -> None:
    disk = _sub(devices, "disk", type="file", device="disk")
    _sub(disk, "driver", name="qemu", type=fmt)
    _sub(disk, "source", file=str(path))
    _sub(disk, "target", dev=target, bus="virtio")
    if readonly:
        _sub(disk, "readonly")


def _user_network(root: etree._Element, net: UserNetwork, port: int) -> None:
    """QEMU user networking passed on the command line (libvirt 9.0 has no passt backend).

    restrict=on keeps the guest from reaching anything but the forwarded ssh port; the device sits
    at an explicit PCI address because the default slot 2 collides with other devices.
    """
    from lxml import etree

    cmdline = etree.SubElement(root, f"{{{QEMU_NS}}}commandline")
    netdev = (f"user,id=vmimnet0,restrict=on,"
              f"hostfwd=tcp:{net.listen}:{port}-:22")
    for value in ("-netdev", netdev, "-device",
                  "virtio-net-pci,netdev=vmimnet0,bus=pci.0,addr=0x10"):
        etree.SubElement(cmdline, f"{{{QEMU_NS}}}arg", value=value)


def _bridge_network(devices: etree._Element, net: BridgeNetwork) -> None:
    iface = _sub(devices, "interface", type="bridge")
    _sub(iface, "source", bridge=net.bridge)
    _sub(iface, "mac", address=net.mac)
    _sub(iface, "model", type="virtio")


def lease_attributes(job_label: str, image: str, owner: str, slot: str,
                     **extra: str) -> dict[str, str]:
    """What a domain's metadata says about its lease: the one place these names are made."""
    return {"job": job_label, "image": image, "owner": owner, "slot": slot, **extra}


def kept_attributes(meta: dict[str, str]) -> dict[str, str]:
    """What a rewrite of a domain's lease element (a spare's, at boot and at bind) must keep:
    facts fixed for the domain's life, such as its forward's port."""
    return {k: meta[k] for k in (SSH_PORT_KEY,) if k in meta}


def forwarded_port(domain_xml: str) -> int | None:
    """The host port of a running user-network domain's ssh forward, as libvirt reports it: its
    lease metadata, else (a domain started before the port was noted there) the hostfwd rule
    QEMU was started with. None if neither names one."""
    port = lease_metadata(domain_xml).get(SSH_PORT_KEY, "")
    if port.isdigit():
        return int(port)
    root = ElementTree.fromstring(domain_xml)
    for arg in root.iter(f"{{{QEMU_NS}}}arg"):
        found = HOSTFWD_RE.search(arg.get("value", ""))
        if found:
            return int(found.group(1))
    return None


def lease_element(attributes: dict[str, str]) -> str:
    """The lease element for libvirt's setMetadata (libvirt adds the namespace)."""
    from lxml import etree

    return etree.tostring(etree.Element("lease", attributes), encoding="unicode")


def exported_tags(domain_xml: str) -> dict[str, str]:
    """9p tag -> host directory of a running domain's <filesystem> exports."""
    root = ElementTree.fromstring(domain_xml)
    return {fs.find("target").get("dir", ""): fs.find("source").get("dir", "")
            for fs in root.iter("filesystem")
            if fs.find("target") is not None and fs.find("source") is not None}


def build_domain_xml(spec: DomainSpec) -> str:
    from lxml import etree

    root = etree.Element("domain", {"type": spec.domain_type}, nsmap={"qemu": QEMU_NS})
    _sub(root, "name", spec.slot.domain_name)
    metadata = _sub(root, "metadata")
    port = spec.forward_port
    noted = {SSH_PORT_KEY: str(port)} if port is not None else {}
    etree.SubElement(metadata, f"{{{VMIM_NS}}}lease", lease_attributes(
        spec.job_label, spec.image, spec.owner, spec.slot.name, **noted),
        nsmap={"vmim": VMIM_NS})
    _sub(root, "memory", str(spec.slot.memory_mib), unit="MiB")
    _sub(root, "vcpu", str(spec.slot.vcpus))

    os_el = _sub(root, "os")
    _sub(os_el, "type", "hvm", arch="x86_64", machine="pc")
    if spec.boot.kernel is not None:
        _sub(os_el, "kernel", str(spec.boot.kernel))
        if spec.boot.initrd is not None:
            _sub(os_el, "initrd", str(spec.boot.initrd))
        if spec.boot.cmdline:
            _sub(os_el, "cmdline", spec.boot.cmdline)
    else:
        _sub(os_el, "boot", dev="hd")
    features = _sub(root, "features")
    _sub(features, "acpi")
    if spec.domain_type == "kvm":
        _sub(root, "cpu", mode="host-passthrough")
    # A guest that powers off, reboots or crashes is gone: the job's VM is never reused.
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        _sub(root, event, "destroy")

    devices = _sub(root, "devices")
    # No USB controller (libvirt adds a PIIX3 UHCI by default): nothing of a batch VM uses USB,
    # and the guest kernel would probe it at every boot.
    _sub(devices, "controller", type="usb", model="none")
    _disk(devices, spec.overlay, "qcow2", "vda", readonly=False)
    if spec.seed is not None:
        _disk(devices, spec.seed, "raw", "vdb", readonly=True)
    for share in spec.shares:
        if share.mode != "hypervisor":
            continue
        fs = _sub(devices, "filesystem", type="mount", accessmode=share.accessmode)
        _sub(fs, "source", dir=hypervisor_source(share))
        _sub(fs, "target", dir=share.tag)
        if share.readonly:
            _sub(fs, "readonly")
    if isinstance(spec.slot.network, BridgeNetwork):
        _bridge_network(devices, spec.slot.network)
    serial = _sub(devices, "serial", type="file")
    _sub(serial, "source", path=str(spec.console_log))
    _sub(serial, "target", port="0")
    rng = _sub(devices, "rng", model="virtio")
    _sub(rng, "backend", "/dev/urandom", model="random")
    _sub(devices, "memballoon", model="none")
    if port is not None:
        _user_network(root, spec.slot.network, port)
    return etree.tostring(root, pretty_print=True, encoding="unicode")


def lease_metadata(domain_xml: str) -> dict[str, str]:
    """The vmimagemanager lease attributes stored in a running domain's XML (empty if none).

    Reading libvirt's own output needs no lxml: the stdlib parser keeps the epilog's imports lean.
    """
    root = ElementTree.fromstring(domain_xml)
    found = root.find(f"metadata/{{{VMIM_NS}}}lease")
    return dict(found.attrib) if found is not None else {}
