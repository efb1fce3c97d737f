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
from pathlib import Path
from typing import TYPE_CHECKING

from .. import ports
from ..agentwake import poke
from ..config import Slot, UserNetwork
from ..domain_meta import lease_attributes
from ..errors import (
    BootError,
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
from ..states import LeaseState
from .model import JobRequest, lease_files
from .snapshots import (
    DISK,
    SEED,
    STATE,
    Snapshot,
    SnapshotUnusable,
    frozen_disk_size,
    kind_name,
    locked,
    new_directory,
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
    from ..shares import GuestShare
    from . import Node

log = logging.getLogger("vmimagemanager.snapshots")

RESEED_MESSAGE = "crng reseeded due to virtual machine fork"  # Linux >= 5.18, random.c
RESEED_TRIES, POLL = 300, 0.01  # up to 3 s for the kernel's reseed, and for sshd's reload
VMGENID_DRIVER = "/sys/bus/acpi/drivers/vmgenid"
# what the snapshot's guest says of its sshd (its configuration is the image's): the host key
# files, one of them ed25519, and where the listener's pid is
SSHD_FACTS = ('sshd=$(command -v sshd || echo /usr/sbin/sshd); "$sshd" -T -C '
              '"user=root,host=vmim,addr=127.0.0.1" | awk \'tolower($1)=="hostkey" || '
              'tolower($1)=="pidfile" {print tolower($1), $2}\'')


def sshd_facts(output: str) -> tuple[tuple[str, ...], str]:
    """(host key files, pid file) from SSHD_FACTS' output; VmimError if no host key file is
    an ed25519 one (the node makes the restored VM's key, ed25519, and pins it)."""
    pairs = [line.split(maxsplit=1) for line in output.splitlines() if " " in line]
    keys = tuple(path for key, path in pairs if key == "hostkey")
    pidfile = next((path for key, path in pairs if key == "pidfile"), "/run/sshd.pid")
    if not any("ed25519" in path.rsplit("/", 1)[-1] for path in keys):
        raise VmimError("its sshd has no ed25519 HostKey file: a restored VM could not be "
                        "given a host key of the node's making; its VMs boot")
    return keys, pidfile


def renew_script(snap: Snapshot, hostname: str, host_key: bytes, host_key_line: str
                 ) -> tuple[str, str]:
    """The root shell script that makes a restored guest a machine of its own: the clock set
    to the host's, bytes of the host's mixed into its RNG, and a wait (3 s at most; exit 3
    with a line on stderr) for its kernel to reseed on the new VM generation ID; a new host
    name and machine-id; the node's new ed25519 host key in place of every host key the
    snapshot had (other types removed: only the pinned one is wanted), loaded by sshd at once
    (SIGHUP restarts the listener; this login, a child of the old one, stays)."""
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
        f"printf '%s\\n' {q(hostname)} > /proc/sys/kernel/hostname",
        f"if [ -f /etc/hostname ]; then printf '%s\\n' {q(hostname)} > /etc/hostname; fi",
        "rm -f /etc/machine-id",  # a new file (0444), not the image's mode or a link
        f"printf '%s\\n' {secrets.token_hex(16)} > /etc/machine-id; chmod 0444 /etc/machine-id",
        "umask 077",
        *(f"rm -f {q(path)} {q(path + '.pub')}" for path in snap.host_key_files),
        f"cat > {q(ed25519)} <<'VMIM_HOST_KEY'\n{host_key.decode().strip()}\nVMIM_HOST_KEY",
        f"printf '%s\\n' {q(host_key_line)} > {q(ed25519 + '.pub')}",
        "listening() { awk '$4==\"0A\" && $2 ~ /:0016$/ {print $10}' /proc/net/tcp "
        "/proc/net/tcp6 2>/dev/null | sort | tr '\\n' ' '; }",
        f'before=$(listening); kill -HUP "$(cat {q(snap.sshd_pidfile)})"',
        "umask 022",
    ]
    # run last (a bind's script may come in between): sshd's restart goes on meanwhile
    wait = (f'i=0; until now=$(listening); [ -n "$now" ] && [ "$now" != "$before" ]; do '
            f"i=$((i+1)); [ $i -lt {RESEED_TRIES} ] || {{ "
            f"{fail.format('sshd did not listen again with its new host key')}; }}; "
            f"sleep {POLL}; done")
    return "\n".join(lines) + "\n", wait + "\n"


def new_identity(snap: Snapshot, slot: Slot) -> tuple[str, str, str]:
    """The renew script for a VM restored from `snap` into `slot` (its body, and its wait
    for sshd, which must end the same shell), and the host key the VM gets."""
    pair = generate_keypair(f"root@{slot.guest_hostname}")
    line = " ".join(pair.public_line.split()[:2])
    body, wait = renew_script(snap, slot.guest_hostname, pair.private_openssh, line)
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
    """Restore with a forward port free at this moment (as a cold start does: ports.py)."""
    from ..domain_xml import restored_domain_xml  # lxml: only where a domain is made

    lost: set[int] = set()
    for _attempt in range(ports.START_ATTEMPTS):
        port = ports.choose(net.listen, net.ssh_port, life.cfg.ssh_ports, frozenset(lost))
        xml = restored_domain_xml(snap.domain_xml, slot, attributes,
                                  {"vda": overlay, "vdb": snap.path / SEED}, console, port)
        try:
            with life.phase("restore"), locked(snap) as fd:
                write_head(fd, xml)
                life.hv.restore(str(snap.path / STATE))
        except SaveFileError as exc:
            raise SnapshotUnusable(str(exc)) from None
        except BootError as exc:
            if ports.lost_race(str(exc), net.listen, port):
                lost.add(port)
                continue
            raise SnapshotUnusable(str(exc)) from None
        return port
    raise NoFreePort(f"slot {slot.name}: the restored VM's ssh forward lost the race for "
                     f"{len(lost)} ports on {net.listen}; the job is retried later")


def make_snapshot(life: Node, image_name: str, vo: str, shape) -> Snapshot:
    """Boot a spare of the image and shape, check its kernel can be told of a restore, save
    it and freeze its disk; the snapshot replaces any older one of its kind. The slot is free
    again afterwards. VmimError if the image cannot have one (recorded: not tried again
    for that image content)."""
    from .spares import boot_spare, kept_login, spare_host_key

    cfg = life.cfg
    image = life.images.get(image_name)
    life.images.check_unchanged(image)
    content = image_key(image.sha256)
    if why := refused(cfg).get(content):
        raise VmimError(f"no snapshot of image {image_name}: {why}")
    lease = boot_spare(life, image_name, vo, shape)
    slot = cfg.slot(lease.slot)
    files = lease_files(cfg, slot.name, lease.job_label)
    made = new_directory(cfg, image_name, shape)
    try:
        host_key = spare_host_key(files.console)
        login = Endpoint(*life.ssh_address(slot), "root", admin_key(cfg)[0], host_key)
        kept = kept_login(cfg, lease.job_label)
        session = (kept and resume(login, kept)) or connect(login, timeout=30)
        try:
            driver = session.check_call(f"[ -d {VMGENID_DRIVER} ] && echo yes || echo no")
            facts = session.check_call(SSHD_FACTS)
        finally:
            session.close()  # no connection of the node's is saved with the VM
        try:
            if driver.strip() != "yes":
                raise VmimError("its kernel has no VM generation ID driver (Linux >= 5.18, "
                                "CONFIG_VMGENID): a restored guest would not reseed its RNG; "
                                "its VMs boot")
            key_files, pidfile = sshd_facts(facts)
        except VmimError as exc:
            refuse(cfg, content, str(exc))
            raise VmimError(f"no snapshot of image {image_name}: {exc}") from None
        with life.phase("save"):
            xml = life.hv.save(slot.domain_name, str(made / STATE))
        os.chmod(made / STATE, 0o600)
        os.replace(files.overlay, made / DISK)
        os.chmod(made / DISK, 0o644)
        os.replace(files.seed, made / SEED)
        os.chmod(made / SEED, 0o644)
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
        if made.exists():
            shutil.rmtree(made, ignore_errors=True)
    life.end_vm(slot.name, job_label=lease.job_label)
    log.info("snapshot of %s (%s) made in slot %s: %s", image_name, shape, slot.name,
             published.sizes_mib())
    return published


def _check_made(snap: Snapshot) -> None:
    """What QEMU left behind is what a restore expects (VmimError if not)."""
    try:
        frozen_disk_size(snap)
        fd = os.open(snap.path / STATE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
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
    the start from the snapshot failed: the lease is given up and nothing of that start is
    left (an unusable snapshot is removed); the caller boots the VM in a new lease."""
    from .spares import IMAGE_KEY, bind_vm

    cfg = life.cfg
    snap = usable(life, image, request.shape) if restorable_slot(cfg, slot.name) else None
    if snap is None:
        if restorable_slot(cfg, slot.name) and want(cfg, image.name, request.shape):
            poke(cfg)
        return None, ""
    try:
        address = restore_into(life, slot, request.label, snap, lease_attributes(
            request.label, image.name, request.owner, slot.name,
            **{IMAGE_KEY: snap.image_key}))
        xml = life.hv.domain_xml(slot.domain_name)
        if xml is None:
            raise VmimError("the restored VM stopped")
        renew, wait, host_key = new_identity(snap, slot)
        session = snapshot_login(life, snap, address)
        try:
            with life.phase("bind"):
                context = bind_vm(life, slot, request, uid, gid, shares, host_key, xml,
                                  session, {"snapshot": kind_name(image.name, snap.shape)},
                                  around=(renew, wait))
        finally:
            session.close()
    except RetryLater:
        life.abandon(slot.name, request.label)
        raise
    except SnapshotUnusable as exc:
        remove(snap)
        why = f"the snapshot of {image.name} ({snap.shape}) is unusable and was removed: {exc}"
    except (VmimError, OSError) as exc:
        why = f"starting from the snapshot of {image.name} failed: {exc}"
    else:
        return context, ""
    log.warning("job %s slot %s: %s; booting its VM instead", request.label, slot.name, why)
    life.abandon(slot.name, request.label)
    return None, why
