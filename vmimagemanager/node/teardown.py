"""Ending a VM: destroy the domain (after a graceful power-off when asked), remove overlay, seed
and context, free the slot; idempotent, so the epilog, down, kill and reconcile may all call
it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from glob import escape as glob_escape
from pathlib import Path

from ..agentwake import poke
from ..config import Slot, domain_name
from ..context import (
    read_root_context,
    remove_context,
)
from ..domain_meta import lease_metadata
from ..errors import LeaseError, TeardownIncomplete
from ..guest import connect
from ..homeserver import stop_servers_of
from ..jobs import check_label, job_label
from ..leases import SPARE_JOB_ID, Lease, is_spare_label
from ..states import LeaseState
from .model import EndResult, lease_files

log = logging.getLogger("vmimagemanager.node")


class Teardown:
    """Ending a VM (a part of node.Node)."""

    def end_vm(self, slot_name: str, graceful: bool = False, job_label: str | None = None,
               account: bool = True) -> bool:
        """Destroy the slot's VM and remove everything its lease made; False if nothing to do.

        With `job_label`, only that job's lease is ended (the slot may belong to a newer job by
        now). Every step is tried even when one fails; the slot is freed only once its domain is
        gone, else TeardownIncomplete says why and the lease stays for reconcile to finish.
        """
        lease = self.leases.get(slot_name)
        if lease is None or (job_label is not None and lease.job_label != job_label):
            return False
        label = lease.job_label
        # tearing-down again too: the lease then names this process as the one working on it
        self.leases.transition(slot_name, LeaseState.TEARING_DOWN, label)
        problems = []
        with self.phase("destroy"):
            try:
                self._destroy_if_ours(slot_name, label, graceful, account)
            except Exception as exc:  # noqa: BLE001 - reported below, the files still go
                problems.append(f"domain {domain_name(slot_name)} not destroyed: {exc}")
        with self.phase("cleanup"):
            files = lease_files(self.cfg, slot_name, label)
            for path in (files.overlay, files.seed, *self._spare_files(slot_name, lease)):
                try:
                    path.unlink(missing_ok=True)
                except OSError as exc:
                    problems.append(f"{path} not removed: {exc.strerror}")
            try:
                remove_context(self.cfg.run_dir, label)
            except OSError as exc:
                problems.append(f"job context of {label} not removed: {exc.strerror}")
            try:  # the VM is gone, so its file servers have let go already: only their files
                stop_servers_of(self.cfg.run_dir, label)
            except OSError as exc:
                problems.append(f"file server of {label} not stopped: {exc.strerror}")
        if problems:
            raise TeardownIncomplete(f"slot {slot_name} (job {label}): {'; '.join(problems)}; "
                                     "the slot stays tearing-down until 'vmimagemanager "
                                     "reconcile' (run by its timer) finishes it")
        try:
            self.leases.transition(slot_name, LeaseState.FREE, label)
        except LeaseError:
            log.info("slot %s was released concurrently", slot_name)
        poke(self.cfg)  # a free slot: the agent may boot a spare into it
        return True

    def _spare_files(self, slot_name: str, lease: Lease) -> list[Path]:
        """A bound spare's files under its spare name (a bind that died before renaming them):
        the slot is this lease's, so they are its own."""
        if lease.is_spare or not self.cfg.overlay_dir.is_dir():
            return []
        return sorted(self.cfg.overlay_dir.glob(f"{glob_escape(slot_name)}.{SPARE_JOB_ID}.*"))

    def end_job(self, job_id: str, task_id: str,
                detach: Callable[[str, str], int] | None = None) -> EndResult | None:
        """Epilog: end the job's VM if it has one; cleanup already done is not an error. None
        if the job left nothing here (no lease, no context).

        With `detach(slot, label)` (teardown.end_job), only what must happen before the hook
        returns is done here: the lease goes tearing-down (the slot is not free until the VM is
        gone) and the VM's usage is read; `detach` starts the destroy and cleanup in a process
        of their own and returns its pid (the lease names it from then on), or 0 and they are
        done here.
        """
        label = check_label(job_label(job_id, task_id))
        lease = self.leases.find_job(job_id, task_id)
        removed = remove_context(self.cfg.run_dir, label)
        if lease is None:
            return EndResult(None) if removed else None
        self.leases.transition(lease.slot, LeaseState.TEARING_DOWN, label)
        meta = self._our_domain(lease.slot, label)
        usage = self._account(lease.slot, label, meta) if meta is not None else None
        pid = detach(lease.slot, label) if detach is not None else 0
        if pid:
            self.leases.hand_over(lease.slot, label, pid)
        else:
            self.end_vm(lease.slot, job_label=label, account=False)
        return EndResult(lease, usage)

    def _our_domain(self, slot_name: str, label: str) -> dict[str, str] | None:
        """The lease metadata of the slot's running domain if it is this job's (or the spare it
        was bound from); None if none runs or it is another's."""
        name = domain_name(slot_name)
        xml = self.hv.domain_xml(name)
        if xml is None:
            return None
        meta = lease_metadata(xml)
        if meta.get("job") not in (None, label) and not is_spare_label(meta.get("job", "")):
            log.warning("slot %s: domain %s belongs to job %s, not %s; leaving it to reconcile",
                        slot_name, name, meta.get("job"), label)
            return None
        return meta

    def _destroy_if_ours(self, slot_name: str, label: str, graceful: bool,
                         account: bool = True) -> None:
        name = domain_name(slot_name)
        meta = self._our_domain(slot_name, label)
        if meta is None:
            return
        if account:
            self._account(slot_name, label, meta)
        if graceful:
            self._guest_poweroff(self.cfg.slot(slot_name), label)
            self.hv.shutdown(name, self.cfg.shutdown_timeout)
        else:
            self.hv.destroy(name)

    def _guest_poweroff(self, slot: Slot, label: str) -> None:
        """Ask the guest over ssh (as root, admin key) to sync its disks and power off.

        Images without an ACPI daemon ignore libvirt's shutdown request; an ssh poweroff works
        on any image we can log in to, and `sync` first keeps what an admin wrote (`store`).
        """
        try:
            host_key = read_root_context(self.cfg.run_dir, label).host_key
            session = connect(self.admin_login(slot, host_key), timeout=5)
        except Exception as exc:  # noqa: BLE001 - fall back to ACPI shutdown, then destroy
            log.info("slot %s: no ssh poweroff (%s); using ACPI shutdown", slot.name, exc)
            return
        try:
            session.check_call("sync; (sleep 1; poweroff -f || poweroff) >/dev/null 2>&1 &")
        except Exception as exc:  # noqa: BLE001 - same fallback
            log.info("slot %s: ssh poweroff failed (%s)", slot.name, exc)
        finally:
            session.close()
