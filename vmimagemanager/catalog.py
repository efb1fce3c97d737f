"""Image catalogs: a site imports an image once, every worker node gets it.

A catalog is a directory on a file system all nodes mount (NFS, CVMFS, Lustre) holding image
files and `images.yaml`, which names each image's files and their sha256 sums:

    images:
      atlas-sl6:
        disk: atlas-sl6-0123456789ab.qcow2
        sha256: <64 hex digits>
        kernel: atlas-sl6-....kernel        # these four only for direct kernel boot
        kernel_sha256: <...>
        initrd: atlas-sl6-....initrd
        initrd_sha256: <...>
        cmdline: console=ttyS0 ...

`images publish` writes it (files first, then the list in one rename); `images sync` on each node
(cron) copies new and changed images in, each file checked against its sum, and removes images
that left the catalog once no lease uses them. A sync only ever replaces or removes images it
imported from that same catalog; an image an admin imported by hand is never touched.

Why it is safe to run everywhere at once: the catalog is only read (and `images.yaml` is replaced
whole by publish, never rewritten in place); each node's store has its own lock; a changed image
is written beside the old version's files, which running VMs keep using until they end (their
overlays name them), and which a later sync deletes once no overlay names them.

Who may change a catalog decides what every node boots, as root: a sync refuses a catalog unless
its directory, every directory above it and images.yaml are root's and writable by no one else
(trusted_directory), opens its files without following links, copies each once while hashing
it, and checks the copy (its sum against the catalog's, then its format: images.inspect_disk).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shutil
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from .errors import ImageError
from .images import (
    OPEN_UNTRUSTED,
    Image,
    ImageStore,
    check_image_name,
    content_file_name,
    overlay_backing,
)
from .node.snapshots import DISK as SNAPSHOT_DISK
from .node.snapshots import SNAPSHOTS, remove_of_image
from .states import LeaseState

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .node import Node

log = logging.getLogger("vmimagemanager.catalog")

CATALOG_FILE = "images.yaml"
ROLES = ("disk", "kernel", "initrd")
# Files of an earlier version are kept this long after an update even when no overlay names
# them yet: a prolog that read the old record may still be waiting for a slot (at most the
# teardown wait) before it creates its overlay.
SUPERSEDED_GRACE = 600.0
SHA256 = re.compile(r"[0-9a-f]{64}")
TRUSTED_UID = 0  # who must own a catalog and every directory above it


class CatalogError(ImageError):
    pass


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    files: dict[str, str]  # role -> path relative to the catalog directory
    sha256: dict[str, str]  # role -> sum
    cmdline: str | None = None

    def differs_from(self, image: Image) -> bool:
        local = {role: image.sha256.get(getattr(image, role) or "") for role in ROLES}
        return (local != {role: self.sha256.get(role) for role in ROLES}
                or (image.cmdline or None) != self.cmdline)


@dataclass
class SyncReport:
    done: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # the sync did not do its work
    warnings: list[str] = field(default_factory=list)  # it did, but jobs may fail
    unchanged: int = 0


def catalog_key(directory: Path) -> str:
    """How an image record names its catalog: the directory's real path."""
    return str(directory.resolve())


MOUNTED_HINT = ("is the catalog file system mounted? ('vmimagemanager images publish NAME DIR' "
                "creates a catalog)")
MAX_LINKS = 40  # as the kernel's path walk


def _refuse_untrusted(path: Path, st: os.stat_result) -> None:
    """CatalogError unless `path` (its lstat `st`) is root's and writable by no one else."""
    if st.st_uid != TRUSTED_UID:
        raise CatalogError(f"{path} belongs to uid {st.st_uid}, not root: whoever owns a catalog "
                           "or a directory above it decides what every node boots; chown root "
                           f"{path} (or move the catalog) and retry")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        fix = ("move the catalog below directories only root writes" if st.st_mode & stat.S_ISVTX
               else f"chmod go-w {path} (or move the catalog)")
        raise CatalogError(f"{path} is writable by group or others (mode "
                           f"{stat.S_IMODE(st.st_mode):o}): whoever can write it decides what "
                           f"every node boots; {fix} and retry")


def trusted_directory(directory: Path) -> Path:
    """The catalog directory's real path, refused (CatalogError) unless every directory from /
    down to it, and every symbolic link followed on the way, is root's and writable by no one
    else: whoever can write any of them can rename what lies below and put a catalog of their
    own, images.yaml, sums and all, in its place. Once all are root's, what this process opens
    below them stays what it checked.

    A directory writable by all with the sticky bit (/tmp, /var/tmp) is refused too, although
    its sticky bit keeps others from renaming entries root owns: the rule stays one an admin
    can check with `namei -l` (nobody but root writes any directory on the way), it does not
    rest on sticky semantics a network or FUSE file system may not enforce, nor on sysctls
    (fs.protected_symlinks) a site may have turned off, and a catalog belongs on a shared
    file system written by its admin, never in a scratch directory. Owner: root only (the
    configuration has no notion of a catalog owner).
    """
    pending = list(reversed(Path(os.path.join(os.getcwd(), directory)).parts[1:]))
    current = Path("/")
    _refuse_untrusted(current, os.lstat(current))
    links = 0
    while pending:
        part = pending.pop()
        if part in ("", "."):
            continue
        if part == "..":
            current = current.parent
            continue
        candidate = current / part
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            raise CatalogError(f"{directory}: no such directory ({candidate} is missing); "
                               f"{MOUNTED_HINT}") from None
        except OSError as exc:
            raise CatalogError(f"{candidate}: {exc.strerror}; give the catalog's directory "
                               "and retry") from None
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if st.st_uid != TRUSTED_UID:
                raise CatalogError(f"{candidate} is a symbolic link of uid {st.st_uid}: a "
                                   "catalog's path may follow only root's links; give the "
                                   "catalog's real path and retry")
            if links > MAX_LINKS:
                raise CatalogError(f"{directory}: more than {MAX_LINKS} symbolic links on the "
                                   "way; give the catalog's real path and retry")
            target = Path(os.readlink(candidate))
            if target.is_absolute():
                current = Path("/")
                pending.extend(reversed(target.parts[1:]))
            else:
                pending.extend(reversed(target.parts))
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise CatalogError(f"{candidate} is not a directory: give the catalog's directory "
                               "and retry")
        _refuse_untrusted(candidate, st)
        current = candidate
    return current


def _catalog_file(directory: Path, relative: object, where: str) -> Path:
    """A catalog file's path, refused unless it lies inside the catalog directory (a root
    sync copies what it names into a store QEMU reads: never /etc/shadow as a 'raw image'),
    is no symbolic link, and every directory between it and the catalog's is root's and
    writable by no one else (as trusted_directory checks those above)."""
    if not isinstance(relative, str) or not relative or relative.startswith("/") \
            or ".." in Path(relative).parts:
        raise CatalogError(f"{where}: file {relative!r} must be a path inside the catalog "
                           "directory (relative, no '..')")
    path = directory / relative
    if not path.resolve().is_relative_to(directory.resolve()):
        raise CatalogError(f"{where}: {relative} leads out of the catalog directory "
                           "(a symbolic link?); put the file itself into the catalog and retry")
    inner = directory
    for part in Path(relative).parts[:-1]:
        inner = inner / part
        try:
            st = os.lstat(inner)
        except FileNotFoundError:
            return path  # the import says the file is missing
        if not stat.S_ISDIR(st.st_mode):
            raise CatalogError(f"{where}: {inner} is a symbolic link or not a directory; put "
                               "the files themselves into the catalog and retry")
        _refuse_untrusted(inner, st)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path
    if stat.S_ISLNK(st.st_mode):
        raise CatalogError(f"{where}: {relative} is a symbolic link; put the file itself into "
                           "the catalog and retry")
    return path


def _read_catalog_file(path: Path) -> bytes:
    """images.yaml's bytes, read through the descriptor its checks were made on: not through
    a link, a regular file, root's, writable by no one else."""
    try:
        fd = os.open(path, OPEN_UNTRUSTED)
    except FileNotFoundError:
        raise CatalogError(f"{path}: no such file; {MOUNTED_HINT}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CatalogError(f"{path} is a symbolic link: put the file itself into the "
                               "catalog and retry") from None
        raise CatalogError(f"{path}: cannot open it ({exc.strerror}); fix it and "
                           "retry") from None
    with os.fdopen(fd, "rb") as handle:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CatalogError(f"{path} is not a regular file: publish the catalog again and "
                               "retry")
        _refuse_untrusted(path, st)
        return handle.read()


def read_catalog(directory: Path) -> dict[str, CatalogEntry]:
    """The catalog's images, validated; CatalogError (one line) for anything wrong in it,
    including who may change it (trusted_directory, images.yaml root's and not writable by
    group or others)."""
    real = trusted_directory(directory)
    path = directory / CATALOG_FILE
    text = _read_catalog_file(real / CATALOG_FILE)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CatalogError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        data = {"images": {}}
    if not isinstance(data, dict) or set(data) != {"images"} \
            or not isinstance(data["images"], (dict, type(None))):
        raise CatalogError(f"{path}: expected one key 'images:' holding a mapping of image "
                           "names")
    entries = {}
    for name, spec in (data["images"] or {}).items():
        where = f"{path}: image {name!r}"
        try:
            check_image_name(str(name))
        except ImageError as exc:
            raise CatalogError(f"{path}: {exc}") from None
        if not isinstance(spec, dict):
            raise CatalogError(f"{where}: expected a mapping with disk and sha256")
        allowed = {"disk", "sha256", "kernel", "kernel_sha256", "initrd", "initrd_sha256",
                   "cmdline"}
        if set(spec) - allowed:
            raise CatalogError(f"{where}: unknown keys {sorted(set(spec) - allowed)}; allowed: "
                               f"{', '.join(sorted(allowed))}")
        files, sums = {}, {}
        for role in ROLES:
            sum_key = "sha256" if role == "disk" else f"{role}_sha256"
            if role not in spec and sum_key not in spec and role != "disk":
                continue
            if not SHA256.fullmatch(str(spec.get(sum_key, ""))):
                raise CatalogError(f"{where}: {sum_key} must be 64 lower-case hex digits")
            files[role] = str(_catalog_file(real, spec.get(role), where).relative_to(real))
            sums[role] = spec[sum_key]
        cmdline = spec.get("cmdline")
        if cmdline is not None and not isinstance(cmdline, str):
            raise CatalogError(f"{where}: cmdline must be a string")
        if "kernel" not in files and ("initrd" in files or cmdline):
            raise CatalogError(f"{where}: initrd and cmdline need a kernel (a disk-boot image's "
                               "boot loader holds them)")
        entries[str(name)] = CatalogEntry(str(name), files, sums, cmdline or None)
    return entries


# -- publishing (one admin node) -------------------------------------------------------------
@contextmanager
def _catalog_lock(directory: Path) -> Iterator[None]:
    with open(directory / ".publish.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _write_catalog(directory: Path, entries: dict[str, CatalogEntry]) -> None:
    images = {}
    for name, entry in sorted(entries.items()):
        spec: dict[str, str] = {}
        for role in ROLES:
            if role in entry.files:
                spec[role] = entry.files[role]
                spec["sha256" if role == "disk" else f"{role}_sha256"] = entry.sha256[role]
        if entry.cmdline:
            spec["cmdline"] = entry.cmdline
        images[name] = spec
    tmp = directory / f".{CATALOG_FILE}.part"
    tmp.write_text("# vmimagemanager image catalog: 'vmimagemanager images publish' writes it, "
                   "'images sync' reads it\n" + yaml.safe_dump({"images": images},
                                                                 sort_keys=False))
    os.chmod(tmp, 0o644)
    tmp.rename(directory / CATALOG_FILE)  # nodes reading it see the old list or the new one


def publish(store: ImageStore, name: str, directory: Path) -> str:
    """Put a local image into the catalog: its files (named by content, never rewritten),
    then the list. Returns what was done."""
    image = store.get(name)
    problems = store.verify(name)
    if problems:
        raise CatalogError(f"not published: {problems[0]}")
    directory.mkdir(parents=True, exist_ok=True)
    trusted_directory(directory)  # nodes would refuse it: say so before anything is copied
    with _catalog_lock(directory):
        entries = read_catalog(directory) if (directory / CATALOG_FILE).exists() else {}
        files, sums = {}, {}
        for role in ROLES:
            local = getattr(image, role)
            if not local:
                continue
            digest = image.sha256[local]
            target = directory / content_file_name(name, role, digest, image.format)
            if not target.exists():
                tmp = target.with_name(f".{target.name}.part")
                shutil.copyfile(store.image_dir / local, tmp)
                os.chmod(tmp, 0o644)
                tmp.rename(target)
            files[role], sums[role] = target.name, digest
        entries[name] = CatalogEntry(name, files, sums, image.cmdline or None)
        _write_catalog(directory, entries)
    return f"published {name} (sha256 {sums['disk'][:16]}...) in {directory / CATALOG_FILE}"


def unpublish(name: str, directory: Path) -> str:
    """Take an image out of the catalog; its files go once no other entry names them (nodes
    remove their copy at their next sync, once no lease uses it)."""
    with _catalog_lock(directory):
        entries = read_catalog(directory)
        if name not in entries:
            raise CatalogError(f"image {name!r} is not in {directory / CATALOG_FILE}")
        gone = entries.pop(name)
        _write_catalog(directory, entries)
        still = {f for entry in entries.values() for f in entry.files.values()}
        for relative in set(gone.files.values()) - still:
            (directory / relative).unlink(missing_ok=True)
    return f"unpublished {name} from {directory / CATALOG_FILE}"


# -- on every node ---------------------------------------------------------------------------
def remove_image(life: Node, name: str) -> list[str]:
    """Remove a local image: its idle spares are retired first; refused (ImageError) while a
    job or a booting spare uses it. Returns what was done."""
    life.images.get(name)  # an unknown name says so before anything is done
    done = []
    for lease in life.leases.all():
        if lease.is_spare and lease.state is LeaseState.SPARE and lease.image == name:
            life.retire_spare(slot=lease.slot)
            done.append(f"retired spare {lease.job_label} in slot {lease.slot}")
    users = [f"job {lease.job_label} (slot {lease.slot})"
             for lease in life.leases.all() if lease.image == name]
    life.images.remove(name, users)
    done += remove_of_image(life.cfg, name)  # running VMs restored from them keep their disk
    return done + [f"removed image {name}"]


def files_in_use(life: Node) -> set[str]:
    """Golden files that overlays on this node name as their backing file."""
    names = set()
    frozen = (life.cfg.overlay_dir / SNAPSHOTS).glob(f"*/{SNAPSHOT_DISK}")
    for overlay in (*life.cfg.overlay_dir.glob("*.qcow2"), *frozen):
        backing = overlay_backing(overlay)
        if backing and Path(backing).parent == life.cfg.image_dir:
            names.add(Path(backing).name)
    return names


def sync(life: Node, directory: Path, dry_run: bool = False,
         grace: float = SUPERSEDED_GRACE) -> SyncReport:
    """Make this node's store match the catalog (the caller holds the store's lock)."""
    entries = read_catalog(directory)
    key = catalog_key(directory)
    base = Path(key)  # its real path, every directory down to it checked by read_catalog
    store = life.images
    local = {image.name: image for image in store.list()}
    report = SyncReport()
    for name, entry in sorted(entries.items()):
        have = local.get(name)
        if have is not None and have.catalog != key:
            report.problems.append(
                f"image {name}: not replaced by the catalog's: the local one was "
                f"{'imported from ' + have.catalog if have.catalog else 'imported by hand'}; "
                f"remove it ('vmimagemanager images remove {name}') to take the catalog's")
            continue
        if have is not None and not entry.differs_from(have):
            report.unchanged += 1
            continue
        action, done = ("import", "imported") if have is None else ("update", "updated")
        if dry_run:
            report.done.append(f"would {action} {name} (sha256 {entry.sha256['disk'][:16]}...)")
            continue
        try:
            image = store.import_image(
                name, base / entry.files["disk"],
                kernel=base / entry.files["kernel"] if "kernel" in entry.files else None,
                initrd=base / entry.files["initrd"] if "initrd" in entry.files else None,
                cmdline=entry.cmdline, expected=entry.sha256, catalog=key,
                update=have is not None)
        except ImageError as exc:
            report.problems.append(f"image {name}: {exc}")
            continue
        line = f"{done} {name} (sha256 {entry.sha256['disk'][:16]}...)"
        if image.superseded:
            line += "; VMs running on the earlier version keep it until they end"
        report.done.append(line)
    for name, have in sorted(local.items()):
        if have.catalog != key or name in entries:
            continue
        if dry_run:
            report.done.append(f"would remove {name} (no longer in the catalog)")
            continue
        try:
            report.done += [f"{line} (no longer in the catalog)"
                            for line in remove_image(life, name)]
        except ImageError as exc:
            report.done.append(f"kept {name} although it left the catalog: {exc}; a later "
                               "sync removes it")
    if not dry_run:
        report.done += store.purge_superseded(files_in_use(life), grace)
    present = {image.name for image in store.list()}
    for vo in life.cfg.vos:
        if vo.image not in present:
            report.warnings.append(f"VO {vo.name}: its image {vo.image} is not on this node "
                                   "(not in the catalog, nor imported by hand): its jobs fail")
    for line in report.done:
        log.info("images sync %s: %s", directory, line)
    for line in report.problems + report.warnings:
        log.warning("images sync %s: %s", directory, line)
    return report


def sync_with_lock(life: Node, directory: Path, dry_run: bool = False) -> SyncReport | None:
    """sync, unless another sync or import holds this node's store (None then: cron runs
    that overlap do nothing rather than queue up)."""
    with life.images.lock(wait=False) as locked:
        if not locked:
            return None
        return sync(life, directory, dry_run)


def wait_splay(seconds: float) -> None:
    """Spread the nodes' cron runs over `seconds` (all nodes reading the share in one second
    is the thundering herd a shared file system notices)."""
    if seconds > 0:
        time.sleep(int.from_bytes(os.urandom(4), "big") / 2**32 * seconds)
