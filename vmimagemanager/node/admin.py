"""What an admin asks of the node's slots: their status, and a slot's disk stored as an image."""

from __future__ import annotations

import logging
import time

from ..config import UserNetwork
from ..errors import LeaseError, VmimError
from ..states import LeaseState
from .model import lease_files

log = logging.getLogger("vmimagemanager.node")


class Admin:
    """Admin operations (a part of node.Node)."""

    def store_slot(self, slot_name: str, new_image: str) -> None:
        """Save the slot's current disk as a new golden image, then release the slot."""
        lease = self.leases.get(slot_name)
        if lease is None:
            raise LeaseError(f"slot {slot_name} is free: nothing to store; 'up' it first")
        slot = self.cfg.slot(slot_name)
        self._guest_poweroff(slot, lease.job_label)
        self.hv.shutdown(slot.domain_name, self.cfg.shutdown_timeout)
        files = lease_files(self.cfg, slot_name, lease.job_label)
        self.images.store_from_disk(new_image, files.overlay, self.images.get(lease.image))
        self.end_vm(slot_name, job_label=lease.job_label)

    def status(self) -> list[dict[str, object]]:
        leases = {lease.slot: lease for lease in self.leases.all()}
        running = set(self.hv.domain_names())
        rows = []
        for slot in self.cfg.slots:
            lease = leases.get(slot.name)
            ssh = ""  # a user-network slot has a port only while its VM runs
            if slot.domain_name in running or not isinstance(slot.network, UserNetwork):
                try:
                    ssh = "{}:{}".format(*self.ssh_address(slot))
                except VmimError:  # the VM went away since the listing
                    ssh = ""
            rows.append({
                "slot": slot.name, "state": str(lease.state) if lease else "free",
                "job": lease.job_label if lease else "", "owner": lease.owner if lease else "",
                "image": lease.image if lease else "", "vo": lease.vo if lease else "",
                "cores": lease.vcpus if lease else "",
                "memory_mib": lease.memory_mib if lease else "",
                "domain": slot.domain_name if slot.domain_name in running else "",
                "ssh": ssh,
                "network": "user" if isinstance(slot.network, UserNetwork) else "bridge",
                "since": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(lease.updated))
                if lease else "",
                "spare": bool(lease and lease.is_spare) or bool(
                    lease and lease.state is LeaseState.BINDING),
                "age_s": round(time.time() - lease.created) if lease else "",
            })
        return rows
