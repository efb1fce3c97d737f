"""Which slot a starting job gets: a free one, else one whose holder died, one being torn down,
or an idle spare of another image retired for it; and what a failed start leaves to undo."""

from __future__ import annotations

import logging
import time

from ..errors import NoFreeSlot
from ..leases import Lease
from ..states import LeaseState
from .model import JobRequest

log = logging.getLogger("vmimagemanager.node")


TEARDOWN_WAIT = 20.0  # seconds a starting job waits for a slot whose VM is being destroyed



class Allocation:
    """Slot allocation (a part of node.Node)."""

    def _allocate(self, names: list[str], request: JobRequest) -> tuple[Lease, bool]:
        """Take a slot; when none is free, first reclaim slots whose holder died (self-healing:
        a crashed prolog or epilog never costs the node a slot for longer than one job's wait),
        then wait (up to TEARDOWN_WAIT s) for a slot whose VM a live process is destroying (a
        second or two), and only then retire a spare of another image (a boot thrown away).
        Another starting job may take a slot freed so first: then the next one is waited for,
        until the deadline."""
        args = (names, request.job_id, request.task_id, request.owner, request.image, request.vo)
        deadline = time.monotonic() + TEARDOWN_WAIT
        while True:
            try:
                return self.leases.allocate(*args)
            except NoFreeSlot:
                if time.monotonic() > deadline:
                    raise
                if (self.reclaim_stale() or self._wait_for_teardown(names, deadline)
                        or self.retire_spare(not_image=request.image)):
                    continue
                raise

    def _wait_for_teardown(self, names: list[str], deadline: float) -> bool:
        """Wait until `deadline` for a slot whose VM a live process is destroying: an epilog
        hands the destroy to a process of its own and returns, and the batch system may send
        the next job before that VM is gone. True once some slot is free."""
        while time.monotonic() < deadline:
            leases = {lease.slot: lease for lease in self.leases.all() if lease.slot in names}
            if len(leases) < len(names):
                return True
            if not any(lease.state is LeaseState.TEARING_DOWN and lease.holder_alive()
                       for lease in leases.values()):
                return False
            time.sleep(0.1)
        return False

    def retire_spare(self, slot: str | None = None, not_image: str | None = None) -> str:
        """Destroy one idle spare (the one in `slot`, else the oldest not of `not_image`) and
        free its slot; returns the slot, or '' if there was none. A job never waits behind a
        spare of another image: the cold path takes its slot."""
        spare = self.leases.retire_spare(slot, not_image)
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
