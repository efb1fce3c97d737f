"""Which accelerator QEMU uses on this host (KVM or TCG), and QEMU's own memory beside each
guest's under it: the node's budget counts that per VM (docs/job-shapes.md)."""

from __future__ import annotations

import functools
import os

# QEMU's resident memory beside its guest's, per VM: TCG keeps a translation buffer that KVM
# does not need (docs/performance.md, "Spares by shape": measured under TCG)
VM_OVERHEAD_MIB = {"kvm": 256, "qemu": 384}


def kvm_usable(cpuinfo: str = "/proc/cpuinfo", device: str = "/dev/kvm") -> bool:
    """True only where KVM can really run guests.

    A /dev/kvm node is no proof: on nested or emulated hosts it exists while the CPU offers no
    virtualisation extensions, and QEMU with -enable-kvm then hangs.
    """
    if not os.path.exists(device) or not os.access(device, os.R_OK | os.W_OK):
        return False
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return "vmx" in flags or "svm" in flags
    except OSError:
        return False
    return False


@functools.cache
def resolve_domain_type(setting: str) -> str:
    """'auto' -> 'kvm' where KVM works, else 'qemu' (TCG); explicit settings win. Once per
    process: a hook parses its configuration (QEMU's overhead) and then boots with it."""
    if setting != "auto":
        return setting
    return "kvm" if kvm_usable() else "qemu"
