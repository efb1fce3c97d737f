"""The VM life cycle of one lease, and reconciliation of leases, domains and files.

start_vm walks a lease through free -> preparing -> booting -> running; any failure on the way
tears everything down again (domain, overlay, seed, keys, context, lease row) before the error
goes up, so a failed boot leaves nothing behind. end_vm is idempotent: the epilog, `down`, `kill`
and `reconcile` can all call it, in any order, as often as they like.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from glob import escape as glob_escape
from pathlib import Path

from .accounts import account
from .agentwake import poke
from .config import DOMAIN_PREFIX, Config, Slot, UserNetwork, domain_name
from .context import (
    JobContext,
    context_dir,
    list_contexts,
    read_root_context,
    remove_context,
    root_context_path,
    write_context,
)
from .domain_xml import DomainSpec, build_domain_xml, lease_metadata
from .errors import (
    ConfigError,
    LeaseError,
    NoFreeSlot,
    NoSpace,
    TeardownIncomplete,
    VmimError,
)
from .files import append_line, write_private_file
from .hypervisor import Hypervisor, LibvirtHypervisor, resolve_domain_type
from .images import Image, ImageStore, prepare_overlay
from .jobs import check_label, job_label
from .leases import SPARE_JOB_ID, Lease, LeaseStore, is_spare_label
from .rootenv import use_private_tmp
from .seed import SeedData, build_seed, generate_keypair, public_key_line
from .shares import GuestShare, resolve_shares, seed_mounts
from .states import LeaseState

log = logging.getLogger("vmimagemanager.lifecycle")

ADMIN_KEY = "admin_ed25519"
TRANSIENT = (LeaseState.PREPARING, LeaseState.BOOTING, LeaseState.BINDING,
             LeaseState.TEARING_DOWN)
CONTEXT_GRACE = 3600.0  # seconds a lease-less (native/reject) job context is kept for its job
TEARDOWN_WAIT = 20.0  # seconds a starting job waits for a slot whose VM is being destroyed
# What a warm spare used before its job came: subtracted from the job's VM usage (accounting).
IDLE_FIGURES = ("cpu_seconds", "user_seconds", "system_seconds")


@dataclass(frozen=True)
class JobRequest:
    """Who wants a VM, for which job, with which image."""

    job_id: str
    task_id: str
    owner: str  # the account that logs in to the guest (a pool account, or root for `up`)
    image: str
    vo: str = ""

    @property
    def label(self) -> str:
        return job_label(self.job_id, self.task_id)


# (life cycle, request, uid, gid, shares) -> the bound lease and context, or None
SpareBinder = Callable[["LifeCycle", JobRequest, int, int, tuple[GuestShare, ...]],
                       "tuple[Lease, JobContext] | None"]


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


def ensure_state_dirs(cfg: Config) -> None:
    """Root-only directories (0700/0711); created on first use with the right modes. Root's
    temporary files go to run_dir/tmp from here on (rootenv.use_private_tmp)."""
    for path, mode in ((cfg.state_dir, 0o700), (cfg.state_dir / "keys", 0o700),
                       (cfg.state_dir / "console", 0o700), (cfg.overlay_dir, 0o711)):
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, mode)
    use_private_tmp(cfg.run_dir)


def admin_key(cfg: Config) -> tuple[Path, str]:
    """The key root uses to log in to every guest: the site's, or the node's own, made at
    install time (`ensure_admin_key`), never by a job's hook."""
    path = cfg.site_root_key or cfg.state_dir / "keys" / ADMIN_KEY
    if not path.exists():  # the node's set-up, not the VM's boot: the job is held, not counted
        raise ConfigError(f"no admin key {path}: run 'vmimagemanager admin-key' once on this "
                          "node (install-queue and install-hooks do it)")
    return path, f"{public_key_line(path)} vmimagemanager-admin"


def ensure_admin_key(cfg: Config) -> Path:
    """Make the node's admin key if there is none (installers, the agent, admin commands)."""
    ensure_state_dirs(cfg)
    path = cfg.site_root_key or cfg.state_dir / "keys" / ADMIN_KEY
    if not path.exists():
        # Two installers at once: the key is written whole under a name of its own and linked
        # into place, so the one that loses the race uses the winner's key, never half of one.
        pair = generate_keypair(f"vmimagemanager-admin@{os.uname().nodename}")
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        write_private_file(tmp, pair.private_openssh)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path


def open_node(cfg: Config, db_wait: float | None = None) -> LifeCycle:
    """The node as every front end and hook opens it: libvirt at cfg.libvirt_uri and the
    leases database (`db_wait`: how long to wait for another process's lock, if not the
    default)."""
    leases = LeaseStore(cfg.leases_db) if db_wait is None else LeaseStore(cfg.leases_db,
                                                                          wait=db_wait)
    return LifeCycle(cfg, LibvirtHypervisor(cfg.libvirt_uri), leases)


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


class LifeCycle:
    """Starts and ends lease VMs; libvirt says what runs, the lease store says who holds what."""

    def __init__(self, cfg: Config, hypervisor: Hypervisor, leases: LeaseStore | None = None):
        self.cfg = cfg
        self.hv = hypervisor
        self.phase = PhaseTimer()
        ensure_state_dirs(cfg)
        self.leases = leases or LeaseStore(cfg.leases_db)
        self.images = ImageStore(cfg.image_dir)
        self.usage: dict[str, dict[str, float]] = {}  # job label -> what its VM used (end_vm)
        self.bound_spare = ""  # the spare the last start_vm bound ('' when it booted a VM)
        self.started_image: Image | None = None  # the image record the last start_vm used
        self.ended_lease: Lease | None = None  # the lease the last end_job ended (VO, image)

    # -- start ----------------------------------------------------------------------------------
    def start_vm(self, request: JobRequest, slots: list[str] | None = None,
                 boot_timeout: float | None = None, bind: SpareBinder | None = None
                 ) -> tuple[Lease, JobContext]:
        """Lease a slot and boot the request's image in it; returns when ssh answers.

        `bind` (spares.bind_spare) is tried first: it gives the job an idle warm spare, or None
        and the VM is booted here (the cold path)."""
        check_label(request.label)
        image = self.images.get(request.image)  # ImageError before any slot is taken
        self.images.check_unchanged(image)
        self.started_image = image
        owner = account(request.owner)
        uid, gid = owner.uid, owner.gid
        shares = resolve_shares(self.cfg.shared_paths, request.owner)  # ShareError, likewise
        self.hv.connect()  # libvirtd down: the job is retried later, no slot taken
        names = slots or [s.name for s in self.cfg.slots]
        self.bound_spare = ""
        if bind is not None and slots is None:
            bound = bind(self, request, uid, gid, shares)
            if bound is not None:
                return bound
        with self.phase("lease"):
            lease, created = self._allocate(names, request)
        if not created:
            if lease.state is LeaseState.RUNNING and self.hv.is_running(
                    self.cfg.slot(lease.slot).domain_name):
                log.info("job %s already has a running VM in slot %s", lease.job_label,
                         lease.slot)
                return lease, self._existing_context(lease)
            log.info("job %s: stale lease in slot %s (%s); starting over", lease.job_label,
                     lease.slot, lease.state)
            self.end_vm(lease.slot, job_label=lease.job_label)
            lease, _ = self._allocate(names, request)
        slot = self.cfg.slot(lease.slot)
        try:
            context = self._boot(slot, request, image, uid, gid, shares, boot_timeout)
        except BaseException as exc:
            log.error("job %s slot %s: start failed: %s", request.label, slot.name, exc)
            self.abandon(slot.name, request.label)
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise NoSpace(f"no space left on the device of {exc.filename or 'a work file'} "
                              f"(overlay_dir {self.cfg.overlay_dir}, run_dir "
                              f"{self.cfg.run_dir}): free space on this node") from None
            raise
        return self.leases.transition(slot.name, LeaseState.RUNNING, request.label), context

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

    def _boot(self, slot: Slot, request: JobRequest, image, uid: int, gid: int,
              shares: tuple[GuestShare, ...], boot_timeout: float | None) -> JobContext:
        """The cold path: boot a VM that already holds the job's key and shares."""
        from .guest import Endpoint

        with self.phase("keys"):
            job_key = generate_keypair(f"vmim-job-{request.label}")
            _admin_path, admin_public = admin_key(self.cfg)
        keys = {"root": [admin_public]}
        if request.owner != "root":
            keys[request.owner] = [job_key.public_line]
        else:
            keys["root"].append(job_key.public_line)
        # host and port are the VM's, set by launch: its forward gets its port at boot (ports.py)
        login = Endpoint(host="", port=0, user=request.owner, key=job_key.private_openssh,
                         host_key="")
        host_key = self.launch(slot, request.label, image, request.owner, keys, shares, login,
                               boot_timeout)
        return self.write_job_context(slot, request, host_key, job_key.private_openssh, uid,
                                      gid, shares)

    def launch(self, slot: Slot, label: str, image, owner: str, keys: dict[str, list[str]],
               shares: tuple[GuestShare, ...], login, boot_timeout: float | None,
               after_start: Callable[[], None] | None = None,
               keep_login: Path | None = None) -> str:
        """Overlay, seed, domain; returns the host key once `login` (an Endpoint whose host,
        port and host key are the VM's, set here) gets in. The lease is `preparing`; it is
        `booting` when this returns.
        `after_start` runs once the domain exists, before the guest is waited for. With
        `keep_login` that login is kept there (guest.connect) for a later process."""
        from dataclasses import replace

        from .guest import wait_for_host_key, wait_for_ssh

        files = lease_files(self.cfg, slot.name, label)
        with self.phase("overlay"):
            prepare_overlay(self.images.disk_path(image), image.format, files.overlay)
        with self.phase("seed"):
            build_seed(files.seed, SeedData(instance_id=f"vmim-{slot.name}-{label}",
                                            hostname=slot.guest_hostname, authorized_keys=keys,
                                            mounts=seed_mounts(shares)))
        files.console.unlink(missing_ok=True)
        spec = DomainSpec(slot=slot, domain_type=resolve_domain_type(self.cfg.domain_type),
                          overlay=files.overlay, seed=files.seed, console_log=files.console,
                          boot=image.boot_spec(self.cfg.image_dir), job_label=label,
                          image=image.name, owner=owner, shares=shares)
        self.leases.transition(slot.name, LeaseState.BOOTING, label)
        if self.hv.is_running(slot.domain_name):
            raise LeaseError(f"slot {slot.name}: domain {slot.domain_name} is running without a "
                             "lease; run 'vmimagemanager reconcile'")
        with self.phase("define+start"):
            host, port = self._start_domain(spec)
            if after_start is not None:
                after_start()
        deadline = time.monotonic() + (boot_timeout or self.cfg.boot_timeout)
        running = lambda: self.hv.is_running(slot.domain_name)  # noqa: E731
        with self.phase("guest boot (to host key on console)"):
            host_key = wait_for_host_key(files.console, deadline, running)
        with self.phase("wait for ssh"):
            session = wait_for_ssh(replace(login, host=host, port=port, host_key=host_key),
                                   deadline, files.console, running, keep_in=keep_login)
            if keep_login is None:
                session.close()
        return host_key

    def _start_domain(self, spec: DomainSpec) -> tuple[str, int]:
        """Start the domain; returns the address its ssh answers on. A user-network VM's forward
        gets a port free at this moment (ports.py: a fixed one could be squatted by any local
        account); a start that fails because another process bound that port in between is
        retried on another port, never reported as a failed boot (NoFreePort, a RetryLater,
        once START_ATTEMPTS were lost). A bridged VM keeps its host name and port."""
        from dataclasses import replace

        from . import ports
        from .errors import BootError, NoFreePort

        net = spec.slot.network
        if not isinstance(net, UserNetwork):
            self.hv.start(build_domain_xml(spec))
            return net.hostname, net.ssh_port
        lost: set[int] = set()
        for _attempt in range(ports.START_ATTEMPTS):
            port = ports.choose(net.listen, net.ssh_port, self.cfg.ssh_ports, frozenset(lost))
            try:
                self.hv.start(build_domain_xml(replace(spec, ssh_port=port)))
            except BootError as exc:
                if not ports.lost_race(str(exc), net.listen, port):
                    raise
                log.warning("slot %s: another process bound %s:%d before the VM's ssh forward "
                            "could; starting it on another port", spec.slot.name, net.listen,
                            port)
                lost.add(port)
                continue
            return net.listen, port
        raise NoFreePort(f"slot {spec.slot.name}: the VM's ssh forward lost the race for "
                         f"{len(lost)} ports on {net.listen} (another process bound each one "
                         "first); the job is retried later")

    def ssh_address(self, slot: Slot, xml: str | None = None) -> tuple[str, int]:
        """Where the slot's VM answers ssh: a bridged slot's host name and port, or the loopback
        port a user-network VM's forward got at boot, read from libvirt (`xml`: the running
        domain's XML if just read). Never the configured port: that is only the first tried."""
        from .domain_xml import forwarded_port

        net = slot.network
        if not isinstance(net, UserNetwork):
            return net.hostname, net.ssh_port
        xml = self.hv.domain_xml(slot.domain_name) if xml is None else xml
        port = forwarded_port(xml) if xml is not None else None
        if port is None:
            raise VmimError(f"slot {slot.name}: no VM with an ssh forward runs there")
        return net.listen, port

    def admin_login(self, slot: Slot, host_key: str, address: tuple[str, int] | None = None):
        """root's login to the slot's VM with the node's admin key, pinned to `host_key`
        (`address`: the VM's, if just read from libvirt)."""
        from .guest import Endpoint

        host, port = address or self.ssh_address(slot)
        return Endpoint(host, port, "root", admin_key(self.cfg)[0], host_key)

    def write_job_context(self, slot: Slot, request: JobRequest, host_key: str, private: bytes,
                          uid: int, gid: int, shares: tuple[GuestShare, ...],
                          address: tuple[str, int] | None = None) -> JobContext:
        """Written once the VM answers: the starter reads the pinned host key, the VM's address
        (`address`, else read from libvirt) and the job's key from it."""
        host, port = address or self.ssh_address(slot)
        context = JobContext(
            mode="vm", label=request.label, slot=slot.name, host=host, port=port,
            user=request.owner, vo=request.vo, image=request.image, host_key=host_key,
            shared_paths=tuple(s.path for s in shares),
            scratch_dir=self.cfg.scratch_dir)
        write_context(self.cfg.run_dir, context, private, uid, gid)
        return context

    def _existing_context(self, lease: Lease) -> JobContext:
        return read_root_context(self.cfg.run_dir, lease.job_label)

    # -- end ------------------------------------------------------------------------------------
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
                detach: Callable[[str, str], int] | None = None) -> bool:
        """Epilog: end the job's VM if it has one; cleanup already done is not an error.

        With `detach(slot, label)` (flow.end_job), only what must happen before the hook
        returns is done here: the lease goes tearing-down (the slot is not free until the VM is
        gone) and the VM's usage is recorded; `detach` starts the destroy and cleanup in a
        process of their own and returns its pid (the lease names it from then on), or 0 and
        they are done here.
        """
        label = check_label(job_label(job_id, task_id))
        lease = self.ended_lease = self.leases.find_job(job_id, task_id)
        removed = remove_context(self.cfg.run_dir, label)
        if lease is None:
            return removed
        if detach is None:
            return self.end_vm(lease.slot, job_label=label)
        self.leases.transition(lease.slot, LeaseState.TEARING_DOWN, label)
        meta = self._our_domain(lease.slot, label)
        if meta is not None:
            self._account(lease.slot, label, meta)
        pid = detach(lease.slot, label)
        if pid:
            self.leases.hand_over(lease.slot, label, pid)
            return True
        return self.end_vm(lease.slot, job_label=label, account=meta is None)

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

    def _account(self, slot_name: str, label: str, meta: dict[str, str]) -> None:
        try:  # accounting never stands in the way of a teardown
            self._record_usage(slot_name, label, meta, self.hv.usage(domain_name(slot_name)))
        except Exception as exc:  # noqa: BLE001 - logged; the VM goes regardless
            log.warning("job %s slot %s: VM usage not recorded: %s", label, slot_name, exc)

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

    def _record_usage(self, slot_name: str, label: str, meta: dict[str, str],
                      usage: dict[str, float] | None) -> None:
        """One JSON line per job in state_dir/usage.jsonl (root-only): what libvirt says the
        VM used, beside what the batch system accounted (README, job path)."""
        if usage is None:
            return
        if "cpu_seconds_at_bind" in meta:  # a warm spare: what it used idle is not the job's
            idle = {k: float(meta.get(f"{k}_at_bind", 0)) for k in IDLE_FIGURES}
            usage = {**usage, **{k: max(0.0, usage.get(k, 0.0) - v) for k, v in idle.items()},
                     "spare_cpu_seconds": idle["cpu_seconds"]}
        self.usage[label] = usage
        record = {"time": time.time(), "job": label, "slot": slot_name,
                  "owner": meta.get("owner", ""), "image": meta.get("image", ""), **usage}
        append_line(self.cfg.state_dir / "usage.jsonl", json.dumps(record, sort_keys=True))
        log.info("job %s slot %s: VM used %.2f s CPU, peak RSS %.0f KiB", label, slot_name,
                 usage["cpu_seconds"], usage.get("peak_rss_kib", usage["rss_kib"]))

    def _guest_poweroff(self, slot: Slot, label: str) -> None:
        """Ask the guest over ssh (as root, admin key) to sync its disks and power off.

        Images without an ACPI daemon ignore libvirt's shutdown request; an ssh poweroff works
        on any image we can log in to, and `sync` first keeps what an admin wrote (`store`).
        """
        from .guest import connect

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

    # -- reconcile ------------------------------------------------------------------------------
    def reclaim_stale(self, dry_run: bool = False) -> list[str]:
        """End the leases no live process or VM explains (holder died, start failed, VM gone)."""
        return list(self._reclaim(dry_run).values())

    def _reclaim(self, dry_run: bool) -> dict[str, str]:
        """reclaim_stale's work: slot -> what was done (or would be) about its lease."""
        actions: dict[str, str] = {}
        known_slots = {s.name for s in self.cfg.slots}
        for lease in self.leases.all():
            reason = self._stale_reason(lease, known_slots)
            if not reason:
                continue
            actions[lease.slot] = f"release slot {lease.slot} (job {lease.job_label}): {reason}"
            if dry_run:
                continue
            try:
                if lease.slot in known_slots:
                    self.end_vm(lease.slot, job_label=lease.job_label)
                else:
                    self._forget_unknown_slot(lease)
            except TeardownIncomplete as exc:
                actions[lease.slot] += f" (incomplete: {exc})"
        for action in actions.values():
            log.info("reconcile%s: %s", " (dry run)" if dry_run else "", action)
        return actions

    def reconcile(self, dry_run: bool = False) -> list[str]:
        """Compare leases, libvirt domains and files; clean up what no live lease explains.

        Safe beside running hooks: domains, files and contexts are listed *before* the leases
        are read, and a prolog takes its lease before it makes any of them, so whatever a
        starting job owns is always explained by a lease read here.
        """
        domains = {name: lease_metadata(xml) for name in self.hv.domain_names()
                   if (xml := self.hv.domain_xml(name)) is not None}
        files = sorted(self.cfg.overlay_dir.iterdir()) if self.cfg.overlay_dir.is_dir() else []
        contexts = list_contexts(self.cfg.run_dir)
        leases = {lease.slot: lease for lease in self.leases.all()}
        released = self._reclaim(dry_run)
        actions = list(released.values())
        live = {s: lease for s, lease in leases.items() if s not in released}
        more = []
        for name, meta in domains.items():
            lease = live.get(name.removeprefix(DOMAIN_PREFIX))
            # A job lease on a domain still labelled as a spare: bound while this ran (the
            # metadata was read before the lease).
            if lease is None or (meta.get("job") != lease.job_label and not (
                    not lease.is_spare and is_spare_label(meta.get("job", "")))):
                more.append(f"destroy domain {name}: no lease holds it")
                if not dry_run:
                    self.hv.destroy(name)
        live_files = set()
        for lease in leases.values():  # a released lease's files went with it (or will)
            f = lease_files(self.cfg, lease.slot, lease.job_label)
            live_files |= {f.overlay.name, f.seed.name}
            live_files |= {p.name for p in self._spare_files(lease.slot, lease)}
        for path in files:
            if path.name not in live_files:
                more.append(f"remove orphan file {path}")
                if not dry_run:
                    path.unlink(missing_ok=True)
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
        for action in more:
            log.info("reconcile%s: %s", " (dry run)" if dry_run else "", action)
        if not dry_run:
            from .audit import record

            for action in actions + more:
                record(self.cfg, "reconcile", action=action)
        return actions + more

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

    def _stale_reason(self, lease: Lease, known_slots: set[str]) -> str:
        if lease.slot not in known_slots:
            return "slot is no longer configured"
        if lease.state is LeaseState.FAILED:
            return "a start failed and was not cleaned up"
        if lease.state in TRANSIENT and not lease.holder_alive():
            return f"the process (pid {lease.pid}) that was {lease.state} it died"
        if lease.state in (LeaseState.RUNNING, LeaseState.SPARE) and not self.hv.is_running(
                domain_name(lease.slot)):
            return "its VM is not running"
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

    # -- admin helpers --------------------------------------------------------------------------
    def store_slot(self, slot_name: str, new_image: str) -> None:
        """Save the slot's current disk as a new golden image, then release the slot."""
        lease = self.leases.get(slot_name)
        if lease is None:
            raise LeaseError(f"slot {slot_name} is free: nothing to store; 'up' it first")
        slot = self.cfg.slot(slot_name)
        self._guest_poweroff(slot, lease.job_label)
        self.hv.shutdown(slot.domain_name, self.cfg.shutdown_timeout)
        files = lease_files(self.cfg, slot_name, lease.job_label)
        self.images.store_from_disk(new_image, files.overlay, self.images.get(lease.image))
        self.end_vm(slot_name, job_label=lease.job_label)

    def status(self) -> list[dict[str, object]]:
        leases = {lease.slot: lease for lease in self.leases.all()}
        running = set(self.hv.domain_names())
        rows = []
        for slot in self.cfg.slots:
            lease = leases.get(slot.name)
            ssh = ""  # a user-network slot has a port only while its VM runs
            if slot.domain_name in running or not isinstance(slot.network, UserNetwork):
                try:
                    ssh = "{}:{}".format(*self.ssh_address(slot))
                except VmimError:  # the VM went away since the listing
                    ssh = ""
            rows.append({
                "slot": slot.name, "state": str(lease.state) if lease else "free",
                "job": lease.job_label if lease else "", "owner": lease.owner if lease else "",
                "image": lease.image if lease else "", "vo": lease.vo if lease else "",
                "domain": slot.domain_name if slot.domain_name in running else "",
                "ssh": ssh,
                "network": "user" if isinstance(slot.network, UserNetwork) else "bridge",
                "since": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(lease.updated))
                if lease else "",
                "spare": bool(lease and lease.is_spare) or bool(
                    lease and lease.state is LeaseState.BINDING),
                "age_s": round(time.time() - lease.created) if lease else "",
            })
        return rows
