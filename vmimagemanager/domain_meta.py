"""What vmimagemanager keeps in, and reads back from, a running domain's XML.

A domain carries its lease in its metadata (the job, image, owner, slot, and the ssh forward's
port chosen at boot): libvirt is the record of what runs, never a cache of ours. Reading and
writing these few attributes needs only the standard library, so the epilog, reconcile and a
spare's bind never load lxml (domain_xml builds whole domains with it).
"""

from __future__ import annotations

import re
from xml.etree import ElementTree

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
VMIM_NS = "https://vmimagemanager.example.org/xmlns/lease/1.0"
# In a user-network domain's lease metadata: the host port its ssh forward got at boot
# (ports.py). It stays for the domain's life: a rewrite of the lease element carries it over.
SSH_PORT_KEY = "ssh_port"
HOSTFWD_RE = re.compile(r"hostfwd=tcp:[0-9.]*:(\d+)-")


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


def lease_metadata(domain_xml: str) -> dict[str, str]:
    """The vmimagemanager lease attributes stored in a running domain's XML (empty if none).

    Reading libvirt's own output needs no lxml: the stdlib parser keeps the epilog's imports lean.
    """
    root = ElementTree.fromstring(domain_xml)
    found = root.find(f"metadata/{{{VMIM_NS}}}lease")
    return dict(found.attrib) if found is not None else {}


def lease_element(attributes: dict[str, str]) -> str:
    """The lease element for libvirt's setMetadata (libvirt adds the namespace)."""
    return ElementTree.tostring(ElementTree.Element("lease", attributes), encoding="unicode")


def domain_shape(domain_xml: str) -> tuple[int, int] | None:
    """A running domain's vCPUs and memory in MiB, as libvirt reports them; None if it says
    neither."""
    root = ElementTree.fromstring(domain_xml)
    vcpu, memory = root.findtext("vcpu", ""), root.find("memory")
    units = {"KiB": 1 / 1024, "MiB": 1, "GiB": 1024, "b": 1 / (1 << 20), "bytes": 1 / (1 << 20)}
    if not vcpu.strip().isdigit() or memory is None or not (memory.text or "").strip().isdigit():
        return None
    unit = units.get(memory.get("unit", "KiB"))
    if unit is None:
        return None
    return int(vcpu), int(int(memory.text) * unit)


def shares_memory(domain_xml: str) -> bool:
    """Whether the running domain's RAM is shared (memfd): a virtiofsd can be attached."""
    access = ElementTree.fromstring(domain_xml).find("memoryBacking/access")
    return access is not None and access.get("mode") == "shared"


def virtiofs_device(tag: str, socket: str) -> str:
    """The <filesystem> of a share an external virtiofsd serves (homeserver.py): part of a cold
    VM's XML, and hot-plugged into a bound spare."""
    fs = ElementTree.Element("filesystem", {"type": "mount"})
    ElementTree.SubElement(fs, "driver", {"type": "virtiofs", "queue": "1024"})
    ElementTree.SubElement(fs, "source", {"socket": socket})
    ElementTree.SubElement(fs, "target", {"dir": tag})
    return ElementTree.tostring(fs, encoding="unicode")
