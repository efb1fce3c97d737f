"""Warm spares: a VM booted ahead of any job, later bound to one (docs/warm-spares.md).

Provision (the agent): slot + image -> a booted, idle VM holding only the node's admin key and
the read-only tree shares; its RAM is shared (memfd) when the node serves owners' homes. Bind
(the prolog): the job's fresh key goes into the image's AuthorizedKeysFile for the pool account;
the owner's home gets its own virtiofsd, running as the owner (homeserver.py), hot-plugged into
the running domain and mounted at the home's path in the guest. No host path the spare's guest
could have prepared is looked up or mounted on: a spare sees no home at all, and a bound VM
sees its owner's home, with the owner's rights, and nothing else (docs/shared-storage.md).
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

from .. import keysfiles
from ..accounts import account
from ..agentwake import poke
from ..config import Config, Slot
from ..context import context_dir, ensure_jobs_dir
from ..domain_meta import (
    kept_attributes,
    lease_attributes,
    lease_element,
    lease_metadata,
    shares_memory,
    virtiofs_device,
)
from ..errors import BootError, GuestError, VmimError
from ..guest import Endpoint, connect, console_host_key, resume
from ..homeserver import serve_homes, stop_servers_of
from ..keysfiles import image_key
from ..leases import SPARE_JOB_ID, Lease
from ..seed import generate_keypair
from ..shape import Shape
from ..shares import GuestShare, owner_home, resolve_shares, served_by_owner
from ..states import LeaseState
from .model import JobRequest, StartResult, lease_files
from .state import admin_key
from .usage import BOUND_AT, IDLE_FIGURES

if TYPE_CHECKING:
    from ..context import JobContext
    from ..guest import GuestSession
    from ..images import Image
    from . import Node

log = logging.getLogger("vmimagemanager.spares")

# the guest's tries to mount a hot-plugged home, MOUNT_POLL seconds apart: the guest sees the
# new device a few tenths of a second after the attach (docs/warm-spares.md)
MOUNT_TRIES, MOUNT_POLL = 250, 0.02
SPARE_WEIGHT_DIVISOR = 16  # a spare's CPU weight is the job VM's weight divided by this
SNAPSHOT_TASK = "snap"  # the task ids of VMs booted to become snapshots (restore.py)
WEIGHT_KEY = "cpu_weight"  # in a spare's lease metadata: the weight a job's VM has on this node
IMAGE_KEY = "image_key"  # in a spare's lease metadata: keysfiles.image_key of what it booted
HOST_KEY = "host_key"  # in a restored spare's lease metadata: its new host key
KEYS_FILE_LINE = "vmim-keys-file"  # the bind script's report of where the job's key went
WAIT_POLL = 0.2  # seconds between looks at a booting spare a job waits for
RENEW_TIMEOUT = 60  # seconds for a restored spare's renew script
BIND_TIMEOUT = 120  # seconds for a bind script (the image runs it: bounded)


def bind_script(user: str, home: str, public_key: str,
                mounts: list[tuple[str, str, bool]], keys_file: str | None = None) -> str:
    """The root shell script that binds a spare to its job inside the guest.

    The job's key goes where the image's sshd reads it (`keys_file`, or else `sshd -T` names
    AuthorizedKeysFile; the script prints `KEYS_FILE_LINE path` for keysfiles to keep) and
    never into the home (the user's real, shared home: the key would outlive the VM); each
    (virtiofs tag, path, read-only) of `mounts` is mounted once the hot-plugged device is there
    and checked to be a file system of its own.
    With `keys_file` known (the first bind to this image content checked that the account
    exists) and no share, the script runs no command but shell builtins: each is a fork and
    exec under TCG, on the job's path.
    """
    q = shlex.quote
    lines = ["set -e", f"user={q(user)}; home={q(home)}; key={q(public_key)}"]
    if keys_file is not None:
        lines.append(f"akf={q(keys_file)}; file=$akf")
    else:
        lines += [
            'grep -q "^$user:" /etc/passwd || { echo "vmim-bind: no account $user in this '
            'image" >&2; exit 3; }',
            "sshd=$(command -v sshd || echo /usr/sbin/sshd)",
            'akf=$("$sshd" -T -C "user=$user,host=vmim,addr=127.0.0.1" 2>/dev/null |'
            " awk 'tolower($1)==\"authorizedkeysfile\" {print $2; exit}')",
            '[ -n "$akf" ] || { echo "vmim-bind: sshd -T names no AuthorizedKeysFile" >&2;'
            " exit 3; }",
            'file=$(printf %s "$akf" | sed -e "s|%u|$user|g" -e "s|%h|$home|g" -e "s|%%|%|g")',
            'case $file in /*) ;; *) file="$home/$file" ;; esac',
        ]
    lines += [
        'case $file in "$home"/*) echo "vmim-bind: AuthorizedKeysFile $akf is in the home'
        ' directory; the image must use /etc/ssh/authorized_keys/%u" >&2; exit 3 ;; esac',
        '[ -d "${file%/*}" ] || mkdir -p "${file%/*}"',
        "umask 022",  # sshd reads the file as the user: 0644, a new file (not the image's mode)
        'if [ -e "$file" ] || [ -L "$file" ]; then rm -f "$file"; fi',
        'printf "%s\\n" "$key" > "$file"',
        f'printf "{KEYS_FILE_LINE} %s\\n" "$file"',
    ]
    if mounts:
        lines.append("rootdev=$(stat -c %d /)")
    for tag, target, readonly in mounts:
        options = "ro" if readonly else "defaults"
        lines += [
            f"mkdir -p {q(target)}",
            f"i=0; until mount -t virtiofs -o {options} {q(tag)} {q(target)} 2>/dev/null; do "
            f"i=$((i+1)); [ $i -lt {MOUNT_TRIES} ] || {{ echo vmim-bind: virtiofs {q(tag)} not "
            f"mounted on {q(target)} >&2; exit 3; }}; sleep {MOUNT_POLL}; done",
        ]
        lines.append(f'[ "$(stat -c %d {q(target)})" != "$rootdev" ] || {{ echo vmim-bind: '
                     f'{q(target)} is not mounted >&2; exit 3; }}')
    return "\n".join(lines) + "\n"


def run_bind(session, script: str) -> str:
    """Run the bind script; the file the job's key went to (its KEYS_FILE_LINE)."""
    try:
        out = session.check_call("sh -s", stdin=script.encode(), timeout=BIND_TIMEOUT)
    except GuestError as exc:
        raise VmimError(f"binding the spare failed: {exc}") from None
    prefix = f"{KEYS_FILE_LINE} "
    for line in out.splitlines():
        if line.startswith(prefix):
            return line.removeprefix(prefix)
    raise VmimError(f"binding the spare failed: its script did not say where the job's key "
                    f"went (output: {out.strip()[-200:]!r})")


# -- provision and bind ---------------------------------------------------------------------------
def provision_spare(life: Node, image_name: str, vo: str, shape: Shape,
                    allocated: Callable[[Lease], None] = lambda lease: None) -> Lease:
    """Boot a spare of `image_name` and `shape` in a free place, or restore it from the image's
    snapshot (snapshot_starts: restore.py); returns its lease (`spare`). NoFreeSlot if no
    place is free or its cores and memory are not: a spare never takes what a job holds.
    `allocated` learns the lease as soon as it is taken (the agent: which of the leases it
    holds a boot is working on)."""
    image, lease = _allocate(life, image_name, vo, shape, allocated)
    slot = life.cfg.slot(lease.slot)
    if life.cfg.snapshot_starts:
        try:
            if _restore_spare(life, slot, lease, image):
                return life.leases.transition(slot.name, LeaseState.SPARE, lease.job_label)
        except Exception as exc:  # noqa: BLE001 - the spare is booted instead
            log.warning("spare %s slot %s: restoring it from the snapshot failed (%s); booting "
                        "it instead", lease.job_label, slot.name, exc)
            life.abandon(slot.name, lease.job_label)
            image, lease = _allocate(life, image_name, vo, shape, allocated)
            slot = life.cfg.slot(lease.slot)
        except BaseException:
            life.abandon(slot.name, lease.job_label)
            raise
    _boot_or_abandon(life, slot, lease, image)
    return life.leases.transition(slot.name, LeaseState.SPARE, lease.job_label)


def boot_spare(life: Node, image_name: str, vo: str, shape: Shape, task: str,
               allocated: Callable[[Lease], None] = lambda lease: None) -> Lease:
    """Boot a VM as a spare is booted, never restored, under the task id `task` (a
    snapshot's: restore.make_snapshot); its lease stays `booting`, nothing binds it."""
    from .snapshots import restorable_slot

    places = [s.name for s in life.cfg.slots if restorable_slot(life.cfg, s.name)]
    if not places:
        raise VmimError("no user-network slot on this node: VMs in bridged slots are never "
                        "restored from snapshots, so none is made")
    image, lease = _allocate(life, image_name, vo, shape, allocated, task, places)
    _boot_or_abandon(life, life.cfg.slot(lease.slot), lease, image)
    return lease


def _boot_or_abandon(life: Node, slot: Slot, lease: Lease, image: Image) -> None:
    try:
        _boot(life, slot, lease, image)
    except BaseException as exc:
        log.error("spare %s slot %s: provisioning failed: %s", lease.job_label, slot.name, exc)
        life.abandon(slot.name, lease.job_label)
        raise


def _allocate(life: Node, image_name: str, vo: str, shape: Shape,
              allocated: Callable[[Lease], None], task: str = "",
              places: list[str] | None = None) -> tuple[Image, Lease]:
    cfg = life.cfg
    image = life.images.get(image_name)
    life.images.check_unchanged(image)
    life.hv.connect()
    lease, _ = life.leases.allocate(places or [s.name for s in cfg.slots], SPARE_JOB_ID,
                                    task or secrets.token_hex(6), "", image_name, vo,
                                    shape=shape, budget=cfg.budget)
    allocated(lease)
    return image, lease


def _boot(life: Node, slot: Slot, lease: Lease, image: Image) -> None:
    cfg = life.cfg
    shares = resolve_shares(cfg.shared_paths, "root")  # root: the tree shares only
    admin_path, admin_public = admin_key(cfg)
    # host and port are the VM's, set by launch: its forward gets its port at boot
    login = Endpoint(host="", port=0, user="root", key=admin_path, host_key="")
    kept = kept_login(cfg, lease.job_label)
    if kept is not None:  # made here, at provision; the bind only reads the path
        ensure_jobs_dir(cfg.run_dir)
    life.launch(slot, lease.job_label, image, "", {"root": [admin_public]}, shares, login,
                None, after_start=lambda: _into_background(life, slot, lease.job_label, image),
                keep_login=kept, shape=lease.shape)


def _restore_spare(life: Node, slot: Slot, lease: Lease, image: Image) -> bool:
    """Restore the spare from its image's snapshot; False if there is none it may use (the
    slot is bridged, or none is made yet). An unusable snapshot is removed, and the error
    raised (the agent tries again: a boot, then)."""
    from .restore import count_failure, new_identity, restore_into, snapshot_login, succeeded
    from .snapshots import SnapshotUnusable, restorable_slot, usable

    snap = usable(life, image, lease.shape) if restorable_slot(life.cfg, slot.name) else None
    if snap is None:
        return False
    try:
        address = restore_into(life, slot, lease.job_label, snap, lease_attributes(
            lease.job_label, image.name, "", slot.name, **{IMAGE_KEY: snap.image_key}))
        renew, wait, host_key = new_identity(life.cfg, snap, slot)
        session = snapshot_login(life, snap, address)
        try:
            session.check_call("sh -s", stdin=(renew + wait).encode(), timeout=RENEW_TIMEOUT)
        finally:
            session.close()
    except Exception as exc:
        count_failure(snap, image, exc, unusable=isinstance(exc, SnapshotUnusable))
        raise
    succeeded(snap)
    _into_background(life, slot, lease.job_label, image, host_key)
    kept = kept_login(life.cfg, lease.job_label)
    if kept is not None:  # for the bind, as a booted spare's: not closed here
        ensure_jobs_dir(life.cfg.run_dir)
        connect(Endpoint(*address, "root", admin_key(life.cfg)[0], host_key), timeout=30,
                keep_in=kept)
    return True


def bind_spare(life: Node, request: JobRequest, uid: int, gid: int,
               shares: tuple[GuestShare, ...]) -> tuple[Lease, JobContext] | None:
    """Give the job an idle spare of its image and exactly its shape (`request.shape`, set by
    start_vm): None if there is none, or if binding failed (the spare is destroyed, the caller
    boots a VM for the job: slower, never failing)."""
    with life.phase("lease"):
        claimed = life.leases.claim_spare(request.image, request.job_id, request.task_id,
                                          request.owner, request.vo, request.shape)
    if claimed is None:
        claimed = _wait_for_booting_spare(life, request)
    if claimed is None:
        return None
    spare, lease = claimed
    slot = life.cfg.slot(lease.slot)
    try:
        with life.phase("bind"):
            context = _bind(life, slot, spare, request, uid, gid, shares)
    except Exception as exc:  # noqa: BLE001 - the cold path follows; the reason is logged
        log.warning("job %s slot %s: binding spare %s failed (%s); booting a VM for the job "
                    "instead", request.label, slot.name, spare.job_label, exc)
        life.abandon(slot.name, request.label)
        return None
    except BaseException:
        life.abandon(slot.name, request.label)
        raise
    log.info("job %s: bound spare %s in slot %s", request.label, spare.job_label, slot.name)
    # One spare fewer: the agent boots the next now, not at its next round. Only now: a boot
    # starting takes both cores for a moment, and the bind is on the job's path.
    poke(life.cfg)
    return StartResult(life.leases.transition(slot.name, LeaseState.RUNNING, request.label),
                       context, spare=spare.job_label)


def _into_background(life: Node, slot: Slot, label: str, image: Image,
                     host_key: str = "") -> None:
    """Right after the spare's domain started: note in the lease metadata which image content
    it boots (the bind's keysfiles key) and the weight a job's VM has on this node (bind gives
    it back), then lower the spare's weight to a fraction of it. What the domain's metadata
    says for its whole life (its forward's port) is kept."""
    name = slot.domain_name
    weight = life.hv.cpu_weight(name)
    noted = {**kept_attributes(lease_metadata(life.hv.domain_xml(name) or "<domain/>")),
             IMAGE_KEY: image_key(image.sha256)}
    if host_key:  # a restored spare's, pinned at its restore (its console has none)
        noted[HOST_KEY] = host_key
    if weight is not None:
        noted[WEIGHT_KEY] = str(weight)
    life.hv.set_lease_metadata(name, lease_element(lease_attributes(
        label, image.name, "", slot.name, **noted)))
    if weight is None:
        log.info("spare %s slot %s: libvirt has no CPU controller here; the spare boots at the "
                 "weight of a job's VM", label, slot.name)
        return
    life.hv.set_cpu_weight(name, max(2, weight // SPARE_WEIGHT_DIVISOR))


def _job_weight(life: Node, name: str, meta: dict[str, str]) -> None:
    """Give a spare's domain the weight of a job's VM again (noted at its start). Set without
    reading it first: one libvirt call, and idempotent."""
    weight = int(meta.get(WEIGHT_KEY) or 0)
    if weight:
        life.hv.set_cpu_weight(name, weight)


def _booting_spares(life: Node, image: str, shape: Shape | None) -> list[Lease]:
    """Spares of `image` and `shape` the agent is booting (its process alive, within
    boot_timeout), oldest first; not a VM booted to become a snapshot."""
    now = time.time()
    return sorted((lease for lease in life.leases.all()
                   if lease.is_spare and lease.image == image
                   and not lease.task_id.startswith(SNAPSHOT_TASK)  # never a job's
                   and (shape is None or lease.shape == shape)
                   and lease.state in (LeaseState.PREPARING, LeaseState.BOOTING)
                   and lease.holder_alive() and now < lease.created + life.cfg.boot_timeout),
                  key=lambda lease: lease.created)


def _wait_for_booting_spare(life: Node, request: JobRequest
                            ) -> tuple[Lease, Lease] | None:
    """The agent is booting a spare of the job's image: take it once it is ready, rather than
    boot a second VM beside it (under a burst that would cost every boot's CPU twice, and take
    a slot another image's spare holds). Meanwhile the oldest such spare boots at a job's
    weight. None as soon as none is booting any more (failed, its agent gone, taken by another
    job, or past boot_timeout): the job boots its own VM."""
    booting = _booting_spares(life, request.image, request.shape)
    if not booting:
        return None
    with life.phase("wait for a booting spare"):
        while booting:
            name = life.cfg.slot(booting[0].slot).domain_name
            try:
                meta = lease_metadata(life.hv.domain_xml(name) or "<domain/>")
                if meta.get("job") == booting[0].job_label:
                    _job_weight(life, name, meta)
            except BootError:
                pass  # the domain went away meanwhile: its lease leaves the booting states
            time.sleep(WAIT_POLL)
            claimed = life.leases.claim_spare(request.image, request.job_id, request.task_id,
                                              request.owner, request.vo, request.shape)
            if claimed is not None:
                return claimed
            booting = _booting_spares(life, request.image, request.shape)
    return None


UNIX_SOCKET_PATH_MAX = 108  # sun_path, the terminating NUL included
SSH_SOCKET_SUFFIX = 17  # ssh makes the control socket as PATH.XXXXXXXXXXXXXXXX, then renames it


def kept_login(cfg: Config, label: str) -> Path | None:
    """Where the agent keeps its root login to spare `label` for the prolog that binds it: the
    spare's own directory among the job contexts (root's, 0700; removed with the lease, by
    the bind, or by reconcile as an orphan). None where the socket's path would be too long
    for a unix socket (ssh adds a suffix while it makes it): the bind then logs in itself."""
    path = context_dir(cfg.run_dir, label)
    too_long = len(os.fsencode(path / "control")) + SSH_SOCKET_SUFFIX >= UNIX_SOCKET_PATH_MAX
    return None if too_long else path


def idle_host_key(life: Node, slot: Slot, lease: Lease) -> str:
    """An idle spare's host key: noted in its domain's metadata if it was restored from a
    snapshot (pinned then), else the one it printed on its console at its boot."""
    xml = life.hv.domain_xml(slot.domain_name)
    noted = lease_metadata(xml).get(HOST_KEY, "") if xml is not None else ""
    return noted or spare_host_key(lease_files(life.cfg, slot.name, lease.job_label).console)


def spare_host_key(console: Path) -> str:
    """The host key the spare printed at its boot (nothing but its own boot wrote there yet)."""
    if not (key := console_host_key(console)):
        raise VmimError(f"no host key on the spare's console {console}")
    return key


def _attach_homes(life: Node, name: str, request: JobRequest, homes: list[GuestShare],
                  xml: str) -> None:
    """The owner's home(s), each served by a virtiofsd of the owner's, hot-plugged into the
    spare (`xml`: its running domain's, which must share its RAM: vhost-user maps it)."""
    if not shares_memory(xml):
        raise VmimError(f"the spare {name} was booted without shared memory (made under "
                        "another configuration); the job boots its own VM")
    servers = serve_homes(life.cfg.run_dir, life.cfg.image_dir, request.label,
                          account(request.owner), homes, life.qemu_ids())
    try:
        for server in servers:
            life.hv.attach_device(name, virtiofs_device(server.tag, str(server.socket)))
    except BaseException:
        stop_servers_of(life.cfg.run_dir, request.label)
        raise


def _bind(life: Node, slot: Slot, spare: Lease, request: JobRequest, uid: int, gid: int,
          shares: tuple[GuestShare, ...]) -> JobContext:
    cfg, name = life.cfg, slot.domain_name
    old, new = lease_files(cfg, slot.name, spare.job_label), lease_files(cfg, slot.name,
                                                                          request.label)
    xml = life.hv.domain_xml(name)
    if xml is None:
        raise VmimError(f"the spare's domain {name} is not running")
    spare_meta = lease_metadata(xml)
    host_key = spare_meta.get(HOST_KEY) or spare_host_key(old.console)
    _job_weight(life, name, spare_meta)
    # The domain says what it used while idle (not the job's).
    idle = life.hv.usage(name)
    if idle is None:
        raise VmimError(f"the spare's domain {name} is not running")
    os.replace(old.overlay, new.overlay)  # QEMU keeps its open file; the name is the job's
    if old.seed.exists():  # a restored spare has none of its own (the snapshot's)
        os.replace(old.seed, new.seed)
    kept = kept_login(cfg, spare.job_label)
    session = (kept and resume(life.admin_login(slot, host_key, life.ssh_address(slot, xml)),
                               kept))
    try:
        return bind_vm(life, slot, request, uid, gid, shares, host_key, xml, session,
                       {"spare": spare.job_label, BOUND_AT: f"{time.time():.3f}",
                        **{f"{k}_at_bind": f"{idle[k]:.3f}" for k in IDLE_FIGURES}})
    finally:
        if session:
            session.close()
        if kept is not None:  # its master is gone by now; the directory goes also if unused
            shutil.rmtree(kept, ignore_errors=True)


def bind_vm(life: Node, slot: Slot, request: JobRequest, uid: int, gid: int,
            shares: tuple[GuestShare, ...], host_key: str, xml: str,
            session: GuestSession | None, noted: dict[str, str],
            around: tuple[str, str] = ("", "")) -> JobContext:
    """Bind a running VM that holds only the admin key (a spare, a restored snapshot) to the
    job: its owner's home attached, its lease metadata the job's (with `noted`), the job's
    key put in by root's login (`session`, the caller's to close; else one of its own,
    pinned to `host_key`) between the two scripts `around` (one shell), the job's context
    written."""
    cfg, name = life.cfg, slot.domain_name
    meta = lease_metadata(xml)
    address = life.ssh_address(slot, xml)  # the port its forward got when it started
    homes = [share for share in shares if served_by_owner(share)]
    if homes:  # first: the guest finds the new device while the rest of the bind goes on
        _attach_homes(life, name, request, homes, xml)
    life.hv.set_lease_metadata(name, lease_element(lease_attributes(
        request.label, request.image, request.owner, slot.name, **kept_attributes(meta),
        **noted)))
    job_key = generate_keypair(f"vmim-job-{request.label}")
    content = meta.get(IMAGE_KEY, "")  # none in a spare booted by an older version
    keys_file = keysfiles.known(cfg, content, request.owner) if content else None
    script = around[0] + bind_script(request.owner, owner_home(request.owner),
                                     job_key.public_line,
                                     [(share.tag, share.path, share.readonly) for share in homes],
                                     keys_file) + around[1]
    if session is not None:
        went_to = run_bind(session, script)
    else:
        own = connect(life.admin_login(slot, host_key, address), timeout=10)
        try:
            went_to = run_bind(own, script)
        finally:
            own.close()
    if content and keys_file is None and keysfiles.usable(went_to):
        try:
            keysfiles.remember(cfg, content, request.owner, went_to)
        except OSError as exc:  # the job is bound; the next bind asks sshd again
            log.warning("cannot keep where image %s's sshd reads %s's keys (%s); the next bind "
                        "asks it again", request.image, request.owner, exc)
    return life.write_job_context(slot, request, host_key, job_key.private_openssh, uid, gid,
                                  shares, address)
