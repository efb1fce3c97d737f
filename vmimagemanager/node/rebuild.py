"""Rebuild instead of wait: a leases database that cannot be used is moved aside (kept for the
admin) and rebuilt from what libvirt says runs, since every domain carries its lease in its
metadata (domain_meta). Jobs then run again without an admin; the broken file stays in
state_dir/leases.broken-<time>/ for a post-mortem.

Order matters: libvirt is asked first (if it does not answer, nothing is moved and the job is
retried, so that no running VM is ever left without its lease), the new database is made under
another name and filled, then renamed into place, all under a lock: no process ever opens an
empty database beside running VMs, and two processes that find it broken rebuild it once.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from pathlib import Path

from ..audit import record
from ..config import DOMAIN_PREFIX, Config
from ..domain_meta import domain_shape, lease_metadata
from ..errors import LeaseDbBroken
from ..hypervisor import Hypervisor
from ..jobs import LABEL_RE
from ..leases import LeaseStore, is_spare_label
from ..shape import UNKNOWN, Shape
from ..states import LeaseState

log = logging.getLogger("vmimagemanager.node")

WAL_FILES = ("", "-wal", "-shm")  # SQLite's files of one database


def open_leases(cfg: Config, hv: Hypervisor, wait: float | None = None) -> LeaseStore:
    """The node's lease store; rebuilt from libvirt if the database cannot be used."""
    try:
        return _store(cfg, wait)
    except LeaseDbBroken as exc:
        return rebuild_leases(cfg, hv, wait, str(exc))


def _store(cfg: Config, wait: float | None, path: Path | None = None) -> LeaseStore:
    path = path or cfg.leases_db
    return LeaseStore(path) if wait is None else LeaseStore(path, wait=wait)


def rebuild_leases(cfg: Config, hv: Hypervisor, wait: float | None, why: str,
                   force: bool = False) -> LeaseStore:
    """Move the leases database aside and make a new one holding a lease for each of this
    node's running domains (`force`: even if it can be used: `reconcile --rebuild`).
    HypervisorUnavailable (the job is retried) if libvirt does not answer: nothing is moved."""
    lock_path = cfg.state_dir / "leases.rebuild.lock"
    with open(lock_path, "w") as lock:  # noqa: PTH123 - held while rebuilding
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force:
            try:  # another process rebuilt it while this one waited for the lock
                return _store(cfg, wait)
            except LeaseDbBroken:
                pass
        domains = {name: xml for name in hv.domain_names() if name.startswith(DOMAIN_PREFIX)
                   if (xml := hv.domain_xml(name)) is not None}
        fresh = cfg.leases_db.with_name(f".{cfg.leases_db.name}.rebuilding")
        for suffix in WAL_FILES:
            Path(f"{fresh}{suffix}").unlink(missing_ok=True)
        store = _store(cfg, wait, fresh)
        adopted = [line for name, xml in sorted(domains.items())
                   if (line := _adopt(cfg, store, name, xml))]
        store.close()
        kept = _move_aside(cfg.leases_db)
        os.replace(fresh, cfg.leases_db)
    actions = [f"rebuilt the leases database from libvirt ({why}); the old one is kept in "
               f"{kept}"] + adopted
    for action in actions:
        log.warning("%s", action)
        record(cfg, "reconcile", action=action)
    return _store(cfg, wait)


def _adopt(cfg: Config, store: LeaseStore, name: str, xml: str) -> str:
    """A lease for a running domain, from its metadata ('' if it names none of ours)."""
    meta = lease_metadata(xml)
    slot, label = meta.get("slot", ""), meta.get("job", "")
    if name != f"{DOMAIN_PREFIX}{slot}" or slot not in {s.name for s in cfg.slots} or \
            not LABEL_RE.fullmatch(label):
        return ""
    job_id, task_id = label.split(".", 1)
    shape = Shape(*size) if (size := domain_shape(xml)) else UNKNOWN
    state = LeaseState.SPARE if is_spare_label(label) else LeaseState.RUNNING
    store.adopt(slot, job_id, task_id, meta.get("owner", ""), meta.get("image", ""), state,
                shape)
    return f"adopted domain {name}: job {label}, {state}, {shape}"


def _move_aside(db: Path) -> Path:
    """The database's files into a directory of their own (root-only, as state_dir)."""
    kept = db.with_name(f"leases.broken-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    kept.mkdir(mode=0o700)
    for suffix in WAL_FILES:
        path = Path(f"{db}{suffix}")
        if path.exists():
            os.replace(path, kept / path.name)
    return kept
