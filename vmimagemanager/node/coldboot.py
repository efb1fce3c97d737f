"""The cold path: lease a slot, make the overlay and seed, start the domain on a port of its own,
wait for the host key and ssh, write the job's context; a bound warm spare short-cuts it."""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from .. import ports
from ..accel import resolve_domain_type
from ..accounts import account
from ..config import Slot, UserNetwork
from ..context import (
    JobContext,
    read_root_context,
    write_context,
)
from ..domain_meta import forwarded_port
from ..errors import (
    BootError,
    ConfigError,
    JobTooBig,
    LeaseError,
    NoFreePort,
    NoFreeSlot,
    NoSpace,
    VmimError,
)
from ..guest import Endpoint, wait_for_host_key, wait_for_ssh
from ..homeserver import (
    SERVER_OWN_MIB,
    HomeServer,
    address_space_mib,
    serve_homes,
    stop_servers_of,
)
from ..images import prepare_overlay
from ..jobs import check_label
from ..leases import Lease
from ..seed import SeedData, build_seed, generate_keypair
from ..shape import MIN_VM_MEMORY_MIB, Shape
from ..shares import (
    GuestShare,
    needs_shared_memory,
    resolve_shares,
    seed_mounts,
    served_by_owner,
)
from ..states import LeaseState
from .model import JobRequest, LeaseFiles, StartResult, lease_files
from .state import admin_key

log = logging.getLogger("vmimagemanager.node")

# (the node, request, uid, gid, shares) -> the bound spare's start, or None (spares.bind_spare)
SpareBinder = Callable[[object, JobRequest, int, int, tuple[GuestShare, ...]],
                       "StartResult | None"]


class ColdBoot:
    """Starting a VM (a part of node.Node)."""

    def start_vm(self, request: JobRequest, slots: list[str] | None = None,
                 boot_timeout: float | None = None, bind: SpareBinder | None = None
                 ) -> StartResult:
        """Lease a slot and boot the request's image in it; returns when ssh answers.

        `bind` (spares.bind_spare) is tried first: it gives the job an idle warm spare, or None
        and the VM is booted here (the cold path)."""
        check_label(request.label)
        shape = self.shape_of(request)  # JobTooBig, ImageError, ShareError before any lease
        image = self.images.get(request.image)
        self.images.check_unchanged(image)
        owner = account(request.owner)
        uid, gid = owner.uid, owner.gid
        shares = resolve_shares(self.cfg.shared_paths, request.owner)  # ShareError, likewise
        self.hv.connect()  # libvirtd down: the job is retried later, no slot taken
        names = slots or [s.name for s in self.cfg.slots]
        if bind is not None and slots is None:
            bound = bind(self, replace(request, shape=shape), uid, gid, shares)
            if bound is not None:
                return replace(bound, image=image)
        with self.phase("lease"):
            lease, created = self._allocate(names, request, shape)
        if not created:
            if lease.state is LeaseState.RUNNING and self.hv.is_running(
                    self.cfg.slot(lease.slot).domain_name):
                log.info("job %s already has a running VM in slot %s", lease.job_label,
                         lease.slot)
                return StartResult(lease, self._existing_context(lease), image=image)
            log.info("job %s: stale lease in slot %s (%s); starting over", lease.job_label,
                     lease.slot, lease.state)
            self.end_vm(lease.slot, job_label=lease.job_label)
            lease, _ = self._allocate(names, request, shape)
        slot = self.cfg.slot(lease.slot)
        fell_back = ""
        if self.cfg.snapshot_starts:
            restored, fell_back = self._from_snapshot(slot, replace(request, shape=lease.shape),
                                                      image, uid, gid, shares)
            if restored is not None:
                return restored
            if fell_back:  # that lease was given up: the boot takes a new one
                with self.phase("lease"):
                    lease, created = self._allocate(names, request, shape)
                if not created:  # its teardown did not finish: reconcile will
                    raise NoFreeSlot(f"job {request.label}: the lease of its failed start "
                                     f"from a snapshot in slot {lease.slot} is still being "
                                     "given up; the job is retried later")
                slot = self.cfg.slot(lease.slot)
        try:
            context = self._boot(slot, replace(request, shape=lease.shape), image, uid, gid,
                                 shares, boot_timeout)
        except BaseException as exc:
            log.error("job %s slot %s: start failed: %s", request.label, slot.name, exc)
            self.abandon(slot.name, request.label)
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise NoSpace(f"no space left on the device of {exc.filename or 'a work file'} "
                              f"(overlay_dir {self.cfg.overlay_dir}, run_dir "
                              f"{self.cfg.run_dir}): free space on this node") from None
            raise
        return StartResult(self.leases.transition(slot.name, LeaseState.RUNNING, request.label),
                           context, image=image, snapshot_failed=fell_back)

    def _from_snapshot(self, slot: Slot, request: JobRequest, image, uid: int, gid: int,
                       shares: tuple[GuestShare, ...]) -> tuple[StartResult | None, str]:
        """The job's VM restored from its image's snapshot (restore.py), or None and why not
        ('' if there was no snapshot to try: the lease is still the job's)."""
        # only a node with snapshot starts on
        from .restore import start_from_snapshot
        from .snapshots import kind_name

        context, why = start_from_snapshot(self, slot, request, image, uid, gid, shares)
        if context is None:
            return None, why
        lease = self.leases.transition(slot.name, LeaseState.RUNNING, request.label)
        return StartResult(lease, context, image=image,
                           snapshot=kind_name(image.name, request.shape)), ""

    def shape_of(self, request: JobRequest) -> Shape:
        """The request's VM: its shape, else the VO's default for one core; JobTooBig if the
        node can never give it (the job is held with the reason, not retried for ever).

        The owner's file server maps the guest's whole RAM and inherits this process's
        address-space limit: where the hook runs under the job's limit (SGE's h_vmem) and
        could not lift it (root without CAP_SYS_RESOURCE), the VM gets what leaves the server
        room within it, not a VM whose server cannot start."""
        shape = request.shape or self.cfg.job_shape(request.vo, 1, None)
        if why := self.cfg.budget.never_fits(shape):
            raise JobTooBig(f"job {request.label} can never run on this node: {why}; ask for "
                            "less, or send it to a bigger node")
        room = address_space_mib()
        if room is not None and needs_shared_memory(self.cfg) and \
                shape.memory_mib > room - SERVER_OWN_MIB:
            memory = room - SERVER_OWN_MIB
            if memory < MIN_VM_MEMORY_MIB:
                raise JobTooBig(f"job {request.label} runs under an address-space limit of "
                                f"{room} MiB (its h_vmem) that root cannot lift here, and that "
                                "leaves no room for a VM and its home's file server; ask for "
                                f"at least {MIN_VM_MEMORY_MIB + SERVER_OWN_MIB} MiB, or give "
                                "root CAP_SYS_RESOURCE")
            log.warning("job %s: its VM gets %d MiB, not %d: the hook runs under an "
                        "address-space limit of %d MiB it cannot lift, which the owner's file "
                        "server inherits (give root CAP_SYS_RESOURCE)", request.label, memory,
                        shape.memory_mib, room)
            shape = Shape(shape.cores, memory)
        return shape

    def _boot(self, slot: Slot, request: JobRequest, image, uid: int, gid: int,
              shares: tuple[GuestShare, ...], boot_timeout: float | None) -> JobContext:
        """The cold path: boot a VM that already holds the job's key and shares."""
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
                               boot_timeout, shape=self.shape_of(request))
        return self.write_job_context(slot, request, host_key, job_key.private_openssh, uid,
                                      gid, shares)

    def launch(self, slot: Slot, label: str, image, owner: str, keys: dict[str, list[str]],
               shares: tuple[GuestShare, ...], login, boot_timeout: float | None,
               after_start: Callable[[], None] | None = None,
               keep_login: Path | None = None, *, shape: Shape) -> str:
        """Overlay, seed, domain; returns the host key once `login` (an Endpoint whose host,
        port and host key are the VM's, set here) gets in. The lease is `preparing`; it is
        `booting` when this returns.
        `after_start` runs once the domain exists, before the guest is waited for. With
        `keep_login` that login is kept there (guest.connect) for a later process. The VM has
        `shape` (the lease's)."""
        files = lease_files(self.cfg, slot.name, label)
        with self.phase("overlay"):
            prepare_overlay(self.images.disk_path(image), image.format, files.overlay)
        with self.phase("seed"):
            build_seed(files.seed, SeedData(instance_id=f"vmim-{slot.name}-{label}",
                                            hostname=slot.guest_hostname, authorized_keys=keys,
                                            mounts=seed_mounts(shares)))
        files.console.unlink(missing_ok=True)
        self.leases.transition(slot.name, LeaseState.BOOTING, label)
        if self.hv.is_running(slot.domain_name):
            raise LeaseError(f"slot {slot.name}: domain {slot.domain_name} is running without a "
                             "lease; run 'vmimagemanager reconcile'")
        with self.phase("define+start"):
            qemu_ids = self.qemu_ids()  # QEMU as root: the start fails, the job held with the fix
            servers = (serve_homes(self.cfg.run_dir, self.cfg.image_dir, label,
                                   account(owner), shares, qemu_ids)
                       if any(served_by_owner(s) for s in shares) else ())
            try:
                host, port = self._start_domain(slot, files, image, label, owner, shares,
                                                 servers, shape)
            except BaseException:
                stop_servers_of(self.cfg.run_dir, label)
                raise
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

    def qemu_ids(self) -> tuple[int, int] | None:
        """The uid and gid libvirt runs QEMU as (None: it does not say, as its test driver);
        ConfigError if that is root: a guest that escapes into QEMU must not be root here."""
        ids = self.hv.qemu_ids(resolve_domain_type(self.cfg.domain_type))
        if ids is not None and ids[0] == 0:
            raise ConfigError('libvirt runs QEMU as root (user = "root" in /etc/libvirt/qemu.conf)'
                              ": a guest that escapes into QEMU would be root on this node; "
                              "remove the user and group lines (Debian's default is "
                              "libvirt-qemu) and restart libvirtd")
        return ids

    def _start_domain(self, slot: Slot, files: LeaseFiles, image, label: str, owner: str,
                      shares: tuple[GuestShare, ...],
                      servers: tuple[HomeServer, ...], shape: Shape) -> tuple[str, int]:
        """Define and start the domain; returns the address its ssh answers on. A user-network
        VM's forward gets a port free at this moment (ports.py: a fixed one could be squatted by
        any local account); a start that fails because another process bound that port in
        between is retried on another port, never reported as a failed boot (NoFreePort, a
        RetryLater, once START_ATTEMPTS were lost). A bridged VM keeps its host name and port."""
        # lazy: lxml comes with the XML builder, needed only where a domain is defined; the
        # epilog and reconcile open the node too and never build XML
        from ..domain_xml import DomainSpec, build_domain_xml

        spec = DomainSpec(slot=slot, shape=shape,
                          domain_type=resolve_domain_type(self.cfg.domain_type),
                          overlay=files.overlay, seed=files.seed, console_log=files.console,
                          boot=image.boot_spec(self.cfg.image_dir), job_label=label,
                          image=image.name, owner=owner, shares=shares,
                          home_servers=tuple((s.tag, str(s.socket)) for s in servers),
                          shared_memory=needs_shared_memory(self.cfg))
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
        host, port = address or self.ssh_address(slot)
        return Endpoint(host, port, "root", admin_key(self.cfg)[0], host_key)

    def write_job_context(self, slot: Slot, request: JobRequest, host_key: str, private: bytes,
                          uid: int, gid: int, shares: tuple[GuestShare, ...],
                          address: tuple[str, int] | None = None) -> JobContext:
        """Written once the VM answers: the starter reads the pinned host key, the VM's address
        (`address`, else read from libvirt) and the job's key from it."""
        host, port = address or self.ssh_address(slot)
        shape = self.shape_of(request)
        context = JobContext(
            mode="vm", label=request.label, slot=slot.name, host=host, port=port,
            user=request.owner, vo=request.vo, image=request.image, host_key=host_key,
            shared_paths=tuple(s.path for s in shares),
            scratch_dir=self.cfg.scratch_dir, cores=shape.cores, memory_mib=shape.memory_mib)
        write_context(self.cfg.run_dir, context, private, uid, gid)
        return context

    def _existing_context(self, lease: Lease) -> JobContext:
        return read_root_context(self.cfg.run_dir, lease.job_label)
