"""Reconciliation: leases (who holds what), libvirt domains (what runs) and files compared; what no
live lease explains is cleaned up."""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..audit import record
from ..config import DOMAIN_PREFIX, domain_name
from ..context import (
    context_dir,
    list_contexts,
    read_root_context,
    remove_context,
    root_context_path,
)
from ..domain_meta import domain_shape, lease_metadata
from ..errors import TeardownIncomplete, VmimError
from ..homeserver import servers_of, stop_servers_of
from ..leases import Lease, is_spare_label
from ..shape import UNKNOWN, Shape
from ..states import LeaseState
from .model import lease_files

log = logging.getLogger("vmimagemanager.node")


TRANSIENT = (LeaseState.PREPARING, LeaseState.BOOTING, LeaseState.BINDING,
             LeaseState.TEARING_DOWN)
CONTEXT_GRACE = 3600.0  # seconds a lease-less (native/reject) job context is kept for its job



@dataclass(frozen=True)
class Known:
    """What reconcile knows beside the leases: the configured slots, and the slots whose
    tearing-down lease names a live holder that works on it no more (the agent's own: a
    spare whose start failed while libvirtd was down; its holder stays alive for days)."""

    slots: frozenset[str]
    abandoned: frozenset[tuple[str, str]] = frozenset()  # (slot, job label)


# When a lease is stale (nothing live explains it), first match wins: (rule, reason). The
# checks are ordered cheapest first; the last asks libvirt.
STALE_RULES = (
    (lambda node, lease, known: lease.slot not in known.slots, "slot is no longer configured"),
    (lambda node, lease, known: lease.state is LeaseState.FAILED,
     "a start failed and was not cleaned up"),
    (lambda node, lease, known: lease.state is LeaseState.TEARING_DOWN
     and (lease.slot, lease.job_label) in known.abandoned and lease.pid == os.getpid(),
     "its holder (pid {pid}, the agent) works on it no more"),
    (lambda node, lease, known: lease.state in TRANSIENT and not lease.holder_alive(),
     "the process (pid {pid}) that was {state} it died"),
    (lambda node, lease, known: lease.state in (LeaseState.RUNNING, LeaseState.SPARE)
     and not node.hv.is_running(domain_name(lease.slot)), "its VM is not running"),
)


class Reconcile:
    """Reconciliation (a part of node.Node)."""

    def reclaim_stale(self, dry_run: bool = False) -> list[str]:
        """End the leases no live process or VM explains (holder died, start failed, VM gone)."""
        return list(self._reclaim(dry_run).values())

    def _reclaim(self, dry_run: bool, abandoned: frozenset[tuple[str, str]] = frozenset()
                 ) -> dict[str, str]:
        """reclaim_stale's work: slot -> what was done (or would be) about its lease."""
        actions: dict[str, str] = {}
        known = Known(frozenset(s.name for s in self.cfg.slots), abandoned)
        for lease in self.leases.all():
            reason = self._stale_reason(lease, known)
            if not reason:
                continue
            actions[lease.slot] = f"release slot {lease.slot} (job {lease.job_label}): {reason}"
            if dry_run:
                continue
            try:
                if lease.slot in known.slots:
                    self.end_vm(lease.slot, job_label=lease.job_label)
                else:
                    self._forget_unknown_slot(lease)
            except TeardownIncomplete as exc:
                actions[lease.slot] += f" (incomplete: {exc})"
        for action in actions.values():
            log.info("reconcile%s: %s", " (dry run)" if dry_run else "", action)
        return actions

    def _size_earlier_leases(self, live: dict[str, Lease], xmls: dict[str, str],
                             dry_run: bool) -> list[str]:
        """A lease an earlier version made has no size (it holds the node's whole budget):
        its running domain's vCPUs and memory, as libvirt says, become its size."""
        done = []
        for slot, lease in live.items():
            xml = xmls.get(domain_name(slot))
            if lease.shape != UNKNOWN or xml is None or \
                    lease_metadata(xml).get("job") != lease.job_label:
                continue
            if (size := domain_shape(xml)) is None:
                continue
            done.append(f"sized lease {lease.job_label} in slot {slot}: {Shape(*size)} (from "
                        "its domain)")
            if not dry_run:
                self.leases.set_shape(slot, lease.job_label, Shape(*size))
        return done

    def reconcile(self, dry_run: bool = False,
                  abandoned: frozenset[tuple[str, str]] = frozenset()) -> list[str]:
        """Compare leases, libvirt domains and files; clean up what no live lease explains.
        `abandoned`: see Known (the agent's, for the leases it holds itself).

        Safe beside running hooks: domains, files and contexts are listed *before* the leases
        are read, and a prolog takes its lease before it makes any of them, so whatever a
        starting job owns is always explained by a lease read here.
        """
        # lazy: every hook opens the node, which holds this module; only a reconcile needs it
        from .snapshots import SNAPSHOTS

        # only this configuration's slots: another configuration's VMs on the same libvirtd
        # (a second node's set-up, the demo beside the tests) are not ours to destroy
        ours = {slot.domain_name for slot in self.cfg.slots}
        xmls = {name: xml for name in self.hv.domain_names()
                if name in ours and (xml := self.hv.domain_xml(name)) is not None}
        domains = {name: lease_metadata(xml) for name, xml in xmls.items()}
        files = sorted(p for p in self.cfg.overlay_dir.iterdir() if p.name != SNAPSHOTS
                       ) if self.cfg.overlay_dir.is_dir() else []
        contexts = list_contexts(self.cfg.run_dir)
        servers = servers_of(self.cfg.run_dir)
        leases = {lease.slot: lease for lease in self.leases.all()}
        released = self._reclaim(dry_run, abandoned)
        actions = list(released.values())
        live = {s: lease for s, lease in leases.items() if s not in released}
        more = self._size_earlier_leases(live, xmls, dry_run)
        for name, meta in domains.items():
            lease = live.get(name.removeprefix(DOMAIN_PREFIX))
            # A job lease on a domain still labelled as a spare: bound while this ran (the
            # metadata was read before the lease).
            if lease is None or (meta.get("job") != lease.job_label and not (
                    not lease.is_spare and is_spare_label(meta.get("job", "")))):
                more.append(f"destroy domain {name}: no lease holds it")
                if not dry_run:
                    self.hv.destroy(name)
        more += self._orphan_files(files, leases, dry_run)
        labels = {lease.job_label for lease in leases.values()}
        # A spare being bound has its job's label already, while the bind still uses the login
        # the agent kept in the spare's own directory: those wait until no bind is under way.
        binding = any(lease.state is LeaseState.BINDING for lease in live.values())
        for label in contexts:
            if label in labels or (binding and is_spare_label(label)):
                continue
            if self._context_orphaned(label):
                more.append(f"remove orphan job context {context_dir(self.cfg.run_dir, label)}")
                if not dry_run:
                    remove_context(self.cfg.run_dir, label)
        for label in sorted(servers):  # a prolog starts a job's server after taking its lease
            if label not in labels:
                more.append(f"stop the orphan file server of job {label}")
                if not dry_run:
                    stop_servers_of(self.cfg.run_dir, label)
        for action in more:
            log.info("reconcile%s: %s", " (dry run)" if dry_run else "", action)
        if not dry_run:
            for action in actions + more:
                record(self.cfg, "reconcile", action=action)
        return actions + more

    def _orphan_files(self, files: list[Path], leases: dict[str, Lease],
                      dry_run: bool) -> list[str]:
        """Remove the files in overlay_dir (`files`, listed before the leases were read) that
        no lease names, and the snapshot directories a process was making or removing when
        it died."""
        from .snapshots import unfinished  # lazy: see reconcile

        done, live = [], set()
        for lease in leases.values():  # a released lease's files went with it (or will)
            f = lease_files(self.cfg, lease.slot, lease.job_label)
            live |= {f.overlay.name, f.seed.name}
            live |= {p.name for p in self._spare_files(lease.slot, lease)}
        for path in files:
            if path.name not in live:
                done.append(f"remove orphan file {path}")
                if not dry_run:
                    path.unlink(missing_ok=True)
        for path in unfinished(self.cfg):
            done.append(f"remove unfinished snapshot directory {path}")
            if not dry_run:
                shutil.rmtree(path, ignore_errors=True)
        return done

    def _context_orphaned(self, label: str) -> bool:
        """A VM job's context without a lease is an orphan. A native or reject job has no
        lease: its context is the prolog's word to the starter, removed by the epilog; only
        one older than CONTEXT_GRACE (its epilog never ran) is an orphan."""
        path = root_context_path(self.cfg.run_dir, label)
        try:
            if read_root_context(self.cfg.run_dir, label).mode == "vm":
                return True
            return time.time() - path.stat().st_mtime > CONTEXT_GRACE
        except (VmimError, OSError, TypeError):  # unreadable or half-written: not ours to keep
            return True

    def _stale_reason(self, lease: Lease, known: Known) -> str:
        """The first rule of STALE_RULES the lease meets (its reason), or '' if it is live."""
        for applies, reason in STALE_RULES:
            if applies(self, lease, known):
                return reason.format(pid=lease.pid, state=lease.state)
        return ""

    def _forget_unknown_slot(self, lease: Lease) -> None:
        self.hv.destroy(domain_name(lease.slot))
        files = lease_files(self.cfg, lease.slot, lease.job_label)
        files.overlay.unlink(missing_ok=True)
        files.seed.unlink(missing_ok=True)
        remove_context(self.cfg.run_dir, lease.job_label)
        if lease.state is not LeaseState.TEARING_DOWN:
            self.leases.transition(lease.slot, LeaseState.TEARING_DOWN, lease.job_label)
        self.leases.transition(lease.slot, LeaseState.FREE, lease.job_label)
