"""The node: its VM slots, their leases and the VMs in them.

One job a module:
- model.py: what the operations take and give (JobRequest, StartResult, EndResult, LeaseFiles);
- state.py: the node's own directories and admin key;
- allocate.py: which slot a starting job gets;
- coldboot.py: starting a VM (the cold path; a bound warm spare short-cuts it);
- spares.py: warm spares, provisioned ahead of jobs and bound to one;
- teardown.py: ending a VM; usage.py: what it used;
- reconcile.py: leases, domains and files compared, what nothing explains cleaned up;
- admin.py: status, store.

libvirt says what runs; the lease store (SQLite) says who holds what. `open_node` is the one
way a hook, the agent or the CLI opens the node.
"""

from __future__ import annotations

from ..config import Config
from ..hypervisor import Hypervisor, LibvirtHypervisor
from ..images import ImageStore
from ..leases import LeaseStore
from .admin import Admin
from .allocate import Allocation
from .coldboot import ColdBoot
from .model import EndResult, JobRequest, PhaseTimer, StartResult
from .rebuild import open_leases
from .reconcile import Reconcile
from .state import ensure_state_dirs
from .teardown import Teardown
from .usage import Usage

__all__ = ["EndResult", "JobRequest", "Node", "StartResult", "open_node"]


class Node(ColdBoot, Allocation, Teardown, Usage, Reconcile, Admin):
    """The node's slots and VMs; each part in its own module. Making one has no side effect:
    `open_node` makes the node's directories first."""

    def __init__(self, cfg: Config, hypervisor: Hypervisor, leases: LeaseStore | None = None):
        self.cfg = cfg
        self.hv = hypervisor
        self.phase = PhaseTimer()
        self.leases = leases or LeaseStore(cfg.leases_db)
        self.images = ImageStore(cfg.image_dir)


def open_node(cfg: Config, db_wait: float | None = None) -> Node:
    """The node as every front end and hook opens it: its root-only directories made (and
    root's temporary directory set), libvirt at cfg.libvirt_uri, the leases database
    (`db_wait`: how long to wait for another process's lock, if not the default)."""
    ensure_state_dirs(cfg)
    hv = LibvirtHypervisor(cfg.libvirt_uri)
    return Node(cfg, hv, open_leases(cfg, hv, db_wait))
