"""Leases in SQLite: who holds which slot, in which life-cycle state.

SQLite (WAL) is the source of truth for ownership; libvirt is the source of truth for what runs.
Allocation happens inside one BEGIN IMMEDIATE transaction, which takes the database's write lock
before reading, so two prologs racing for the last slot can never both get it. Each lease records
the pid of the process working on it, so `reconcile` can find leases whose process died mid-way.
"""

from __future__ import annotations

import functools
import logging
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import LeaseDbBroken, LeaseDbBusy, LeaseError, NoFreeSlot, NoSpace, VmimError
from .jobs import job_label
from .shape import UNKNOWN, Budget, Shape
from .states import LeaseState, check_adoption, check_transition

log = logging.getLogger("vmimagemanager.leases")

# The job id of a warm spare's lease (a spare's task id is a fresh random name): batch job ids
# are digits (batch/base.py), so no job can ever be mistaken for a spare or the other way round.
SPARE_JOB_ID = "vmim-spare"


def is_spare_label(label: str) -> bool:
    """A job label (`<job id>.<task id>`) that names a warm spare, not a batch job."""
    return label.startswith(f"{SPARE_JOB_ID}.")

SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    slot TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    task_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    image TEXT NOT NULL,
    vo TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    pid INTEGER NOT NULL,
    pid_start INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    vcpus INTEGER NOT NULL,
    memory_mib INTEGER NOT NULL,
    UNIQUE (job_id, task_id)
);
CREATE TABLE IF NOT EXISTS boot_failures (
    job_id TEXT NOT NULL,
    task_id TEXT NOT NULL,
    count INTEGER NOT NULL,
    last_error TEXT NOT NULL,
    PRIMARY KEY (job_id, task_id)
);
"""


# Columns later versions added, with their value in a lease of an earlier version's database:
# a VM of unknown size (shape.UNKNOWN), which holds the node's whole budget until reconcile
# reads its size from libvirt.
ADDED_COLUMNS = (("pid_start", 0), ("vcpus", UNKNOWN.cores), ("memory_mib", UNKNOWN.memory_mib))
DEFAULT_SHAPE = Shape(cores=1, memory_mib=512)  # what an allocation without a shape gets


@dataclass(frozen=True)
class Lease:
    slot: str
    job_id: str
    task_id: str
    owner: str
    image: str
    vo: str
    state: LeaseState
    pid: int
    pid_start: int
    created: float
    updated: float
    vcpus: int = 1
    memory_mib: int = 512

    @property
    def shape(self) -> Shape:
        """The VM's cores and memory, held from the node's budget while the lease lives."""
        return Shape(self.vcpus, self.memory_mib)

    @property
    def job_label(self) -> str:
        return job_label(self.job_id, self.task_id)

    @property
    def is_spare(self) -> bool:
        """A VM booted ahead of any job (the agent's), not yet bound to one."""
        return is_spare_label(self.job_label)

    def holder_alive(self) -> bool:
        """Is the process that made the last transition still there (the same process: a pid
        reused by another program after a crash does not count)?"""
        start = process_start(self.pid)
        return start is not None and (self.pid_start == 0 or start == self.pid_start)


def process_start(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (/proc/PID/stat field 22); None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = stat[stat.rfind(b")") + 2:].split()
    return int(fields[19])


def _guarded(method):
    """Turn sqlite3 errors into one-line errors that say what happens to the job."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            raise self._translate(exc) from None

    return wrapper


class LeaseStore:
    """Leases of one node. `wait` bounds how long a call waits for another writer's lock:
    short in the prolog (the job is retried later), longer for the epilog and the CLI."""

    def __init__(self, db_path: Path, wait: float = 60.0):
        self.db_path = db_path
        self.wait = wait
        db_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = sqlite3.connect(str(db_path), timeout=wait, isolation_level=None)
            self._conn.row_factory = sqlite3.Row
            self._conn.execute(f"PRAGMA busy_timeout={int(wait * 1000)}")
            self._conn.execute("PRAGMA journal_mode=WAL")
            # a damaged page is found now, not half-way through a job's transition
            if (found := self._conn.execute("PRAGMA quick_check(1)").fetchone()[0]) != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {found}")
            self._conn.executescript(SCHEMA)
            columns = {r["name"] for r in self._conn.execute("PRAGMA table_info(leases)")}
            for column, default in ADDED_COLUMNS:  # a database made by an earlier version
                if column not in columns:
                    self._conn.execute(f"ALTER TABLE leases ADD COLUMN {column} INTEGER NOT "
                                       f"NULL DEFAULT {default}")
        except sqlite3.Error as exc:
            raise self._translate(exc) from None
        os.chmod(db_path, 0o600)

    def _translate(self, exc: sqlite3.Error) -> VmimError:
        text = str(exc)
        if "locked" in text or "busy" in text:
            return LeaseDbBusy(f"the leases database {self.db_path} stayed locked by another "
                               f"process for {self.wait:.0f} s")
        if "full" in text:
            return NoSpace(f"no space left for the leases database {self.db_path}: free space "
                           f"in {self.db_path.parent}")
        return LeaseDbBroken(f"the leases database {self.db_path} cannot be used ({text}); "
                             "'vmimagemanager reconcile --rebuild' keeps it aside and rebuilds "
                             "it from the domains libvirt runs (the next hook does so too)")

    def close(self) -> None:
        self._conn.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    @staticmethod
    def _lease(row: sqlite3.Row) -> Lease:
        data = dict(row)
        data["state"] = LeaseState(data["state"])
        return Lease(**data)

    @_guarded
    def allocate(self, slots: Sequence[str], job_id: str, task_id: str, owner: str,
                 image: str, vo: str = "", pid: int | None = None, *,
                 shape: Shape = DEFAULT_SHAPE, budget: Budget | None = None
                 ) -> tuple[Lease, bool]:
        """Take a free place for a VM of `shape` within the node's `budget` (None: places
        only); returns (lease, created). NoFreeSlot when no place is free or the VMs there
        already hold too many cores or too much memory.

        A job that already holds a lease gets it back with created=False: running the prolog
        twice for one job is harmless.
        """
        now = time.time()
        holder = os.getpid() if pid is None else pid
        with self._write() as db:
            row = db.execute("SELECT * FROM leases WHERE job_id=? AND task_id=?",
                             (job_id, task_id)).fetchone()
            if row is not None:
                return self._lease(row), False
            held = [self._lease(r) for r in db.execute("SELECT * FROM leases")]
            taken = {lease.slot for lease in held}
            free = [s for s in slots if s not in taken]
            if not free:
                raise NoFreeSlot(f"all {len(slots)} VM places on this node are in use")
            short = budget.shortfall(shape, (lease.shape for lease in held)) if budget else ""
            if short:
                raise NoFreeSlot(short)
            check_transition(LeaseState.FREE, LeaseState.PREPARING,
                             f"job {job_label(job_id, task_id)} slot {free[0]}")
            db.execute(
                "INSERT INTO leases (slot, job_id, task_id, owner, image, vo, state, pid, "
                "pid_start, created, updated, vcpus, memory_mib) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (free[0], job_id, task_id, owner, image, vo, LeaseState.PREPARING.value,
                 holder, process_start(holder) or 0, now, now, shape.cores, shape.memory_mib))
            row = db.execute("SELECT * FROM leases WHERE slot=?", (free[0],)).fetchone()
        lease = self._lease(row)
        log.info("job %s slot %s: free -> preparing (image %s, owner %s, %s)", lease.job_label,
                 lease.slot, image, owner, shape)
        return lease, True

    @_guarded
    def transition(self, slot: str, target: LeaseState, job_label: str | None = None) -> Lease:
        """Move the slot's lease to `target`; with `job_label`, only if that job still holds it
        (a slot freed and leased again in between is somebody else's)."""
        with self._write() as db:
            row = db.execute("SELECT * FROM leases WHERE slot=?", (slot,)).fetchone()
            if row is None:
                raise LeaseError(f"slot {slot}: no lease to move to {target}")
            lease = self._lease(row)
            if job_label is not None and lease.job_label != job_label:
                raise LeaseError(f"slot {slot}: held by job {lease.job_label} now, not "
                                 f"{job_label}")
            check_transition(lease.state, target, f"job {lease.job_label} slot {slot}")
            if target is LeaseState.FREE:
                db.execute("DELETE FROM leases WHERE slot=?", (slot,))
            else:
                pid = os.getpid()
                db.execute("UPDATE leases SET state=?, pid=?, pid_start=?, updated=? "
                           "WHERE slot=?",
                           (target.value, pid, process_start(pid) or 0, time.time(), slot))
        log.info("job %s slot %s: %s -> %s", lease.job_label, slot, lease.state, target)
        return lease

    @_guarded
    def claim_spare(self, image: str, job_id: str, task_id: str, owner: str, vo: str,
                    shape: Shape | None = None) -> tuple[Lease, Lease] | None:
        """Give the job the oldest idle spare of `image` and of exactly its `shape` (None: of
        any): (the spare's lease as it was, the job's lease, now `binding`). None if there is
        none, or if the job holds a lease already.

        One write transaction: two prologs never get the same spare, and the agent (which only
        touches `spare` leases it re-reads inside its own transaction) never replaces it.
        """
        holder = os.getpid()
        with self._write() as db:
            if db.execute("SELECT 1 FROM leases WHERE job_id=? AND task_id=?",
                          (job_id, task_id)).fetchone() is not None:
                return None
            query = "SELECT * FROM leases WHERE job_id=? AND image=? AND state=?"
            params: list[object] = [SPARE_JOB_ID, image, LeaseState.SPARE.value]
            if shape is not None:
                query += " AND vcpus=? AND memory_mib=?"
                params += [shape.cores, shape.memory_mib]
            row = db.execute(query + " ORDER BY created LIMIT 1", params).fetchone()
            if row is None:
                return None
            spare = self._lease(row)
            check_transition(spare.state, LeaseState.BINDING, f"spare {spare.job_label}")
            db.execute("UPDATE leases SET job_id=?, task_id=?, owner=?, vo=?, state=?, pid=?, "
                       "pid_start=?, updated=? WHERE slot=?",
                       (job_id, task_id, owner, vo, LeaseState.BINDING.value, holder,
                        process_start(holder) or 0, time.time(), spare.slot))
            row = db.execute("SELECT * FROM leases WHERE slot=?", (spare.slot,)).fetchone()
        lease = self._lease(row)
        log.info("job %s slot %s: spare %s -> binding (image %s, owner %s)", lease.job_label,
                 lease.slot, spare.job_label, image, owner)
        return spare, lease

    @_guarded
    def retire_spare(self, slot: str | None = None, keep: tuple[str, Shape] | None = None
                     ) -> Lease | None:
        """Move one idle spare to `tearing-down` so its place, cores and memory can be used
        otherwise: the one in `slot`, or else the oldest that is not of `keep` (image, shape).
        None if there is none (it was bound or retired in the meantime)."""
        query = "SELECT * FROM leases WHERE job_id=? AND state=?"
        params: list[object] = [SPARE_JOB_ID, LeaseState.SPARE.value]
        if slot is not None:
            query, params = query + " AND slot=?", params + [slot]
        if keep is not None:
            image, shape = keep
            query += " AND NOT (image=? AND vcpus=? AND memory_mib=?)"
            params += [image, shape.cores, shape.memory_mib]
        with self._write() as db:
            row = db.execute(query + " ORDER BY created LIMIT 1", params).fetchone()
            if row is None:
                return None
            spare = self._lease(row)
            check_transition(spare.state, LeaseState.TEARING_DOWN, f"spare {spare.job_label}")
            pid = os.getpid()
            db.execute("UPDATE leases SET state=?, pid=?, pid_start=?, updated=? WHERE slot=?",
                       (LeaseState.TEARING_DOWN.value, pid, process_start(pid) or 0,
                        time.time(), spare.slot))
        log.info("spare %s slot %s: spare -> tearing-down", spare.job_label, spare.slot)
        return spare

    @_guarded
    def hand_over(self, slot: str, job_label: str, pid: int) -> None:
        """Name another process (a detached teardown) as the one working on the lease, so
        reconcile leaves it alone while that process lives."""
        with self._write() as db:
            row = db.execute("SELECT * FROM leases WHERE slot=?", (slot,)).fetchone()
            if row is None or self._lease(row).job_label != job_label:
                return
            db.execute("UPDATE leases SET pid=?, pid_start=?, updated=? WHERE slot=?",
                       (pid, process_start(pid) or 0, time.time(), slot))

    @_guarded
    def adopt(self, slot: str, job_id: str, task_id: str, owner: str, image: str,
              state: LeaseState, shape: Shape) -> None:
        """A lease for a VM that runs without one (node/rebuild.py: a database rebuilt from
        libvirt's domains); no process works on it (pid 0)."""
        check_adoption(state, f"job {job_label(job_id, task_id)} slot {slot}")
        now = time.time()
        with self._write() as db:
            db.execute(
                "INSERT INTO leases (slot, job_id, task_id, owner, image, vo, state, pid, "
                "pid_start, created, updated, vcpus, memory_mib) "
                "VALUES (?,?,?,?,?,'',?,0,0,?,?,?,?)",
                (slot, job_id, task_id, owner, image, state.value, now, now, shape.cores,
                 shape.memory_mib))

    @_guarded
    def set_shape(self, slot: str, job_label: str, shape: Shape) -> None:
        """Record the size of a lease's VM (an earlier version's lease, read from libvirt)."""
        with self._write() as db:
            row = db.execute("SELECT * FROM leases WHERE slot=?", (slot,)).fetchone()
            if row is None or self._lease(row).job_label != job_label:
                return
            db.execute("UPDATE leases SET vcpus=?, memory_mib=? WHERE slot=?",
                       (shape.cores, shape.memory_mib, slot))

    @_guarded
    def get(self, slot: str) -> Lease | None:
        row = self._conn.execute("SELECT * FROM leases WHERE slot=?", (slot,)).fetchone()
        return self._lease(row) if row else None

    @_guarded
    def find_job(self, job_id: str, task_id: str) -> Lease | None:
        row = self._conn.execute("SELECT * FROM leases WHERE job_id=? AND task_id=?",
                                 (job_id, task_id)).fetchone()
        return self._lease(row) if row else None

    @_guarded
    def all(self) -> list[Lease]:
        return [self._lease(r) for r in
                self._conn.execute("SELECT * FROM leases ORDER BY slot")]

    @_guarded
    def record_boot_failure(self, job_id: str, task_id: str, error: str) -> int:
        """Count a failed boot for a job (kept across reschedules); returns the new count."""
        with self._write() as db:
            db.execute(
                "INSERT INTO boot_failures (job_id, task_id, count, last_error) "
                "VALUES (?,?,1,?) ON CONFLICT(job_id, task_id) DO UPDATE SET "
                "count=count+1, last_error=excluded.last_error", (job_id, task_id, error))
            row = db.execute("SELECT count FROM boot_failures WHERE job_id=? AND task_id=?",
                             (job_id, task_id)).fetchone()
        return int(row["count"])

    @_guarded
    def forget_boot_failures(self, job_id: str, task_id: str) -> None:
        with self._write() as db:
            db.execute("DELETE FROM boot_failures WHERE job_id=? AND task_id=?",
                       (job_id, task_id))
