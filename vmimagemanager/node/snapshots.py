"""Memory snapshots: a VM booted once, saved, and restored for each job (docs/snapshots.md).

A snapshot of an image and a shape is what a warm spare is at the moment a job could bind it
(booted, idle, holding only the node's admin key and the tree shares), saved to a file by
libvirt (the VM stops), with its disk frozen as that moment knew it. Each start restores it
into a new domain of its own (restore.py): a new per-job overlay on top of the frozen disk,
its own name, UUID and VM generation ID, then a new host key, machine-id, host name and clock
before the same bind as a spare's.

Everything of a snapshot lives in one root-made directory under overlay_dir/snapshots (0711):
the frozen disk and the seed the VM booted with (root's, 0640 with QEMU's group: QEMU reads
them, libvirt is told not to relabel them), and private/ (0700): the saved state (a copy root
made after the save, so no QEMU holds it open; libvirt hands restores a descriptor, and while
it relabels the file for one no other QEMU can reach it by name), the lock and record.json,
written last: a directory without a readable record is not a snapshot. A record names what the
snapshot was made from (the image's content, and `recipe`: the node's settings a VM is built
with); one whose image or recipe changed is removed before it could be used.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..accel import resolve_domain_type
from ..config import Config, UserNetwork
from ..errors import ImageError, VmimError
from ..files import read_private_json, replace_private_file, write_private_file
from ..images import QCOW2_MAGIC, qcow2_backing_format, qcow2_header_problem
from ..keysfiles import image_key
from ..leases import process_start
from ..shape import Shape
from ..shares import needs_shared_memory
from .state import admin_key

if TYPE_CHECKING:
    from ..images import Image
    from . import Node

log = logging.getLogger("vmimagemanager.snapshots")

SNAPSHOTS = "snapshots"  # in overlay_dir
DISK, SEED, PRIVATE = "disk.qcow2", "seed.iso", "private"  # in a snapshot's directory
RECORD, STATE, LOCK = "record.json", "state", "lock"  # in its private/
MAX_PER_IMAGE = 4  # snapshots of one image (of shapes jobs asked for; spares' shapes always)
FAILURES = "failures"  # in private/: restores in a row libvirt refused
REMOVE_AFTER = 3
# images whose kernel cannot be told it was restored: no snapshot is made of them (restore.py)
REFUSED = "refused.json"


@dataclass(frozen=True)
class Snapshot:
    """One snapshot's record (record.json) and where its files are."""

    image: str
    cores: int
    memory_mib: int
    image_key: str  # keysfiles.image_key of the image content it booted
    recipe: str  # recipe(cfg) when it was made
    host_key: str  # the host key the saved VM has (every restore replaces it at once)
    host_key_files: tuple[str, ...]  # its sshd's HostKey files (restore.sshd_facts)
    sshd_pidfile: str
    domain_xml: str  # libvirt's XML of the saved VM, read through libvirt before the save
    golden: str  # the frozen disk's one backing file (the image's disk) and its format
    golden_format: str
    created: float
    directory: str

    @property
    def shape(self) -> Shape:
        return Shape(self.cores, self.memory_mib)

    @property
    def path(self) -> Path:
        return Path(self.directory)

    @property
    def state(self) -> Path:
        return self.path / PRIVATE / STATE

    def sizes_mib(self) -> dict[str, float]:
        """What it takes on disk: the saved memory and the frozen disk's own blocks."""
        out = {}
        for key, path in (("memory_mib", self.state), ("disk_mib", self.path / DISK)):
            try:
                out[key] = round(os.stat(path).st_blocks * 512 / 2**20, 1)
            except OSError:
                out[key] = 0.0
        return out


def snapshots_dir(cfg: Config) -> Path:
    return cfg.overlay_dir / SNAPSHOTS


def kind_name(image: str, shape: Shape) -> str:
    """The directory name of `image`'s snapshot for `shape` (image names are checked names)."""
    return f"{image}.{shape.cores}c{shape.memory_mib}m"


def recipe(cfg: Config) -> str:
    """The node's settings a snapshot's VM was built with, besides its image and shape: the
    accelerator, shared RAM for the owners' homes, the tree shares, the admin key the saved
    guest lets in. A snapshot made under other ones is not used."""
    facts = {"domain_type": resolve_domain_type(cfg.domain_type),
             "shared_memory": needs_shared_memory(cfg),
             "shared_paths": [repr(item) for item in cfg.shared_paths],
             "admin_key": admin_key(cfg)[1]}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def read(cfg: Config, image: str, shape: Shape) -> Snapshot | None:
    """The snapshot of `image` and `shape`, if one is complete (whether usable or not)."""
    return _read_record(snapshots_dir(cfg) / kind_name(image, shape))


def _read_record(directory: Path) -> Snapshot | None:
    data = read_private_json(directory / PRIVATE / RECORD)
    try:
        return Snapshot(**{**data, "host_key_files": tuple(data.get("host_key_files", ())),
                           "directory": str(directory)})
    except TypeError:
        return None


def all_snapshots(cfg: Config) -> list[Snapshot]:
    base = snapshots_dir(cfg)
    if not base.is_dir():
        return []
    found = (_read_record(path) for path in sorted(base.iterdir())
             if path.is_dir() and not path.name.startswith("."))
    return [snap for snap in found if snap is not None]


def why_unusable(cfg: Config, snap: Snapshot, image: Image) -> str:
    """Why the snapshot must not start a VM of `image` any more ('' if it may)."""
    if snap.image_key != image_key(image.sha256) or image.imported_at > snap.created:
        return f"image {image.name} changed after the snapshot was made"
    if snap.recipe != recipe(cfg):
        return "the node's VM settings (accelerator, shares or admin key) changed since"
    missing = [path.name for path in (snap.state, snap.path / DISK, snap.path / SEED)
               if not path.is_file()]
    if missing:
        return f"its {', '.join(missing)} is missing"
    return ""


def usable(life: Node, image: Image, shape: Shape) -> Snapshot | None:
    """The snapshot a VM of `image` and `shape` may start from; an outdated one is removed
    (the agent makes a new one)."""
    snap = read(life.cfg, image.name, shape)
    if snap is None:
        return None
    if why := why_unusable(life.cfg, snap, image):
        log.info("snapshot of %s (%s) removed: %s", image.name, shape, why)
        remove(snap)
        return None
    return snap


MAX_BACKING_NAME = 1023  # QEMU's own limit for a backing file name


def frozen_disk_size(snap: Snapshot) -> int:
    """The frozen disk's virtual size, read from its own header (not through a link), which
    must name exactly the image's disk as its backing file and nothing else: QEMU wrote this
    file while the saved VM ran, and libvirt (root) follows the backing file a disk names."""
    path = snap.path / DISK
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ImageError(f"snapshot disk {path}: {exc.strerror}") from None
    try:
        head = os.pread(fd, 20, 0)
        if len(head) < 20 or not head.startswith(QCOW2_MAGIC):
            raise ImageError(f"snapshot disk {path} is not a qcow2 file")
        offset, length = int.from_bytes(head[8:16], "big"), int.from_bytes(head[16:20], "big")
        if not offset or not 0 < length <= MAX_BACKING_NAME:
            raise ImageError(f"snapshot disk {path} names no backing file of a sane length")
        named = os.pread(fd, length, offset).decode(errors="replace")
        if named != snap.golden:
            raise ImageError(f"snapshot disk {path} names backing file {named!r}, not the "
                             f"image's {snap.golden}")
        size, problem = qcow2_header_problem(fd, allow_backing=True)
        if not problem and qcow2_backing_format(fd) != snap.golden_format:
            problem = f"does not name {snap.golden_format} as its backing file's format"
    finally:
        os.close(fd)
    if problem:
        raise ImageError(f"snapshot disk {path} {problem}")
    return size


@contextmanager
def locked(snap: Snapshot) -> Iterator[int]:
    """The saved state open for a restore's rewrite of its head (savefile.write_head), with
    the snapshot's lock held: one restore of it at a time, and no replacement meanwhile.
    SnapshotUnusable if the state is not the root-owned regular file root made (one link);
    VmimError if the snapshot was replaced while this waited for the lock."""
    private = snap.path / PRIVATE
    lock = os.open(private / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        now = _read_record(snap.path)
        if now is None or now.created != snap.created:
            raise VmimError("the snapshot was replaced or removed meanwhile")
        try:
            fd = os.open(snap.state, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise SnapshotUnusable(f"its saved state cannot be opened ({exc.strerror})") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_nlink != 1:
                raise SnapshotUnusable("its saved state is not the root-owned file root made")
            yield fd
        finally:
            os.close(fd)
    finally:
        os.close(lock)


def remove(snap: Snapshot) -> None:
    """Remove a snapshot (VMs restored from it keep their open frozen disk)."""
    _retire(snap.path, snap.created)


def _retire(directory: Path, created: float | None = None) -> None:
    """Rename the directory aside under its lock (a restore holding it finishes first), then
    delete it; if it is still the snapshot made at `created` (None: whatever is there). Gone
    already (another process removed it): nothing to do."""
    try:
        lock = os.open(directory / PRIVATE / LOCK,
                       os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileNotFoundError:
        return
    aside = directory.with_name(f".{directory.name}.gone-{os.getpid()}-{time.monotonic_ns()}")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        now = _read_record(directory)
        if created is not None and (now is None or now.created != created):
            return  # replaced by a newer one meanwhile, or removed
        os.rename(directory, aside)
    except FileNotFoundError:
        return
    finally:
        os.close(lock)
    shutil.rmtree(aside, ignore_errors=True)


def note_failure(snap: Snapshot) -> bool:
    """Count a restore libvirt refused; True once REMOVE_AFTER came in a row (remove it)."""
    path = snap.path / PRIVATE / FAILURES
    count = int(read_private_json(path).get("count", 0)) + 1
    replace_private_file(path, json.dumps({"count": count}).encode())
    return count >= REMOVE_AFTER


def note_success(snap: Snapshot) -> None:
    (snap.path / PRIVATE / FAILURES).unlink(missing_ok=True)


def remove_of_image(cfg: Config, image: str) -> list[str]:
    """Remove every snapshot of `image` (the image is removed or replaced)."""
    gone = [snap for snap in all_snapshots(cfg) if snap.image == image]
    for snap in gone:
        remove(snap)
    return [f"removed the snapshot of {snap.image} ({snap.shape})" for snap in gone]


def new_directory(cfg: Config, image: str, shape: Shape) -> Path:
    """A fresh directory a snapshot is made in (and its private/), renamed into place by
    `publish`. Modes set after mkdir: a umask does not narrow them."""
    base = snapshots_dir(cfg)
    base.mkdir(exist_ok=True)
    os.chmod(base, 0o711)
    path = base / f".{kind_name(image, shape)}.new-{os.getpid()}-{time.monotonic_ns()}"
    path.mkdir()
    os.chmod(path, 0o711)
    (path / PRIVATE).mkdir()
    os.chmod(path / PRIVATE, 0o700)
    return path


def publish(cfg: Config, made: Path, snap: Snapshot) -> Snapshot:
    """Write the record into the made directory and put it in place of any older snapshot of
    the same image and shape."""
    target = snapshots_dir(cfg) / kind_name(snap.image, snap.shape)
    record = {k: v for k, v in asdict(snap).items() if k != "directory"}
    write_private_file(made / PRIVATE / RECORD, json.dumps(record).encode())
    _retire(target)
    os.rename(made, target)
    return Snapshot(**{**record, "host_key_files": tuple(snap.host_key_files),
                       "directory": str(target)})


WANTED = "wanted"  # in snapshots/: a file per image and shape a job found no snapshot of


def want(cfg: Config, image: str, shape: Shape) -> bool:
    """Note that a job of `image` and `shape` found no snapshot: the agent makes one. True
    the first time (the agent is to be woken)."""
    base = snapshots_dir(cfg)
    if not base.is_dir():
        base.mkdir(exist_ok=True)
        os.chmod(base, 0o711)
    directory = base / WANTED
    directory.mkdir(mode=0o700, exist_ok=True)
    try:
        write_private_file(directory / kind_name(image, shape), json.dumps(
            {"image": image, "cores": shape.cores, "memory_mib": shape.memory_mib}).encode())
    except FileExistsError:
        return False
    return True


def wanted(cfg: Config) -> list[tuple[str, Shape]]:
    """The images and shapes jobs found no snapshot of (want)."""
    directory = snapshots_dir(cfg) / WANTED
    found = []
    for path in sorted(directory.glob("*")) if directory.is_dir() else ():
        data = read_private_json(path)
        try:
            found.append((str(data["image"]), Shape(int(data["cores"]),
                                                    int(data["memory_mib"]))))
        except (KeyError, TypeError, ValueError):
            path.unlink(missing_ok=True)
    return found


def unwant(cfg: Config, image: str, shape: Shape) -> None:
    (snapshots_dir(cfg) / WANTED / kind_name(image, shape)).unlink(missing_ok=True)


def unfinished(cfg: Config) -> list[Path]:
    """Snapshot directories a process was making or removing and did not finish (it is gone):
    new_directory's and _retire's names carry the pid."""
    base = snapshots_dir(cfg)
    found = []
    for path in base.glob(".*") if base.is_dir() else ():
        tail = path.name.rsplit(".", 1)[-1]  # new-PID-NS or gone-PID-NS
        kind, _, rest = tail.partition("-")
        pid = rest.split("-", 1)[0]
        if kind in ("new", "gone") and pid.isdigit() and (
                kind == "gone" or process_start(int(pid)) is None):
            found.append(path)
    return found


def refused(cfg: Config) -> dict[str, str]:
    """Image content (image_key) -> why no snapshot is made of it."""
    return read_private_json(snapshots_dir(cfg) / REFUSED)


def refuse(cfg: Config, content: str, why: str) -> None:
    noted = {**refused(cfg), content: why}
    snapshots_dir(cfg).mkdir(mode=0o711, exist_ok=True)
    replace_private_file(snapshots_dir(cfg) / REFUSED, json.dumps(noted).encode())


def restorable_slot(cfg: Config, slot_name: str) -> bool:
    """Whether a VM restored from a snapshot may run in the slot: only behind a user-network
    forward, which the restored QEMU itself binds on loopback. On a bridge, a guest that read
    the snapshot's old host key (it is in the frozen disk every restored guest can read)
    could answer for a newly restored VM's address before that VM has a key of its own."""
    return isinstance(cfg.slot(slot_name).network, UserNetwork)


class SnapshotUnusable(VmimError):
    """A snapshot could not start a VM; the VM boots instead (the reason is kept)."""
