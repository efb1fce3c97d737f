"""libvirt domain XML, built with lxml from a slot, an image and a lease's files.

Built from data, never from string templates: values such as paths and host names are escaped by
lxml, so a strange file name can never inject XML.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from pathlib import Path

from lxml import etree

from .config import BridgeNetwork, Slot, UserNetwork
from .domain_meta import QEMU_NS, SSH_PORT_KEY, VMIM_NS, lease_attributes, virtiofs_device
from .images import BootSpec
from .shape import Shape
from .shares import GuestShare, hypervisor_source


@dataclass(frozen=True)
class DomainSpec:
    slot: Slot
    shape: Shape  # the job's cores and memory (the lease's)
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
    # (tag, socket) of each owner share an external virtiofsd serves (homeserver.py)
    home_servers: tuple[tuple[str, str], ...] = ()
    # guest RAM QEMU shares with a virtiofsd: needed from boot even by a spare, which gets its
    # owner's home only at bind (vhost-user maps the guest's memory)
    shared_memory: bool = False

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
    cmdline = etree.SubElement(root, f"{{{QEMU_NS}}}commandline")
    netdev = (f"user,id=vmimnet0,restrict=on,"
              f"hostfwd=tcp:{net.listen}:{port}-:22")
    for value in ("-netdev", netdev, "-device",
                  "virtio-net-pci,netdev=vmimnet0,bus=pci.0,addr=0x10"):
        etree.SubElement(cmdline, f"{{{QEMU_NS}}}arg", value=value)


def _bridge_network(devices: etree._Element, net: BridgeNetwork) -> None:
    """A site bridge, behind libvirt's clean-traffic filter: the guest sends only from its own
    MAC and IP (the slot's `ip`, else the one DHCP gives it), so it cannot pose as another slot
    or host on the bridge."""
    iface = _sub(devices, "interface", type="bridge")
    _sub(iface, "source", bridge=net.bridge)
    _sub(iface, "mac", address=net.mac)
    _sub(iface, "model", type="virtio")
    ref = _sub(iface, "filterref", filter="clean-traffic")
    if net.ip is not None:
        _sub(ref, "parameter", name="IP", value=net.ip)
    else:
        _sub(ref, "parameter", name="CTRL_IP_LEARNING", value="dhcp")


def build_domain_xml(spec: DomainSpec) -> str:
    root = etree.Element("domain", {"type": spec.domain_type}, nsmap={"qemu": QEMU_NS})
    _sub(root, "name", spec.slot.domain_name)
    metadata = _sub(root, "metadata")
    port = spec.forward_port
    noted = {SSH_PORT_KEY: str(port)} if port is not None else {}
    etree.SubElement(metadata, f"{{{VMIM_NS}}}lease", lease_attributes(
        spec.job_label, spec.image, spec.owner, spec.slot.name, **noted),
        nsmap={"vmim": VMIM_NS})
    # A VM generation ID device (libvirt picks the value): a VM restored from a memory
    # snapshot gets a new one, and its kernel reseeds its RNG; a saved VM cannot gain the device
    # at restore, so every VM has it from its boot
    _sub(root, "genid")
    _sub(root, "memory", str(spec.shape.memory_mib), unit="MiB")
    _sub(root, "vcpu", str(spec.shape.cores))
    if spec.shared_memory:
        backing = _sub(root, "memoryBacking")
        _sub(backing, "source", type="memfd")
        _sub(backing, "access", mode="shared")

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
        if share.mode != "hypervisor" or share.scope == "owner":
            continue  # an owner's home: served by its own virtiofsd (home_servers)
        fs = _sub(devices, "filesystem", type="mount", accessmode=share.accessmode)
        _sub(fs, "source", dir=hypervisor_source(share))
        _sub(fs, "target", dir=share.tag)
        if share.readonly:
            _sub(fs, "readonly")
    for tag, socket in spec.home_servers:
        devices.append(etree.fromstring(virtiofs_device(tag, socket)))
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


HOSTFWD_SSH = re.compile(r"hostfwd=tcp:[0-9.]*:\d+-:22")


# A disk's chain for a restored domain: (file, format, relabel) from the top layer down
DiskChain = tuple[tuple[Path, str, bool], ...]


def restored_domain_xml(saved_xml: str, slot: Slot, attributes: dict[str, str],
                        disks: dict[str, DiskChain], console_log: Path, ssh_port: int) -> str:
    """The XML a snapshot's saved VM is restored as (node/restore.py): libvirt's own XML of
    it, made another machine's. The slot's name, a new UUID and a new VM generation ID (the
    guest kernel reseeds its RNG when it sees it change), `attributes` as its lease
    metadata, each disk of `disks` (target dev -> its whole chain, so libvirt reads no
    backing file name from an image; a layer not to relabel is one QEMU may read and not
    own: libvirt would give it to QEMU's user), its console log and ssh forward port (on the
    slot's listen address); the saved spare's low CPU weight dropped (the VM gets a job's)."""
    root = etree.fromstring(saved_xml.encode())
    root.find("name").text = slot.domain_name
    for tag in ("uuid", "genid"):
        element = root.find(tag)
        if element is None:
            raise ValueError(f"the saved domain's XML has no <{tag}>")
        element.text = str(uuid.uuid4())
    metadata = root.find("metadata")
    if metadata is None:
        metadata = _sub(root, "metadata")
    for old in metadata.findall(f"{{{VMIM_NS}}}lease"):
        metadata.remove(old)
    etree.SubElement(metadata, f"{{{VMIM_NS}}}lease",
                     {**attributes, SSH_PORT_KEY: str(ssh_port)}, nsmap={"vmim": VMIM_NS})
    for shares in root.findall("cputune/shares"):
        shares.getparent().remove(shares)
    for disk in root.iterfind("devices/disk"):
        target = disk.find("target")
        if target is not None and target.get("dev") in disks:
            _chain(disk, disks[target.get("dev")])
    for chardev in (*root.iterfind("devices/serial"), *root.iterfind("devices/console")):
        if chardev.get("type") == "file" and chardev.find("source") is not None:
            chardev.find("source").set("path", str(console_log))
    if not isinstance(slot.network, UserNetwork) or root.find("devices/interface") is not None:
        raise ValueError("only a VM behind a user-network forward is restored")
    forwards = 0
    for arg in root.iter(f"{{{QEMU_NS}}}arg"):
        value = arg.get("value", "")
        if HOSTFWD_SSH.search(value):
            arg.set("value", HOSTFWD_SSH.sub(
                f"hostfwd=tcp:{slot.network.listen}:{ssh_port}-:22", value))
            forwards += 1
    if forwards != 1:
        raise ValueError(f"the saved domain's XML has {forwards} ssh forwards, not one")
    return etree.tostring(root, encoding="unicode")


def _chain(disk: etree._Element, chain: DiskChain) -> None:
    """Give `disk` the files of `chain`: its own source and driver format, then one
    <backingStore> each, ended by an empty one (no further backing file)."""
    for old in disk.findall("backingStore"):
        disk.remove(old)
    (top, fmt, relabel), below = chain[0], chain[1:]
    disk.find("driver").set("type", fmt)
    _source(disk.find("source"), top, relabel)
    parent = disk
    for path, layer_format, layer_relabel in below:
        store = etree.SubElement(parent, "backingStore", type="file")
        _sub(store, "format", type=layer_format)
        _source(_sub(store, "source"), path, layer_relabel)
        parent = store
    etree.SubElement(parent, "backingStore")


def _source(source: etree._Element, path: Path, relabel: bool) -> None:
    for old in source.findall("seclabel"):
        source.remove(old)
    source.set("file", str(path))
    if not relabel:
        _sub(source, "seclabel", model="dac", relabel="no")
