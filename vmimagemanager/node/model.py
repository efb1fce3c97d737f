"""What the node's operations take and give: a job's request, its lease's files, the phases a
start took."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..context import (
    JobContext,
)
from ..images import Image
from ..jobs import check_label, job_label
from ..leases import Lease
from ..shape import Shape

log = logging.getLogger("vmimagemanager.node")


@dataclass(frozen=True)
class JobRequest:
    """Who wants a VM, for which job, with which image."""

    job_id: str
    task_id: str
    owner: str  # the account that logs in to the guest (a pool account, or root for `up`)
    image: str
    vo: str = ""
    shape: Shape | None = None  # the VM's cores and memory (None: the VO's default, one core)

    @property
    def label(self) -> str:
        return job_label(self.job_id, self.task_id)


@dataclass(frozen=True)
class LeaseFiles:
    overlay: Path
    seed: Path
    console: Path


def lease_files(cfg: Config, slot: str, label: str) -> LeaseFiles:
    check_label(label)
    return LeaseFiles(overlay=cfg.overlay_dir / f"{slot}.{label}.qcow2",
                      seed=cfg.overlay_dir / f"{slot}.{label}.seed.iso",
                      console=cfg.state_dir / "console" / f"{slot}.log")


class PhaseTimer:
    """Wall time per life-cycle phase (benchmarks read it; logging it costs nothing)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


@dataclass(frozen=True)
class StartResult:
    """A started job's VM: its lease and context, the warm spare it was bound from or the
    snapshot it was restored from ('' when it was booted for it) and the image record the
    start checked (not read a second time)."""

    lease: Lease
    context: JobContext
    spare: str = ""
    image: Image | None = None
    snapshot: str = ""  # the snapshot it was restored from ('' if none)
    snapshot_failed: str = ""  # why a start from its snapshot failed and the VM was booted


@dataclass(frozen=True)
class EndResult:
    """An ended job's lease (its VO and image; None for a job that ran without a VM) and what
    its VM used (None: no VM was running or libvirt could not say)."""

    lease: Lease | None
    usage: dict[str, float] | None = None
