"""A VM's shape (cores and memory) and the node's budget for all its VMs (docs/job-shapes.md).

A job's VM has the job's shape: the cores and memory the batch system granted it on this node.
The node gives VMs a budget of cores and memory in all; each VM also costs QEMU's own memory
(`vm_overhead_mib`), so that the host never swaps or OOM-kills for its guests. Pure arithmetic:
the lease store checks a new VM against what the node's leases hold, inside its write
transaction, so two starting jobs can never both take the last cores.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# The smallest VM a job gets, whatever it asked: below this a guest kernel does not boot.
MIN_VM_MEMORY_MIB = 128


@dataclass(frozen=True, order=True)
class Shape:
    cores: int
    memory_mib: int

    def __str__(self) -> str:
        return f"{self.cores} core{'s' if self.cores != 1 else ''} and {self.memory_mib} MiB"


# The size of a lease made by an earlier version, before leases had one (leases.ADDED_COLUMNS)
UNKNOWN = Shape(cores=0, memory_mib=0)


@dataclass(frozen=True)
class Budget:
    """What VMs may use on this node in all: `cores` vCPUs and `memory_mib` of memory, each VM
    counted with its guest memory plus `vm_overhead_mib` (QEMU's own)."""

    cores: int
    memory_mib: int
    vm_overhead_mib: int

    def cost(self, shape: Shape) -> tuple[int, int]:
        """What one VM of `shape` takes from the budget: (cores, MiB); one of unknown size
        (an earlier version's, until reconcile reads it) takes all of it."""
        if shape == UNKNOWN:
            return self.cores, self.memory_mib
        return shape.cores, shape.memory_mib + self.vm_overhead_mib

    def used(self, shapes: Iterable[Shape]) -> tuple[int, int]:
        cores = memory = 0
        for shape in shapes:
            c, m = self.cost(shape)
            cores, memory = cores + c, memory + m
        return cores, memory

    def never_fits(self, shape: Shape) -> str:
        """Why a VM of `shape` can never run on this node, even empty ('' if it can)."""
        cores, memory = self.cost(shape)
        if cores > self.cores or memory > self.memory_mib:
            return (f"it asks for {shape} (with QEMU's {self.vm_overhead_mib} MiB, {memory} MiB), "
                    f"and this node gives VMs at most {self.cores} cores and {self.memory_mib} "
                    "MiB in all")
        return ""

    def shortfall(self, shape: Shape, held: Iterable[Shape]) -> str:
        """Why a VM of `shape` does not fit beside the VMs of `held` now ('' if it fits)."""
        used_cores, used_memory = self.used(held)
        cores, memory = self.cost(shape)
        if used_cores + cores <= self.cores and used_memory + memory <= self.memory_mib:
            return ""
        return (f"not enough free cores or memory on this node for {shape} now (free: "
                f"{self.cores - used_cores} of {self.cores} cores, "
                f"{self.memory_mib - used_memory} of {self.memory_mib} MiB)")
