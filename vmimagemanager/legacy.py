"""`vmimagemanager config import-legacy FILE`: the original vmimagemanager's INI configuration
turned into this tool's YAML.

The original kept one `[VmImageManager]` section (where images, extracted trees, per-slot Xen
configuration files and LVM volumes lived, the bridge and the memory of each VM) and one section
per VM slot (host name, MAC, bridge, whether the slot is enabled, and the disks or partitions it
was unpacked to). Here a slot is a libvirt domain booting a copy-on-write overlay, so the network
identity and the memory carry over; where images and disks lived does not. Every key that has no
meaning any more gets one warning line that says why; the result is validated by the same code
that reads the configuration file.
"""

from __future__ import annotations

import configparser
from typing import Any

import yaml

from .accel import VM_OVERHEAD_MIB
from .config import parse_config, valid_name
from .errors import VmimError

GLOBAL = "VmImageManager"
# Keys of the original (configparser lowercases them) that have no meaning in the overlay design.
NO_MEANING = {
    "vmimages": "images are imported with 'vmimagemanager images import' into image_dir "
                "(checked by sha256); not read from a directory",
    "vmextracts": "nothing is extracted: every VM boots a copy-on-write overlay of its image",
    "vmconfdir": "libvirt domains are built from this configuration; no per-slot Xen files",
    "mount": "no image is mounted on the host: the VM gets its keys and mounts from a NoCloud "
             "seed",
    "lvmvolumegroup": "no LVM snapshots: overlays are qcow2 files in overlay_dir",
    "root": "the root disk is the job's overlay of the image, made per job",
    "swap": "no swap partition per slot: give the image a swap file if it needs one",
    "hostdisk": "slots have no disk of their own: overlays live in overlay_dir",
    "partition": "slots have no partition of their own: overlays live in overlay_dir",
}
GLOBAL_KEYS = {"bridge", "valocatedmemory"}
SLOT_KEYS = {"hostname", "mac", "bridge", "vm_slot_enabled", "valocatedmemory"}
TRUE = {"1", "yes", "true", "on", "enabled"}
FALSE = {"0", "no", "false", "off", "disabled"}


def convert(text: str, source: str) -> tuple[str, list[str]]:
    """(YAML text, warnings) for the INI `text` read from `source`; VmimError if unusable."""
    ini = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        ini.read_string(text, source)
    except configparser.Error as exc:
        raise VmimError(f"{source}: not an INI file the original vmimagemanager wrote "
                        f"({str(exc).splitlines()[0]})") from None
    if not ini.has_section(GLOBAL):
        raise VmimError(f"{source}: no [{GLOBAL}] section; is this the original "
                        "vmimagemanager's configuration?")
    warnings: list[str] = []
    top = dict(ini.items(GLOBAL))
    _warn_unknown(top, GLOBAL_KEYS, GLOBAL, warnings)
    memory = _memory(top.get("valocatedmemory"), GLOBAL, source)
    slots = []
    for section in ini.sections():
        if section == GLOBAL:
            continue
        item = dict(ini.items(section))
        _warn_unknown(item, SLOT_KEYS, section, warnings)
        enabled = item.get("vm_slot_enabled", "1").strip().lower()
        if enabled not in TRUE | FALSE:
            raise VmimError(f"{source}: [{section}] vm_slot_enabled = {enabled!r}: expected "
                            "1/0, yes/no or true/false")
        if enabled in FALSE:
            warnings.append(f"[{section}]: slot disabled (vm_slot_enabled = {enabled}); not "
                            "converted")
            continue
        slots.append(_slot(section, item, top, memory, source))
    if not slots:
        raise VmimError(f"{source}: no enabled slot section; nothing to convert")
    data: dict[str, Any] = {
        "libvirt_uri": "qemu:///system", "domain_type": "auto",
        "image_dir": "/var/lib/vmimagemanager/images",
        "overlay_dir": "/var/lib/vmimagemanager/overlays",
        "state_dir": "/var/lib/vmimagemanager/state", "run_dir": "/run/vmimagemanager",
        **_sizes(slots, memory, warnings),
        "slots": slots,
    }
    warnings.append("the original configuration maps no VO to an image: add a 'vos:' section "
                    "(until then every job is rejected with a reason, as 'unmatched: reject')")
    parse_config(data, f"{source} (converted)")  # the same validation as the real file's
    header = f"# converted from {source} by 'vmimagemanager config import-legacy'\n"
    return header + yaml.safe_dump(data, sort_keys=False, default_flow_style=None), warnings


def _sizes(slots: list[dict[str, Any]], memory: int | None, warnings: list[str]
           ) -> dict[str, Any]:
    """The original's fixed VM sizes (one core, vAlocatedMemory each) as the node's budget:
    what its slots add up to, with QEMU's overhead a VM; a job that asks for no memory gets the
    smallest slot's (so that every slot can still hold one). Each slot's own size goes (a VM
    has its job's size now), with a warning where it differed."""
    sizes = [slot.pop("memory_mib", memory or 0) for slot in slots]
    per_core = min(s for s in sizes if s) if any(sizes) else 2048
    for slot, size in zip(slots, sizes, strict=True):
        if size and size != per_core:
            warnings.append(f"[{slot['name']}] vAlocatedMemory = {size}: a VM has its job's "
                            f"memory now; a job that asks for none gets {per_core} MiB "
                            "(job_defaults.memory_per_core_mib)")
    total = sum(size or per_core for size in sizes)
    return {"node": {"cores": len(slots),
                     # every slot holds a VM under either accelerator's overhead
                     "memory_mib": total + len(slots) * max(VM_OVERHEAD_MIB.values()),
                     "vm_overhead_mib": "auto"},
            "job_defaults": {"memory_per_core_mib": per_core}}


def _warn_unknown(item: dict[str, str], known: set[str], section: str,
                  warnings: list[str]) -> None:
    for key in item:
        if key in known:
            continue
        why = NO_MEANING.get(key, "not a key of the original's that this tool knows")
        warnings.append(f"[{section}] {key}: ignored: {why}")


def _memory(raw: str | None, section: str, source: str) -> int | None:
    if raw is None:
        return None
    try:
        value = int(raw.strip().removesuffix("M").removesuffix("m"))
    except ValueError:
        value = 0
    if value <= 0:
        raise VmimError(f"{source}: [{section}] vAlocatedMemory = {raw!r}: expected a size in "
                        "MB, e.g. 2048")
    return value


def _slot(section: str, item: dict[str, str], top: dict[str, str], memory: int | None,
          source: str) -> dict[str, Any]:
    name = section.strip()
    if not valid_name(name):
        raise VmimError(f"{source}: [{section}]: not usable as a slot name (letters, digits, "
                        "'_', '.', '-')")
    missing = [k for k in ("hostname", "mac") if not item.get(k, "").strip()]
    bridge = (item.get("bridge") or top.get("bridge") or "").strip()
    if not bridge:
        missing.append("bridge (here or in [VmImageManager])")
    if missing:
        raise VmimError(f"{source}: [{section}] has no {', '.join(missing)}")
    slot: dict[str, Any] = {"name": name, "network": {
        "type": "bridge", "bridge": bridge, "mac": item["mac"].strip(),
        "hostname": item["hostname"].strip()}}
    slot_memory = _memory(item.get("valocatedmemory"), section, source) or memory
    if slot_memory is not None:
        slot["memory_mib"] = slot_memory
    return slot
