"""Golden images and per-lease copy-on-write overlays.

An image is a disk file (qcow2 or raw) plus, for direct kernel boot, a kernel, an initrd and a
command line, all kept in the image directory next to a JSON record holding their sha256 sums.
Jobs never write a golden image: each lease boots from a qcow2 overlay whose backing file is the
golden image, created in milliseconds whatever the image's size and deleted at release.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import stat
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .config import valid_name
from .errors import ImageError, NoSpace
from .rootenv import clean_environment

CHUNK = 4 * 1024 * 1024
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class BootSpec:
    """How the guest boots: from its disk, or a kernel/initrd given directly (test images)."""

    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str | None = None


@dataclass(frozen=True)
class Image:
    name: str
    disk: str  # file name inside the image directory
    format: str
    sha256: dict[str, str]  # file name -> hex digest, disk and boot files
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    imported_at: float = 0.0
    source: str = ""
    notes: dict[str, str] = field(default_factory=dict)
    # file name -> [size, mtime_ns] at import: a cheap check before every use (sha256 is for
    # `images verify`); empty in records written by earlier versions (no check then).
    stats: dict[str, list[int]] = field(default_factory=dict)
    # Set by `images sync`: the catalog directory this image comes from (only such images are
    # updated or retired by a sync), and files of earlier versions that running VMs may still
    # use (file name -> when they were superseded), deleted once nothing uses them.
    catalog: str = ""
    superseded: dict[str, float] = field(default_factory=dict)

    def boot_spec(self, image_dir: Path) -> BootSpec:
        return BootSpec(
            kernel=image_dir / self.kernel if self.kernel else None,
            initrd=image_dir / self.initrd if self.initrd else None,
            cmdline=self.cmdline,
        )


def content_file_name(name: str, role: str, digest: str, disk_format: str) -> str:
    """An image file named by its content (NAME-<12 hex of its sha256>.EXT): what catalogs and
    the images synced from them hold, so that a changed image never overwrites a file a VM uses."""
    return f"{name}-{digest[:12]}.{disk_format if role == 'disk' else role}"


def check_image_name(name: str) -> str:
    if not valid_name(name):
        raise ImageError(f"invalid image name {name!r}: use letters, digits, '_', '.', '-' "
                         "(no '/', no '..', at most 63 characters)")
    return name


# How root opens a file it did not write itself (an image to import, a catalog's file, a golden
# image before an overlay names it): never through a symbolic link at its last component, never
# blocking on a FIFO; the caller then checks (fstat) that it is a regular file.
OPEN_UNTRUSTED = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
QCOW2_MAGIC = b"QFI\xfb"
PROBE_SIZE = 512  # what QEMU reads to guess a format (BLOCK_PROBE_BUF_SIZE)
# qcow2 (docs/interop/qcow2.txt): incompatible feature bits QEMU may open an image with here
# (dirty, corrupt: refused below, compression type, extended L2); bit 2 is "external data file".
QCOW2_INCOMPAT_CORRUPT = 1 << 1
QCOW2_INCOMPAT_DATA_FILE = 1 << 2
QCOW2_INCOMPAT_KNOWN = 0b11011
QCOW2_AUTOCLEAR_DATA_FILE_RAW = 1 << 1
QCOW2_EXT_DATA_FILE = 0x44415441
QCOW2_EXT_CRYPTO = 0x0537BE77
QCOW2_EXT_BACKING_FORMAT = 0xE2792ACA
# The other formats QEMU recognises by their first bytes (its block drivers' probe functions):
# each is refused by name, and qemu-img is never run on them (a VMDK descriptor names extent
# files qemu-img would open as root, a FIFO among them blocks it for ever).
OTHER_FORMATS = (
    (b"LUKS\xba\xbe", "luks (encrypted)"), (b"QED\x00", "qed"), (b"KDMV", "vmdk"),
    (b"COWD", "vmdk"), (b"conectix", "vpc (vhd)"), (b"vhdxfile", "vhdx"),
    (b"WithoutFreeSpace", "parallels"), (b"WithouFreSpacExt", "parallels"),
    (b"Bochs Virtual HD Image", "bochs"),
    (b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$FILE\n", "cloop"),
)
VDI_SIGNATURE = 0xBEDA107F  # little-endian at offset 0x40


def open_regular(path: Path) -> int:
    """Open `path` for reading as OPEN_UNTRUSTED says; the descriptor of a regular file, else
    ImageError. Whatever is checked or copied afterwards is read from this descriptor: a name
    swapped after the open changes nothing."""
    try:
        fd = os.open(path, OPEN_UNTRUSTED)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ImageError(f"{path} is a symbolic link: give the file itself (its real path) "
                             "and retry") from None
        raise ImageError(f"{path}: cannot open it ({exc.strerror}); fix it and retry") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ImageError(f"{path} is not a regular file (a FIFO or a device?): give an image "
                         "file and retry")
    return fd


def _vmdk_descriptor(head: bytes) -> bool:
    """QEMU's vmdk_probe on a text descriptor: comment and blank lines, then 'version=N'."""
    p, end = 0, len(head)
    while p < end:
        if head[p:p + 1] == b"#":
            nl = head.find(b"\n", p)
            p = end if nl < 0 else nl + 1
            continue
        if head[p:p + 1] == b" ":
            while p < end and head[p:p + 1] == b" ":
                p += 1
            if p < end and head[p:p + 1] == b"\r":
                p += 1
            if p == end or head[p:p + 1] != b"\n":
                return False
            p += 1
            continue
        return any(head.startswith(f"version={v}{eol}".encode(), p)
                   for v in "123" for eol in ("\n", "\r\n"))
    return False


def other_format(head: bytes) -> str | None:
    """The format QEMU would take these first bytes for, if neither qcow2 nor raw."""
    for magic, name in OTHER_FORMATS:
        if head.startswith(magic):
            return name
    if head.startswith(QCOW2_MAGIC) and head[4:8] == b"\0\0\0\1":
        return "qcow (version 1)"
    if len(head) >= 0x44 and struct.unpack_from("<I", head, 0x40)[0] == VDI_SIGNATURE:
        return "vdi"
    if _vmdk_descriptor(head[:PROBE_SIZE]):
        return "vmdk (descriptor)"
    return None


def qcow2_extensions(fd: int, version: int, cluster_bits: int) -> Iterator[tuple[int, bytes]]:
    """The header extensions of the qcow2 file on `fd` (in its first cluster): (type, data)."""
    end = struct.unpack_from(">I", os.pread(fd, 4, 100))[0] if version == 3 else 72
    cluster = os.pread(fd, 1 << cluster_bits, 0)
    while end + 8 <= len(cluster):
        ext, length = struct.unpack_from(">II", cluster, end)
        if ext == 0:
            return
        yield ext, cluster[end + 8:end + 8 + length]
        end += 8 + ((length + 7) & ~7)


def qcow2_backing_format(fd: int) -> str | None:
    """The backing file's format the qcow2 header on `fd` names (None if none); call after
    qcow2_header_problem found it sound."""
    version, cluster_bits = struct.unpack(">I12xI", os.pread(fd, 20, 4))
    return next((data.decode(errors="replace")
                 for ext, data in qcow2_extensions(fd, version, cluster_bits)
                 if ext == QCOW2_EXT_BACKING_FORMAT), None)


def qcow2_header_problem(fd: int, allow_backing: bool = False) -> tuple[int, str | None]:
    """Read a qcow2 header (and its extensions, in the first cluster) from `fd`, without QEMU;
    returns (virtual size, what makes it unfit as a golden image or None). Unfit: a backing
    file (unless `allow_backing`: a snapshot's frozen disk, whose caller checks which one),
    an external data file (the guest would read and write a host file through it),
    encryption, a corrupt flag, a version or an incompatible feature this code does not know."""
    head = os.pread(fd, 104, 0)
    if len(head) < 72 or not head.startswith(QCOW2_MAGIC):
        return 0, "is not a qcow2 file (truncated header)"
    version, backing, _, cluster_bits, size, crypt = struct.unpack_from(">IQIIQI", head, 4)
    if version not in (2, 3):
        return size, f"is qcow2 version {version}, which is not supported"
    if backing and not allow_backing:
        return size, "names a backing file"
    if crypt:
        return size, "is encrypted"
    if not 9 <= cluster_bits <= 21:
        return size, f"has an invalid cluster size (2^{cluster_bits})"
    if version == 3:
        if len(head) < 104:
            return size, "is not a qcow2 file (truncated header)"
        incompat, _, autoclear = struct.unpack_from(">QQQ", head, 72)
        if incompat & QCOW2_INCOMPAT_DATA_FILE or autoclear & QCOW2_AUTOCLEAR_DATA_FILE_RAW:
            return size, "names an external data file (a host file the guest would read)"
        if incompat & QCOW2_INCOMPAT_CORRUPT:
            return size, "is marked corrupt (repair it with qemu-img check -r all)"
        if incompat & ~QCOW2_INCOMPAT_KNOWN:
            return size, f"uses incompatible features {incompat:#x} this version does not know"
    for ext, _data in qcow2_extensions(fd, version, cluster_bits):
        if ext == QCOW2_EXT_DATA_FILE:
            return size, "names an external data file (a host file the guest would read)"
        if ext == QCOW2_EXT_CRYPTO:
            return size, "is encrypted"
    return size, None


def _refuse(shown: object, problem: str) -> ImageError:
    if "backing file" in problem or "data file" in problem:
        fix = ("give a self-contained image (qemu-img info shows neither a backing nor a data "
               "file; flatten one you made with qemu-img convert -O qcow2 IN OUT)")
    elif "encrypted" in problem:
        fix = "give it unencrypted (qemu-img convert -O qcow2 with its key, then import that)"
    else:
        fix = "convert it to qcow2 (qemu-img convert -O qcow2 IN OUT)"
    return ImageError(f"{shown}: {problem}; not imported: {fix} and retry")


def inspect_disk(path: Path, shown: object = None) -> str:
    """The format ('qcow2' or 'raw') of the disk file `path`, the root-only copy an import just
    made and hashed (the file that will be used, never the source it came from); ImageError
    naming `shown` (the source, for the admin) if it is unfit as a golden image.

    Two checks. First this code reads the header itself: a qcow2 header is checked field by
    field (qcow2_header_problem) and any other format QEMU would recognise is refused by its
    magic, so that qemu-img never opens an image that names other files (a data file, a backing
    file, a VMDK extent: as root, that is opening a host file an attacker chose). Then
    `qemu-img info -f FORMAT` (the format explicit, never probed) must agree: no backing file,
    no data file, no encryption.
    """
    shown = shown or path
    fd = open_regular(path)
    try:
        head = os.pread(fd, PROBE_SIZE, 0)
        if head.startswith(QCOW2_MAGIC) and head[4:8] != b"\0\0\0\1":
            fmt = "qcow2"
            problem = qcow2_header_problem(fd)[1]
            if problem:
                raise _refuse(shown, problem)
        elif (other := other_format(head)) is not None:
            raise _refuse(shown, f"is a {other} image; only qcow2 and raw are accepted")
        else:
            fmt = "raw"
    finally:
        os.close(fd)
    try:
        out = subprocess.run(["qemu-img", "info", "-f", fmt, "--output=json", str(path)],
                             check=True, capture_output=True, text=True,
                             env=clean_environment()).stdout
    except subprocess.CalledProcessError as exc:
        raise ImageError(f"{shown}: not a disk image qemu-img can read as {fmt} "
                         f"({' '.join(exc.stderr.strip().splitlines()[-1:])}); not imported: "
                         "check the file and retry") from None
    info = json.loads(out)
    data = (info.get("format-specific") or {}).get("data") or {}
    if info.get("format") != fmt:
        raise _refuse(shown, f"is read by qemu-img as {info.get('format')!r}, not {fmt}")
    if any(info.get(key) for key in ("backing-filename", "full-backing-filename",
                                     "backing-filename-format")):
        raise _refuse(shown, "names a backing file")
    if data.get("data-file") or data.get("data-file-raw"):
        raise _refuse(shown, "names an external data file (a host file the guest would read)")
    if info.get("encrypted") or data.get("encrypt"):
        raise _refuse(shown, "is encrypted")
    if data.get("corrupt"):
        raise _refuse(shown, "is marked corrupt (repair it with qemu-img check -r all)")
    return fmt


def _copy_fd_with_hash(src: int, target: Path, progress: Progress | None = None) -> str:
    """Copy from the open descriptor `src` into `target`, created here (0600, never an existing
    file nor through a link), sparse-aware; returns the sha256 of the bytes written, which are
    the bytes `target` holds."""
    digest = hashlib.sha256()
    total = os.fstat(src).st_size
    done = 0
    dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                  0o600)
    with os.fdopen(dst, "wb") as out:
        while chunk := os.pread(src, CHUNK, done):
            digest.update(chunk)
            if chunk.count(0) == len(chunk):
                out.seek(len(chunk), os.SEEK_CUR)  # keep holes in sparse images
            else:
                out.write(chunk)
            done += len(chunk)
            if progress:
                progress(done, total)
        out.truncate(done)
    return digest.hexdigest()


def copy_with_hash(source: Path, target: Path, progress: Progress | None = None) -> str:
    """Copy the regular file `source` (opened once, not through a link) to a new file `target`
    (0600) and return the sha256 of what was copied."""
    fd = open_regular(source)
    try:
        return _copy_fd_with_hash(fd, target, progress)
    finally:
        os.close(fd)


def hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    fd = open_regular(path)
    with os.fdopen(fd, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _plain_file_name(name: object) -> bool:
    return (isinstance(name, str) and bool(name) and "/" not in name and "\0" not in name
            and name not in (".", ".."))


class ImageStore:
    """The image directory: one JSON record per image, next to its files."""

    def __init__(self, image_dir: Path):
        self.image_dir = image_dir

    def _record_path(self, name: str) -> Path:
        return self.image_dir / f"{check_image_name(name)}.json"

    def ensure_dir(self) -> None:
        """Create the image directory: this process's own (root's), 0711: QEMU (as
        libvirt-qemu) must open the files, nobody needs to list them, and only its owner
        writes there, so the copies an import checks are root's alone until they are renamed
        into place."""
        self.image_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.image_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            owner = os.fstat(fd).st_uid
            if owner != os.geteuid():
                raise ImageError(f"{self.image_dir} belongs to uid {owner}: image_dir must be "
                                 f"uid {os.geteuid()}'s own; chown it (or point image_dir "
                                 "elsewhere) and retry")
            os.fchmod(fd, 0o711)
        finally:
            os.close(fd)

    def check_unchanged(self, image: Image) -> None:
        """Refuse an image whose files were deleted, replaced by anything but a regular file (a
        symbolic link, say) or changed after import (size or mtime): a job must not boot a
        disk nobody verified, nor fail half-way on a missing one."""
        names = {n for n in (image.disk, image.kernel, image.initrd) if n} | set(image.stats)
        for file_name in sorted(names):
            try:
                st = os.lstat(self.image_dir / file_name)
            except FileNotFoundError:
                raise ImageError(f"image {image.name!r}: {self.image_dir / file_name} is missing; "
                                 "restore it or re-import the image") from None
            if not stat.S_ISREG(st.st_mode):
                raise ImageError(f"image {image.name!r}: {self.image_dir / file_name} is not a "
                                 "regular file (a symbolic link?); re-import the image")
            if file_name not in image.stats:
                continue
            size, mtime_ns = image.stats[file_name]
            if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
                raise ImageError(f"image {image.name!r}: {self.image_dir / file_name} changed "
                                 "after import (size or modification time differ); re-import "
                                 "the image ('images remove', then 'images import') or restore "
                                 "the file and check it with 'images verify'")

    def _stats(self, names) -> dict[str, list[int]]:
        return {n: [(st := (self.image_dir / n).stat()).st_size, st.st_mtime_ns] for n in names}

    def get(self, name: str) -> Image:
        path = self._record_path(name)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ImageError(f"image {name!r} not found in {self.image_dir}; import it with "
                             "'vmimagemanager images import NAME FILE'") from None
        image = Image(**data)
        named = [image.disk, image.kernel, image.initrd, *image.sha256, *image.stats,
                 *image.superseded]
        bad = [n for n in named if n is not None and not _plain_file_name(n)]
        if bad or image.format not in ("qcow2", "raw"):
            raise ImageError(f"image {name!r}: its record {path} names "
                             f"{bad[0] if bad else 'format ' + repr(image.format)}, not a file "
                             "of the image directory or a golden format; remove the record "
                             "and re-import the image")
        return image

    def exists(self, name: str) -> bool:
        return self._record_path(name).exists()

    def list(self) -> list[Image]:
        if not self.image_dir.is_dir():
            return []
        return [self.get(p.stem) for p in sorted(self.image_dir.glob("*.json"))]

    def disk_path(self, image: Image) -> Path:
        return self.image_dir / image.disk

    @contextmanager
    def lock(self, wait: bool = True) -> Iterator[bool]:
        """The node's image store lock (imports, removals, syncs): yields False at once if
        another process holds it and `wait` is False."""
        self.ensure_dir()
        with open(self.image_dir / ".lock", "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True

    def import_image(self, name: str, source: Path, *, kernel: Path | None = None,
                     initrd: Path | None = None, cmdline: str | None = None,
                     progress: Progress | None = None, expected: dict[str, str] | None = None,
                     catalog: str = "", update: bool = False) -> Image:
        """Copy an image's files in, hashing them; the record is written last (an image is
        there whole or not at all).

        Copy first, check after: each source is opened once (O_NOFOLLOW, regular files only)
        and copied into a root-only file (0600) in the image directory while it is hashed; the
        disk checks (inspect_disk: qcow2 or raw, no backing file, no external data file, not
        encrypted) then read that copy, the bytes whose sum is recorded, never the source,
        which its owner may change between a check and the copy. A qcow2 is kept as it came,
        not rewritten by `qemu-img convert`: the checks already refuse every header feature
        that makes QEMU open another file or want a key, the recorded sum stays the sum of the
        file the admin or the catalog gave (what `images verify` and `images sync` compare),
        and converting would cost a full read and write of every image while parsing the same
        untrusted metadata, as root, in the same QEMU code.

        For `images sync`: `expected` (role -> sha256, from the catalog) discards a copy whose
        sum differs; with `catalog`, file names carry their content's sum (NAME-<12 hex>.EXT),
        so that `update` writes a changed image beside the files running VMs still use (they
        become `superseded`) and files whose sum did not change are kept, not copied again.
        """
        old = self._import_target(name, update, kernel is None and (initrd is not None
                                                                    or bool(cmdline)))
        self.ensure_dir()
        roles = {"disk": source, "kernel": kernel, "initrd": initrd}
        kept = {role: getattr(old, role) for role in roles
                if old is not None and expected and getattr(old, role)
                and old.sha256.get(getattr(old, role)) == expected.get(role)}
        fmt = old.format if "disk" in kept else ""
        names: dict[str, str] = {}
        sums: dict[str, str] = {}
        written: list[Path] = []
        opened: dict[str, int] = {}
        try:
            # Every source is opened (not through a link, regular files only) before anything
            # is copied, and read once, through its descriptor.
            for role, src in roles.items():
                if src is not None and role not in kept:
                    opened[role] = open_regular(src)
            for role, src in roles.items():
                if src is None:
                    continue
                if role in kept:
                    names[role] = kept[role]
                    sums[kept[role]] = old.sha256[kept[role]]
                    continue
                tmp = self.image_dir / f".{name}.{role}.part"
                tmp.unlink(missing_ok=True)  # left by a crash; only root writes here
                written.append(tmp)
                digest, fmt = self._copy_in(opened[role], tmp, src, role, fmt,
                                            (expected or {}).get(role), progress)
                names[role] = (content_file_name(name, role, digest, fmt) if catalog
                               else f"{name}.{fmt if role == 'disk' else role}")
                sums[names[role]] = digest
                tmp.rename(self.image_dir / names[role])
                written[-1] = self.image_dir / names[role]
            now = time.time()
            superseded = dict(old.superseded) if old else {}
            superseded.update({f: now for f in (old.sha256 if old else {}) if f not in sums})
            image = Image(name=name, disk=names["disk"], format=fmt, sha256=sums,
                          kernel=names.get("kernel"), initrd=names.get("initrd"),
                          cmdline=cmdline, imported_at=now, source=str(source),
                          stats=self._stats(sums), catalog=catalog,
                          superseded={f: t for f, t in superseded.items() if f not in sums})
            self._write_record(image)
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise
        finally:
            for fd in opened.values():
                os.close(fd)
        return image

    def _import_target(self, name: str, update: bool, boot_args_without_kernel: bool
                       ) -> Image | None:
        """The record an import replaces (None: a new image), after the request's checks."""
        check_image_name(name)
        old = self.get(name) if self.exists(name) else None
        if old is not None and not update:
            raise ImageError(f"image {name!r} already exists; remove it first or pick "
                             "another name")
        if boot_args_without_kernel:
            raise ImageError("an initrd or a kernel command line needs --kernel: a disk-boot "
                             "image's own boot loader holds them; leave them out, or give the "
                             "kernel for direct kernel boot")
        return old

    @staticmethod
    def _copy_in(fd: int, tmp: Path, src: Path, role: str, fmt: str, want: str | None,
                 progress: Progress | None) -> tuple[str, str]:
        """Copy one opened source into `tmp` while hashing it; a disk is checked in that copy
        (inspect_disk), never in the source. Returns (sha256, the disk's format or `fmt`)."""
        digest = _copy_fd_with_hash(fd, tmp, progress if role == "disk" else None)
        if want is not None and digest != want:
            raise ImageError(f"{src}: sha256 {digest[:16]}... is not the {want[:16]}... "
                             "the catalog gives; not imported (is the file still being "
                             "written? the next sync tries again)")
        if role == "disk":
            fmt = inspect_disk(tmp, shown=src)  # the copy just hashed, not the source
        os.chmod(tmp, 0o644)
        return digest, fmt

    def purge_superseded(self, in_use: set[str], grace: float) -> list[str]:
        """Delete files of earlier image versions that no overlay uses (`in_use`: file names)
        and that were superseded more than `grace` seconds ago; one line per file deleted."""
        done = []
        for image in self.list():
            gone = {f for f, when in image.superseded.items()
                    if f not in in_use and time.time() - when > grace}
            if not gone:
                continue
            for file_name in sorted(gone):
                (self.image_dir / file_name).unlink(missing_ok=True)
                done.append(f"deleted {file_name}, a file of an earlier version of "
                            f"{image.name} that no VM uses any more")
            self._write_record(replace(image, superseded={
                f: t for f, t in image.superseded.items() if f not in gone}))
        return done

    def _write_record(self, image: Image) -> None:
        path = self._record_path(image.name)
        tmp = path.with_name(f".{path.name}.part")
        tmp.write_text(json.dumps(asdict(image), indent=2, sort_keys=True) + "\n")
        tmp.rename(path)

    def verify(self, name: str) -> list[str]:
        """Re-hash an image's files; returns one line per problem (empty when all match)."""
        image = self.get(name)
        problems = []
        for file_name, expected in sorted(image.sha256.items()):
            path = self.image_dir / file_name
            if not path.exists():
                problems.append(f"{name}: {file_name} is missing")
                continue
            try:
                actual = hash_file(path)
            except ImageError as exc:
                problems.append(f"{name}: {exc}; re-import the image")
                continue
            if actual != expected:
                problems.append(f"{name}: {file_name} sha256 {actual[:16]}... does not match "
                                f"recorded {expected[:16]}...; re-import the image")
        return problems

    def remove(self, name: str, in_use_by: list[str]) -> None:
        image = self.get(name)
        if in_use_by:
            raise ImageError(f"image {name!r} is in use by {', '.join(in_use_by)}; wait for "
                             "those jobs or 'vmimagemanager down' the slots first")
        self._record_path(name).unlink()
        for file_name in [*image.sha256, *image.superseded]:
            (self.image_dir / file_name).unlink(missing_ok=True)

    def store_from_disk(self, name: str, disk: Path, base: Image) -> Image:
        """Flatten a slot's current disk (overlay + its golden image) into a new golden image.

        The overlay is read as qcow2 (never probed); the result, written by qemu-img, passes
        the same checks as an import before it is hashed (once) and renamed into place; the
        boot files are copied from the base image's (not through links) while hashed."""
        check_image_name(name)
        if self.exists(name):
            raise ImageError(f"image {name!r} already exists; choose another name")
        self.ensure_dir()
        target = self.image_dir / f"{name}.qcow2"
        tmp = self.image_dir / f".{name}.qcow2.part"
        tmp.unlink(missing_ok=True)
        copied: list[Path] = [tmp]
        try:
            subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", str(disk),
                            str(tmp)], check=True, capture_output=True, text=True,
                           env=clean_environment())
            os.chmod(tmp, 0o600)
            inspect_disk(tmp, shown=f"the disk of {disk}")
            sums = {target.name: hash_file(tmp)}
            os.chmod(tmp, 0o644)
            tmp.rename(target)
            copied = [target]
            boot: dict[str, str | None] = {"kernel": None, "initrd": None}
            for role in ("kernel", "initrd"):
                source_name = getattr(base, role)
                if source_name:
                    new_name = f"{name}.{role}"
                    part = self.image_dir / f".{new_name}.part"
                    part.unlink(missing_ok=True)
                    copied.append(part)
                    sums[new_name] = copy_with_hash(self.image_dir / source_name, part)
                    os.chmod(part, 0o644)
                    part.rename(self.image_dir / new_name)
                    copied[-1] = self.image_dir / new_name
                    boot[role] = new_name
            image = Image(name=name, disk=target.name, format="qcow2", sha256=sums,
                          kernel=boot["kernel"], initrd=boot["initrd"], cmdline=base.cmdline,
                          imported_at=time.time(), source=f"stored from image {base.name}",
                          stats=self._stats(sums))
            self._write_record(image)
            return image
        except subprocess.CalledProcessError as exc:
            raise ImageError(f"saving the slot disk as {name!r} failed: "
                             f"{exc.stderr.strip()}") from None
        finally:
            if not self.exists(name):
                for path in copied:
                    path.unlink(missing_ok=True)


def overlay_backing(overlay: Path) -> str | None:
    """The backing file an overlay names, read from its qcow2 header (None if it is not a
    readable qcow2 file): which golden files running VMs use, read from the disk itself."""
    try:
        with open(overlay, "rb") as handle:
            header = handle.read(20)
            if len(header) < 20 or header[:4] != b"QFI\xfb":
                return None
            offset, size = struct.unpack(">QI", header[8:20])
            if not offset or not 0 < size <= 4096:
                return None
            handle.seek(offset)
            return handle.read(size).decode(errors="replace")
    except OSError:
        return None


def golden_size(golden: Path, golden_format: str) -> int:
    """The virtual size of a golden image, read by this code from the file itself (opened not
    through a link); ImageError if it is not a plain qcow2 or raw image any more (its header
    names a backing or data file, or it is encrypted): import checks it, this checks again,
    for a few microseconds, before every overlay names it."""
    if golden_format not in ("qcow2", "raw"):
        raise ImageError(f"{golden}: format {golden_format!r} is not a golden image format; "
                         "re-import the image")
    fd = open_regular(golden)
    try:
        if golden_format == "raw":
            return os.fstat(fd).st_size
        size, problem = qcow2_header_problem(fd)
    finally:
        os.close(fd)
    if problem:
        raise ImageError(f"{golden}: {problem}; no VM boots it: remove the image and import "
                         "a self-contained one")
    return size


def prepare_overlay(golden: Path, golden_format: str, overlay: Path,
                    size: int | None = None) -> None:
    """Create a qcow2 overlay backed by the golden image: O(1) in the image's size.

    The backing format is explicit (-F) and the golden's header is checked by golden_size
    first (a snapshot's frozen disk by its own check, which gives `size`); qemu-img does not
    even open the golden (-u, the size given): QEMU reads it only at boot, as the checked
    format."""
    size = golden_size(golden, golden_format) if size is None else size
    overlay.parent.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-F", golden_format,
                        "-b", str(golden), str(overlay), str(size)],
                       check=True, capture_output=True, text=True, env=clean_environment())
    except subprocess.CalledProcessError as exc:
        overlay.unlink(missing_ok=True)
        if "No space left" in exc.stderr:
            raise NoSpace(f"no space left in {overlay.parent} for the job's overlay: free space "
                          "there (overlay_dir)") from None
        raise ImageError(f"creating overlay {overlay} on {golden} failed: "
                         f"{exc.stderr.strip()}") from None
    os.chmod(overlay, 0o600)
