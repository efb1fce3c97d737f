"""`vmimagemanager agent`: the node's long-running helper (warm spares and self-healing).

Each round: reconcile (the periodic self-healing), replace idle spares that are outdated (image
re-imported, changed or removed, older than spares.max_age, more than configured), then boot
spares into free slots until each image has its count; with snapshot_starts, first the memory
snapshots missing (agentsnap.py), from which the spares are then restored. It only ever touches
leases in the `spare` state (re-read inside the lease store's write transaction) and the ones
it is booting itself, so a slot a job holds is never touched. Jobs never depend on it: without
a spare the prolog boots a VM itself (the cold path).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from . import agentwake, metrics
from .agentsnap import SnapshotMaker, back_off
from .audit import record
from .config import Config
from .errors import NoFreeSlot, RetryLater, VmimError
from .files import read_private_json, replace_private_file
from .flow import NOT_BOOT_FAILURES
from .health import back_in_service, failing, reason, run_checks
from .jobs import JOB_ID_RE
from .leases import Lease
from .metrics import cause_of
from .node import Node
from .node.spares import provision_spare
from .rootenv import interrupt_on_sigterm
from .shape import Shape
from .states import LeaseState

log = logging.getLogger("vmimagemanager.agent")

BACKOFF_FIRST = 30.0  # seconds before an image whose spare failed to boot is tried again
BACKOFF_MAX = 900.0
# in state_dir: the running leases whose job the batch system did not know last round
JOBS_MISSING = "jobs-missing.json"


class Scheduling(Protocol):
    """The batch system's side of taking this node out of scheduling for VM jobs and back
    (batch/service.py, given by the front end: the core never imports an adapter)."""

    def take_out(self, cfg: Config, reason: str) -> list[str]: ...

    def put_back(self, cfg: Config) -> list[str]: ...

    def out_of_service(self, cfg: Config) -> dict: ...

    def live_jobs(self, cfg: Config, job_ids: set[str]) -> set[str] | None: ...


@dataclass
class Agent:
    """`make_life` gives each boot its own life cycle (a lease-store and a libvirt connection of
    its own): spares boot in parallel threads, up to `parallel` at once, while rounds go on."""

    life: Node
    make_life: Callable[[], Node]
    parallel: int = field(default_factory=lambda: os.cpu_count() or 1)
    # (image, shape): until, delay
    backoff: dict[tuple[str, Shape], tuple[float, float]] = field(default_factory=dict)
    booting: dict[Future, tuple[str, Shape]] = field(default_factory=dict)  # boot -> its kind
    pool: ThreadPoolExecutor | None = None
    scheduling: Scheduling | None = None  # None: the checks are kept and reported, no action
    # boot thread -> the label of the lease it works on (set once allocated, gone when done)
    working: dict[int, str] = field(default_factory=dict)
    working_lock: threading.Lock = field(default_factory=threading.Lock)
    snapshots: SnapshotMaker | None = None  # snapshot_starts: set by __post_init__

    def __post_init__(self) -> None:
        if self.life.cfg.snapshot_starts:
            self.snapshots = SnapshotMaker(self.make_life, self._working)

    def _working(self, lease: Lease | None) -> None:
        """Note (or, None: forget) the lease this boot thread works on (`abandoned`)."""
        with self.working_lock:
            if lease is None:
                self.working.pop(threading.get_ident(), None)
            else:
                self.working[threading.get_ident()] = lease.job_label

    def round(self) -> list[str]:
        """One round; returns what was done, one line each. The node's health is checked
        last, whatever failed before (libvirtd down ends the round early)."""
        actions = self._collect() + (self.snapshots.collect() if self.snapshots else [])
        try:
            actions += self.life.reconcile(abandoned=self.abandoned(self.life.leases.all()))
            actions += self._end_jobs_gone()
            actions += self._replace_outdated()
            self._fill()  # what it starts is reported by _collect once done
        finally:
            for line in self._health():
                log.warning("agent: %s", line)
            metrics.observe(self.life.cfg)  # the gauges, fresh each round
        return actions

    def _health(self) -> list[str]:
        """Take the node out of scheduling for VM jobs while a node check fails; put it back
        once they have all passed for health.back_after (batch/service.py); each change in the
        audit trail."""
        cfg, switch = self.life.cfg, self.scheduling
        results = run_checks(self.life)
        if switch is None:
            done = []
        elif failing(results):
            done = switch.take_out(cfg, reason(results))
        elif switch.out_of_service(cfg) and back_in_service(results, cfg.health.back_after,
                                                             time.time()):
            done = switch.put_back(cfg)
        else:
            done = []
        for line in done:
            record(cfg, "health", action=line)
        return done

    def _end_jobs_gone(self) -> list[str]:
        """Tear down the VMs of running leases whose batch job the batch system has not known
        in two answers in a row, health.gone_after seconds apart at least (its epilog never
        ran or could not end the lease: `qdel -f`, a lost execd, the database unreachable).
        Only batch jobs' leases: an admin's `up` VM or an image check has no job to ask
        about. The leases are read before the batch system is asked: a job that starts
        meanwhile is known to it already."""
        cfg, switch = self.life.cfg, self.scheduling
        running = [lease for lease in self.life.leases.all()
                   if lease.state is LeaseState.RUNNING and JOB_ID_RE.fullmatch(lease.job_id)]
        path = cfg.state_dir / JOBS_MISSING
        if switch is None or not running:
            path.unlink(missing_ok=True)
            return []
        try:
            alive = switch.live_jobs(cfg, {lease.job_id for lease in running})
        except Exception as exc:  # noqa: BLE001 - the round goes on; nothing is torn down
            log.error("agent: asking the batch system which jobs it knows failed: %s", exc)
            return []
        if alive is None:
            return []
        # job label -> when the batch system first did not know it
        before = {label: since for label, since in read_private_json(path).items()
                  if isinstance(since, float)}
        now = time.time()
        missing = {lease.job_label: before.get(lease.job_label, now) for lease in running
                   if lease.job_id not in alive}
        gone = [lease for lease in running if lease.job_label in missing.keys() & before
                and now - missing[lease.job_label] >= cfg.health.gone_after]
        for lease in gone:
            del missing[lease.job_label]
        replace_private_file(path, json.dumps(missing).encode())
        return [self._end_gone(lease, now - before[lease.job_label]) for lease in gone]

    def _end_gone(self, lease: Lease, seconds: float) -> str:
        action = (f"tear down the VM of job {lease.job_label} in slot {lease.slot}: the batch "
                  f"system has not known its job for two rounds ({seconds:.0f} s)")
        try:
            self.life.end_vm(lease.slot, job_label=lease.job_label)
        except VmimError as exc:
            action += f" (incomplete: {exc})"
        record(self.life.cfg, "reconcile", lease.job_label, action=action)
        return action

    def abandoned(self, leases: list[Lease]) -> frozenset[tuple[str, str]]:
        """(slot, job label) of the tearing-down leases this agent holds and no boot of its
        works on: a start or a retirement whose teardown failed (libvirtd down). Nothing else
        finishes them while the agent lives: reconcile leaves a lease whose holder is alive."""
        with self.working_lock:
            busy = set(self.working.values())
        me = os.getpid()
        return frozenset((lease.slot, lease.job_label) for lease in leases
                         if lease.pid == me and lease.state is LeaseState.TEARING_DOWN
                         and lease.job_label not in busy)

    def wait(self) -> list[str]:
        """Let the boots under way finish (agent --once, shutdown)."""
        for future in list(self.booting):
            future.exception()
        return self._collect() + (self.snapshots.wait() if self.snapshots else [])

    def outdated(self, lease: Lease, idle_of_kind: int, now: float) -> str:
        """Why an idle spare must go ('' if it may stay). `idle_of_kind` counts the idle
        spares of its image and shape older than it, so only the surplus ones are retired."""
        spares = self.life.cfg.spares
        try:
            image = self.life.images.get(lease.image)
            self.life.images.check_unchanged(image)
        except VmimError as exc:
            return f"its image cannot be used any more ({exc})"
        if image.imported_at > lease.created:
            return f"image {lease.image} was imported again after the spare booted"
        if idle_of_kind >= spares.count(lease.image, lease.shape):
            return f"more idle spares of {lease.image} with {lease.shape} than configured"
        if now - lease.created > spares.max_age:
            return f"older than spares.max_age ({spares.max_age:.0f} s)"
        return ""

    def _replace_outdated(self) -> list[str]:
        actions, seen, now = [], {}, time.time()
        idle = [lease for lease in self.life.leases.all()
                if lease.is_spare and lease.state is LeaseState.SPARE]
        for lease in sorted(idle, key=lambda lease: lease.created):
            kind = (lease.image, lease.shape)
            reason = self.outdated(lease, seen.get(kind, 0), now)
            if not reason:
                seen[kind] = seen.get(kind, 0) + 1
                continue
            if self.life.retire_spare(slot=lease.slot):
                actions.append(f"retired spare {lease.job_label} in slot {lease.slot}: {reason}")
        return actions

    def _fill(self) -> None:
        """Start boots so that each image and shape has its count (idle + booting); never more
        boots at once than `parallel`, nor than free places, cores and memory (a spare never
        takes what a job holds; the lease store checks it again)."""
        leases = self.life.leases.all()
        cfg = self.life.cfg
        free = len(cfg.slots) - len(leases)
        held = [lease.shape for lease in leases]
        if self.snapshots is not None:  # first: the spares are restored from them
            def room(shape: Shape) -> bool:
                nonlocal free, held
                if (free <= 0 or self._boots() >= self.parallel
                        or cfg.budget.shortfall(shape, held)):
                    return False
                free, held = free - 1, held + [shape]
                return True

            self.snapshots.start(self.life, self._submit, room)
        for image, shape, wanted in cfg.spares.counts:
            kind = (image, shape)
            if time.monotonic() < self.backoff.get(kind, (0.0, 0.0))[0]:
                continue
            if self.snapshots is not None and self.snapshots.busy(kind):
                continue  # its spares are restored once the snapshot is made
            idle = sum(1 for lease in leases if lease.is_spare and lease.image == image
                       and lease.shape == shape and lease.state is LeaseState.SPARE)
            coming = idle + sum(1 for k in self.booting.values() if k == kind)
            while (coming < wanted and free > 0 and self._boots() < self.parallel
                   and not cfg.budget.shortfall(shape, held)):
                self.booting[self._submit(lambda i=image, s=shape: self._provision(i, s))] = kind
                coming, free, held = coming + 1, free - 1, held + [shape]

    def _boots(self) -> int:
        return len(self.booting) + (len(self.snapshots.making) if self.snapshots else 0)

    def _submit(self, work: Callable[[], object]) -> Future:
        if self.pool is None:
            self.pool = ThreadPoolExecutor(self.parallel, "vmim-spare-boot")
        return self.pool.submit(work)

    def _provision(self, image: str, shape: Shape) -> Lease:
        vo = next((rule.name for rule in self.life.cfg.vos if rule.image == image), "")
        life = self.make_life()
        try:
            lease = provision_spare(life, image, vo, shape, self._working)
        except NoFreeSlot:
            raise
        except Exception as exc:
            cause = cause_of(exc) if isinstance(exc, NOT_BOOT_FAILURES) else "boot_failed"
            record(life.cfg, "spare", outcome="failed", image=image, vo=vo, cause=cause,
                   cores=shape.cores, memory_mib=shape.memory_mib, reason=str(exc))
            raise
        else:
            record(life.cfg, "spare", lease.job_label, outcome="ready", image=image, vo=vo,
                   slot=lease.slot, cores=shape.cores, memory_mib=shape.memory_mib,
                   phases={k: round(v, 3) for k, v in life.phase.seconds.items()})
            return lease
        finally:
            self._working(None)
            life.leases.close()
            life.hv.close()

    def _collect(self) -> list[str]:
        actions = []
        for future in [f for f in self.booting if f.done()]:
            kind = self.booting.pop(future)
            image, shape = kind
            exc = future.exception()
            if exc is None:
                self.backoff.pop(kind, None)
                lease = future.result()
                actions.append(f"spare {lease.job_label} of {image} ready in slot {lease.slot}")
            elif isinstance(exc, NoFreeSlot):
                pass  # a job took the last slot first: jobs come first
            else:
                delay = back_off(self.backoff, kind, BACKOFF_FIRST, BACKOFF_MAX)
                actions.append(f"spare of {image} ({shape}) failed, next try in {delay:.0f} s: "
                               f"{exc}")
        return actions


def run(life: Node, make_life: Callable[[], Node], once: bool = False,
        interval: float | None = None, scheduling: Scheduling | None = None) -> int:
    """The agent's main loop; one instance per node (a lock in the state directory)."""
    lock_path = life.cfg.state_dir / "agent.lock"
    lock = open(lock_path, "w")  # noqa: SIM115 - held for the process's life
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise VmimError(f"another vmimagemanager agent runs on this node ({lock_path} is "
                        "locked); stop it first") from None
    interrupt_on_sigterm()
    agent = Agent(life, make_life, scheduling=scheduling)
    pause = interval or life.cfg.spares.interval
    wake = None if once else agentwake.listen(life.cfg)
    try:
        while True:
            try:
                actions = agent.round()
                if once:
                    actions += agent.wait()
                for action in actions:
                    log.info("agent: %s", action)
            except RetryLater as exc:  # libvirtd down, database busy: try again next round
                log.warning("agent: round skipped: %s", exc)
            except VmimError as exc:
                log.error("agent: round failed: %s", exc)
                if once:
                    return 1
            if once:
                return 0
            agentwake.wait(wake, pause)
    except KeyboardInterrupt:
        # Boots under way are finished (a half-booted spare would only be reclaimed later).
        for action in agent.wait():
            log.info("agent: %s", action)
        log.info("agent: stopped; idle spares stay for the next agent or job")
        return 0
    finally:
        if agent.pool is not None:
            agent.pool.shutdown(wait=True)
        if wake is not None:
            os.close(wake)
        lock.close()
