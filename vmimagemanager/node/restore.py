"""Starting VMs from memory snapshots (snapshots.py): make one, restore it as a new machine.

A restore gives the saved VM a new overlay on its frozen disk, the slot's name, a new UUID and
VM generation ID (domain_xml.restored_domain_xml) and a forward port of its own. Before
anything else uses it, the node's admin logs in, pinned to the snapshot's host key (the saved
guest's, which the node read from its console at its boot), and makes it a machine of its
own (`renew_script`): the clock set to the host's, its RNG reseeded (the kernel does it on
the new generation ID; the script waits for it and also mixes in bytes from the host), a new
host name and machine-id, and new host keys, which sshd loads at once and which the node pins
from then on. Two VMs restored from one snapshot share nothing a job could tell apart but
what the image and the saved boot made.
"""

from __future__ import annotations

import logging
import os
import secrets
import shlex
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .. import ports
from ..agentwake import poke
from ..config import Config, Slot, UserNetwork
from ..domain_meta import lease_attributes
from ..errors import (
    BootError,
    HypervisorUnavailable,
    ImageError,
    LeaseError,
    NoFreePort,
    RetryLater,
    VmimError,
)
from ..guest import Endpoint, connect, resume
from ..images import prepare_overlay
from ..keysfiles import image_key
from ..savefile import SaveFileError, stream_offset, write_head
from ..seed import generate_keypair
from ..shape import Shape
from ..shares import NINEP_OPTIONS, resolve_shares, served_by_owner
from ..states import LeaseState
from .model import JobRequest, lease_files
from .snapshots import (
    DISK,
    PRIVATE,
    REMOVE_AFTER,
    SEED,
    STATE,
    Snapshot,
    SnapshotUnusable,
    frozen_disk_size,
    kind_name,
    locked,
    new_directory,
    note_failure,
    note_success,
    publish,
    recipe,
    refuse,
    refused,
    remove,
    restorable_slot,
    usable,
    want,
)
from .state import admin_key

if TYPE_CHECKING:
    from ..context import JobContext
    from ..guest import GuestSession
    from ..images import Image
    from ..leases import Lease
    from ..shares import GuestShare
    from . import Node

log = logging.getLogger("vmimagemanager.snapshots")

RESEED_MESSAGE = "crng reseeded due to virtual machine fork"  # Linux >= 5.18, random.c
RESEED_TRIES, POLL = 150, 0.02  # up to 3 s for the kernel's reseed, and for sshd's reload
VMGENID_DRIVER = "/sys/bus/acpi/drivers/vmgenid"
GUEST_TIMEOUT = 60  # seconds for each question to a guest being made a snapshot
# what the snapshot's guest says of its sshd (its configuration is the image's): the host key
# files, one of them ed25519, and where the listener's pid is
SSHD_FACTS = ('sshd=$(command -v sshd || echo /usr/sbin/sshd); "$sshd" -T -C '
              '"user=root,host=vmim,addr=127.0.0.1" | awk \'tolower($1)=="hostkey" || '
              'tolower($1)=="pidfile" {print tolower($1), $2}\'')


class UnfitImage(VmimError):
    """What the image's guest said makes a snapshot of it unusable (not tried again)."""


def sshd_facts(output: str) -> tuple[tuple[str, ...], str]:
    """(host key files, pid file) from SSHD_FACTS' output; UnfitImage if no host key file is
    an ed25519 one (the node makes the restored VM's key, ed25519, and pins it)."""
    pairs = [line.split(maxsplit=1) for line in output.splitlines() if " " in line]
    keys = tuple(path for key, path in pairs if key == "hostkey")
    pidfile = next((path for key, path in pairs if key == "pidfile"), "/run/sshd.pid")
    if not any("ed25519" in path.rsplit("/", 1)[-1] for path in keys):
        raise UnfitImage("its sshd has no ed25519 HostKey file: a restored VM could not be "
                         "given a host key of the node's making")
    return keys, pidfile


def tree_mounts(cfg: Config) -> list[tuple[str, str, str]]:
    """(tag, path, options) of each read-only tree QEMU exports over 9p: unmounted in a
    snapshot's VM before its save (QEMU refuses to save a VM with a 9p export mounted: "Migration
    is disabled when VirtFS export path ... is mounted") and mounted again by each restore."""
    return [(share.tag, share.path, NINEP_OPTIONS + (",ro" if share.readonly else ""))
            for share in resolve_shares(cfg.shared_paths, "root")
            if share.mode == "hypervisor" and not served_by_owner(share)]


def renew_script(snap: Snapshot, hostname: str, host_key: bytes, host_key_line: str,
                 mounts: list[tuple[str, str, str]] = ()) -> tuple[str, str]:
    """The root shell script that makes a restored guest a machine of its own: the clock set
    to the host's, bytes of the host's mixed into its RNG, and a wait (3 s at most; exit 3
    with a line on stderr) for its kernel to reseed on the new VM generation ID; the tree
    shares (`mounts`, tree_mounts) mounted again; a new host name and machine-id; the node's
    new ed25519 host key in place of every host key the snapshot had (other types removed:
    only the pinned one is wanted), loaded by sshd at once (SIGHUP restarts the listener;
    this login, a child of the old one, stays)."""
    q = shlex.quote
    ed25519 = next(path for path in snap.host_key_files if "ed25519" in path.rsplit("/", 1)[-1])
    fail = 'echo "vmim-renew: {}" >&2; exit 3'
    lines = [
        "set -e",
        f"date -u -s @{round(time.time())} >/dev/null",
        f"printf '%s\\n' {secrets.token_hex(64)} > /dev/urandom",
        f"i=0; until dmesg | grep -q {q(RESEED_MESSAGE)}; do i=$((i+1)); "
        f"[ $i -lt {RESEED_TRIES} ] || {{ {fail.format('the kernel did not reseed its RNG')}"
        f"; }}; sleep {POLL}; done",
        *(f"mkdir -p {q(path)}; mount -t 9p -o {q(options)} {q(tag)} {q(path)}"
          for tag, path, options in mounts),
        f"printf '%s\\n' {q(hostname)} > /proc/sys/kernel/hostname",
        f"if [ -f /etc/hostname ]; then printf '%s\\n' {q(hostname)} > /etc/hostname; fi",
        "rm -f /etc/machine-id",  # a new file (0444), not the image's mode or a link
        f"printf '%s\\n' {secrets.token_hex(16)} > /etc/machine-id; chmod 0444 /etc/machine-id",
        "umask 077",
        *(f"rm -f {q(path)} {q(path + '.pub')}" for path in snap.host_key_files),
        f"cat > {q(ed25519)} <<'VMIM_HOST_KEY'\n{host_key.decode().strip()}\nVMIM_HOST_KEY",
        f"printf '%s\\n' {q(host_key_line)} > {q(ed25519 + '.pub')}",
        # the inodes of the sockets listening on port 22 and how many, read with shell
        # builtins only (no process to start on the guest's CPU while sshd restarts on it)
        "listening() { l=; n=0; for f in /proc/net/tcp /proc/net/tcp6; do [ -r $f ] || "
        "continue; while read -r _ a _ st _ _ _ _ _ ino _; do case $a:$st in *:0016:0A) "
        "l=\"$l $ino\"; n=$((n+1));; esac; done < $f; done; }",
        # sshd listens again on all it listened on (IPv4 and IPv6 are bound one after the
        # other: one new socket is not yet the one a job's login comes to), no old one left
        "renewed() { listening; [ $n -ge $nb ] || return 1; for s in $l; do "
        "case \" $before \" in *\" $s \"*) return 1;; esac; done; }",
        f'listening; before=$l; nb=$n; kill -HUP "$(cat {q(snap.sshd_pidfile)})"',
        "umask 022",
    ]
    # run last (a bind's script may come in between): sshd's restart goes on meanwhile
    wait = (f'i=0; until renewed; do '
            f"i=$((i+1)); [ $i -lt {RESEED_TRIES} ] || {{ "
            f"{fail.format('sshd did not listen again with its new host key')}; }}; "
            f"sleep {POLL}; done")
    return "\n".join(lines) + "\n", wait + "\n"


def new_identity(cfg: Config, snap: Snapshot, slot: Slot) -> tuple[str, str, str]:
    """The renew script for a VM restored from `snap` into `slot` (its body, and its wait
    for sshd, which must end the same shell), and the host key the VM gets."""
    pair = generate_keypair(f"root@{slot.guest_hostname}")
    line = " ".join(pair.public_line.split()[:2])
    body, wait = renew_script(snap, slot.guest_hostname, pair.private_openssh, line,
                              tree_mounts(cfg))
    return body, wait, line


def restore_into(life: Node, slot: Slot, label: str, snap: Snapshot,
                 attributes: dict[str, str]) -> tuple[str, int]:
    """Restore `snap` into the slot, whose lease (`label`) is `preparing`; it is `booting`
    when this returns the VM's ssh address. The VM is still the snapshot's machine: the caller
    logs in pinned to `snap.host_key` and runs `new_identity`'s script first. SnapshotUnusable
    if the snapshot's files or libvirt refused (the snapshot should go); other errors are
    the VM's."""
    net = slot.network
    if not isinstance(net, UserNetwork):
        raise VmimError(f"slot {slot.name} is bridged: VMs there are never restored")
    files = lease_files(life.cfg, slot.name, label)
    try:
        size = frozen_disk_size(snap)
    except ImageError as exc:
        raise SnapshotUnusable(str(exc)) from None
    with life.phase("overlay"):
        prepare_overlay(snap.path / DISK, "qcow2", files.overlay, size=size)
    files.console.unlink(missing_ok=True)
    life.qemu_ids()  # QEMU as root: refused, as for a boot
    life.leases.transition(slot.name, LeaseState.BOOTING, label)
    if life.hv.is_running(slot.domain_name):
        raise LeaseError(f"slot {slot.name}: domain {slot.domain_name} is running without a "
                         "lease; run 'vmimagemanager reconcile'")
    port = _restore_on_a_port(life, slot, net, snap, attributes, files.overlay, files.console)
    return net.listen, port


def snapshot_login(life: Node, snap: Snapshot, address: tuple[str, int]) -> GuestSession:
    """root's login to a VM just restored from `snap`, pinned to the snapshot's host key.
    Only that VM answers there: its QEMU holds the loopback forward it was restored with."""
    with life.phase("login"):
        return connect(Endpoint(*address, "root", admin_key(life.cfg)[0], snap.host_key),
                       timeout=30)


def _restore_on_a_port(life: Node, slot: Slot, net: UserNetwork, snap: Snapshot,
                       attributes: dict[str, str], overlay: Path, console: Path) -> int:
    """Restore with a forward port free at this moment (as a cold start does: ports.py).
    SnapshotUnusable if the save file is not as made; BootError if libvirt refused."""
    from ..domain_xml import restored_domain_xml  # lxml: only where a domain is made

    # the frozen disk, its golden disk and the seed are root's, readable by QEMU's group:
    # libvirt must not make them QEMU's (QEMU could then rewrite what every restore reads)
    disks = {"vda": ((overlay, "qcow2", True), (snap.path / DISK, "qcow2", False),
                     (Path(snap.golden), snap.golden_format, False)),
             "vdb": ((snap.path / SEED, "raw", False),)}
    lost: set[int] = set()
    for _attempt in range(ports.START_ATTEMPTS):
        port = ports.choose(net.listen, net.ssh_port, life.cfg.ssh_ports, frozenset(lost))
        xml = restored_domain_xml(snap.domain_xml, slot, attributes, disks, console, port)
        try:
            with life.phase("restore"), locked(snap) as fd:
                write_head(fd, xml)
                life.hv.restore(str(snap.state))
        except SaveFileError as exc:
            raise SnapshotUnusable(str(exc)) from None
        except BootError as exc:
            if ports.lost_race(str(exc), net.listen, port):
                lost.add(port)
                continue
            raise  # counted by the caller (note_failure): once may be the node's trouble
        return port
    raise NoFreePort(f"slot {slot.name}: the restored VM's ssh forward lost the race for "
                     f"{len(lost)} ports on {net.listen}; the job is retried later")


def make_snapshot(life: Node, image_name: str, vo: str, shape: Shape,
                  allocated: Callable[[Lease], None] = lambda lease: None) -> Snapshot:
    """Boot a VM of the image and shape as a spare is booted, check its kernel can be told
    of a restore, save it and freeze its disk; the snapshot replaces any older one of its
    kind. The slot is free again afterwards. VmimError if the image cannot have one
    (recorded: not tried again for that image content)."""
    from .spares import SNAPSHOT_TASK, boot_spare

    cfg = life.cfg
    image = life.images.get(image_name)
    life.images.check_unchanged(image)
    content = image_key(image.sha256)
    if why := refused(cfg).get(content):
        raise VmimError(f"no snapshot of image {image_name}: {why}")
    lease = boot_spare(life, image_name, vo, shape, f"{SNAPSHOT_TASK}{secrets.token_hex(4)}",
                       allocated)
    slot = cfg.slot(lease.slot)
    made: Path | None = None
    try:
        key_files, pidfile, host_key = _ask_guest(life, slot, lease, content, image_name)
        made = new_directory(cfg, image_name, shape)
        with life.phase("save"):
            xml = life.hv.save(slot.domain_name, str(made / PRIVATE / "saved"))
        _freeze(life, slot, lease, made)
        snap = Snapshot(image=image_name, cores=shape.cores, memory_mib=shape.memory_mib,
                        image_key=content, recipe=recipe(cfg), host_key=host_key,
                        host_key_files=key_files, sshd_pidfile=pidfile, domain_xml=xml,
                        golden=str(life.images.disk_path(image)),
                        golden_format=image.format, created=time.time(),
                        directory=str(made))
        _check_made(snap)
        published = publish(cfg, made, snap)
    except BaseException:
        life.abandon(slot.name, lease.job_label)
        raise
    finally:
        if made is not None and made.exists():
            shutil.rmtree(made, ignore_errors=True)
    life.end_vm(slot.name, job_label=lease.job_label)
    log.info("snapshot of %s (%s) made in slot %s: %s", image_name, shape, slot.name,
             published.sizes_mib())
    return published


def _ask_guest(life: Node, slot: Slot, lease: Lease, content: str, image_name: str
               ) -> tuple[tuple[str, ...], str, str]:
    """Over root's login to the booted VM: can its kernel be told of a restore, and what its
    sshd's host key files and pid file are; (those, its host key). The login ends here: no
    connection of the node's is saved with the VM."""
    from .spares import kept_login, spare_host_key

    cfg = life.cfg
    host_key = spare_host_key(lease_files(cfg, slot.name, lease.job_label).console)
    login = Endpoint(*life.ssh_address(slot), "root", admin_key(cfg)[0], host_key)
    kept = kept_login(cfg, lease.job_label)
    session = (kept and resume(login, kept)) or connect(login, timeout=30)
    key_files, pidfile, problem = (), "", ""
    try:  # the image answers: bounded in time
        if session.check_call(f"[ -d {VMGENID_DRIVER} ] && echo yes || echo no",
                              timeout=GUEST_TIMEOUT).strip() != "yes":
            problem = ("its kernel has no VM generation ID driver (Linux >= 5.18, "
                       "CONFIG_VMGENID): a restored guest would not reseed its RNG")
        else:
            key_files, pidfile = sshd_facts(session.check_call(SSHD_FACTS,
                                                               timeout=GUEST_TIMEOUT))
            if session.check_call(f"[ -s {shlex.quote(pidfile)} ] && command -v dmesg "
                                  ">/dev/null && echo yes || echo no",
                                  timeout=GUEST_TIMEOUT).strip() != "yes":
                problem = (f"its sshd writes no pid file ({pidfile}) or it has no dmesg: a "
                           "restored guest's sshd could not be given its new host key")
        trees = [shlex.quote(path) for _tag, path, _options in tree_mounts(cfg)]
        if trees and not problem:  # mounted again by each restore
            session.check_call(f"umount {' '.join(trees)}", timeout=GUEST_TIMEOUT)
    except UnfitImage as exc:
        problem = str(exc)
    finally:
        session.close()
    if problem:
        refuse(cfg, content, f"{problem}; its VMs boot")
        raise VmimError(f"no snapshot of image {image_name}: {problem}; its VMs boot")
    return key_files, pidfile, host_key


def _freeze(life: Node, slot: Slot, lease: Lease, made: Path) -> None:
    """The saved VM's files into the snapshot's directory: its state copied into a file of
    root's own (QEMU wrote the saved one through a descriptor it or a child of its may still
    hold), its overlay and seed root's, readable by QEMU's group only."""
    files = lease_files(life.cfg, slot.name, lease.job_label)
    saved = made / PRIVATE / "saved"
    with open(saved, "rb", opener=_no_follow) as source:
        fd = os.open(made / PRIVATE / STATE, os.O_WRONLY | os.O_CREAT | os.O_EXCL |
                     os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with open(fd, "wb") as target:
            shutil.copyfileobj(source, target, 1 << 20)
    saved.unlink()
    ids = life.qemu_ids()
    group = ids[1] if ids is not None else 0
    for name, path in ((DISK, files.overlay), (SEED, files.seed)):
        os.replace(path, made / name)
        os.chown(made / name, 0, group, follow_symlinks=False)
        os.chmod(made / name, 0o640)


def _no_follow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)


def _check_made(snap: Snapshot) -> None:
    """What QEMU left behind is what a restore expects (VmimError if not)."""
    try:
        frozen_disk_size(snap)
        fd = os.open(snap.state, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            stream_offset(fd)
        finally:
            os.close(fd)
    except (ImageError, SaveFileError) as exc:
        raise VmimError(f"the snapshot just saved is unusable: {exc}") from None


def start_from_snapshot(life: Node, slot: Slot, request: JobRequest, image: Image, uid: int,
                        gid: int, shares: tuple[GuestShare, ...]
                        ) -> tuple[JobContext | None, str]:
    """The job's VM restored from its image's snapshot and bound, in the slot its lease
    (`preparing`) holds: (its context, ''). (None, '') if there is no snapshot it may use
    (the agent is asked for one): the lease is untouched, the VM boots in it. (None, why) if
    the start from the snapshot failed, whatever the error: the lease is given up and
    nothing of that start is left (an unusable snapshot is removed); the caller boots the VM
    in a new lease. Only a RetryLater (the node's passing trouble) is raised."""
    cfg = life.cfg
    snap = None
    try:
        snap = usable(life, image, request.shape) if restorable_slot(cfg, slot.name) else None
        if snap is None:
            if restorable_slot(cfg, slot.name) and want(cfg, image.name, request.shape):
                poke(cfg)
            return None, ""
        context = _restore_and_bind(life, slot, request, image, uid, gid, shares, snap)
    except RetryLater as exc:
        if not _node_trouble(life, exc):
            why = count_failure(snap, image, exc)
        else:  # libvirtd gone, no port, the lease database busy: a boot would fail alike
            life.abandon(slot.name, request.label)
            raise
    except SnapshotUnusable as exc:
        why = count_failure(snap, image, exc, unusable=True)
    except Exception as exc:  # noqa: BLE001 - any failure: the job's VM boots instead
        why = count_failure(snap, image, exc)
    except BaseException:
        life.abandon(slot.name, request.label)
        raise
    else:
        succeeded(snap)
        return context, ""
    log.warning("job %s slot %s: %s; booting its VM instead", request.label, slot.name, why)
    life.abandon(slot.name, request.label)
    return None, why


def _node_trouble(life: Node, exc: RetryLater) -> bool:
    """Is `exc` the node's passing trouble (the job is retried later) rather than the
    snapshot's? libvirt reports some of a restore's own failures as a system error, which
    reads as libvirtd gone: it is gone only if it does not answer now."""
    if not isinstance(exc, HypervisorUnavailable):
        return True
    try:
        life.hv.connect()
    except HypervisorUnavailable:
        return True
    return False


def succeeded(snap: Snapshot) -> None:
    try:
        note_success(snap)
    except OSError as error:  # the count stays: a later success clears it
        log.warning("snapshot of %s (%s): cannot clear its failure count: %s", snap.image,
                    snap.shape, error)


def count_failure(snap: Snapshot | None, image: Image, exc: BaseException,
                   unusable: bool = False) -> str:
    """Why the start from `snap` failed; the snapshot removed if it is unusable or failed
    REMOVE_AFTER times in a row (a removal that fails is only logged: the job boots)."""
    why = f"starting from the snapshot of {image.name} failed: {exc}"
    if snap is None:
        return why
    try:
        if unusable or note_failure(snap):
            remove(snap)
            how = "is unusable" if unusable else f"failed {REMOVE_AFTER} starts in a row"
            why = f"the snapshot of {image.name} ({snap.shape}) {how} and was removed: {exc}"
    except OSError as error:
        log.error("snapshot of %s (%s): cannot note or remove it: %s", image.name, snap.shape,
                  error)
    return why


def _restore_and_bind(life: Node, slot: Slot, request: JobRequest, image: Image, uid: int,
                      gid: int, shares: tuple[GuestShare, ...], snap: Snapshot) -> JobContext:
    from .spares import IMAGE_KEY, bind_vm

    address = restore_into(life, slot, request.label, snap, lease_attributes(
        request.label, image.name, request.owner, slot.name, **{IMAGE_KEY: snap.image_key}))
    xml = life.hv.domain_xml(slot.domain_name)
    if xml is None:
        raise VmimError("the restored VM stopped")
    renew, wait, host_key = new_identity(life.cfg, snap, slot)
    session = snapshot_login(life, snap, address)
    try:
        with life.phase("bind"):
            return bind_vm(life, slot, request, uid, gid, shares, host_key, xml, session,
                           {"snapshot": kind_name(image.name, snap.shape)},
                           around=(renew, wait))
    finally:
        session.close()
