"""Which slot a starting job gets: a free one, else one whose holder died, one being torn down,
or an idle spare of another image retired for it; and what a failed start leaves to undo."""

from __future__ import annotations

import logging
import time

from ..errors import NoFreeSlot
from ..leases import Lease
from ..shape import Shape
from ..states import LeaseState
from .model import JobRequest

log = logging.getLogger("vmimagemanager.node")


TEARDOWN_WAIT = 20.0  # seconds a starting job waits for a slot whose VM is being destroyed



class Allocation:
    """Slot allocation (a part of node.Node)."""

    def _allocate(self, names: list[str], request: JobRequest, shape: Shape
                  ) -> tuple[Lease, bool]:
        """Take a slot; when none is free, first reclaim slots whose holder died (self-healing:
        a crashed prolog or epilog never costs the node a slot for longer than one job's wait),
        then wait (up to TEARDOWN_WAIT s) for a slot whose VM a live process is destroying (a
        second or two), and only then retire an idle spare of another image or shape (a boot
        thrown away), one after the other until the job's cores and memory are free.
        Another starting job may take a slot freed so first: then the next one is waited for,
        until the deadline."""
        args = (names, request.job_id, request.task_id, request.owner, request.image, request.vo)
        deadline = time.monotonic() + TEARDOWN_WAIT
        while True:
            try:
                return self.leases.allocate(*args, shape=shape, budget=self.cfg.budget)
            except NoFreeSlot:
                if time.monotonic() > deadline:
                    raise
                keep = (request.image, shape)
                if (self.reclaim_stale() or self._wait_for_teardown(names, shape, deadline)
                        or (self._spares_make_room(names, shape, keep)
                            and self.retire_spare(keep=keep))):
                    continue
                raise

    def _wait_for_teardown(self, names: list[str], shape: Shape, deadline: float) -> bool:
        """Wait until `deadline` for VMs a live process is destroying to leave room for one of
        `shape`: an epilog hands the destroy to a process of its own and returns, and the batch
        system may send the next job before that VM is gone. True once there is room."""
        while time.monotonic() < deadline:
            leases = self.leases.all()
            places = {lease.slot for lease in leases}
            if len(places & set(names)) < len(names) and not self.cfg.budget.shortfall(
                    shape, (lease.shape for lease in leases)):
                return True
            if not any(lease.state is LeaseState.TEARING_DOWN and lease.holder_alive()
                       for lease in leases):
                return False
            time.sleep(0.1)
        return False

    def _spares_make_room(self, names: list[str], shape: Shape, keep: tuple[str, Shape]
                          ) -> bool:
        """Whether retiring the idle spares not of `keep` would leave a place, the cores and
        the memory for a VM of `shape`: if not, none is destroyed for nothing (the job is
        retried, the spares stay for the jobs that fit them)."""
        leases = self.leases.all()
        spare = [lease for lease in leases if lease.is_spare and lease.state is LeaseState.SPARE
                 and (lease.image, lease.shape) != keep]
        rest = [lease for lease in leases if lease not in spare]
        return bool(spare) and len({lease.slot for lease in rest} & set(names)) < len(names) \
            and not self.cfg.budget.shortfall(shape, (lease.shape for lease in rest))

    def retire_spare(self, slot: str | None = None, keep: tuple[str, Shape] | None = None
                     ) -> str:
        """Destroy one idle spare (the one in `slot`, else the oldest not of `keep`, an image
        and shape) and free its place; returns it, or '' if there was none. A job never waits
        behind a spare it cannot bind: the cold path takes its place, cores and memory."""
        spare = self.leases.retire_spare(slot, keep)
        if spare is None:
            return ""
        self.end_vm(spare.slot, job_label=spare.job_label)
        return spare.slot

    def abandon(self, slot: str, label: str) -> None:
        """After a failed start or bind: mark the lease failed and tear everything down. A
        cleanup that cannot finish is logged (the start error is the one to report); reconcile
        finishes it."""
        try:
            current = self.leases.get(slot)
            if current is not None and current.job_label == label and current.state in (
                    LeaseState.PREPARING, LeaseState.BOOTING, LeaseState.RUNNING,
                    LeaseState.SPARE, LeaseState.BINDING):
                self.leases.transition(slot, LeaseState.FAILED, label)
            self.end_vm(slot, job_label=label)
        except Exception as cleanup:  # noqa: BLE001 - see above
            log.error("job %s slot %s: cleanup after the failed start is incomplete (%s); "
                      "reconcile finishes it", label, slot, cleanup)
