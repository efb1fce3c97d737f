"""Golden images and per-lease copy-on-write overlays.

An image is a disk file (qcow2 or raw) plus, for direct kernel boot, a kernel, an initrd and a
command line, all kept in the image directory next to a JSON record holding their sha256 sums.
Jobs never write a golden image: each lease boots from a qcow2 overlay whose backing file is the
golden image, created in milliseconds whatever the image's size and deleted at release.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .config import valid_name
from .domain_xml import BootSpec
from .errors import ImageError, NoSpace

CHUNK = 4 * 1024 * 1024
Progress = Callable[[int, int], None]


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


def disk_format(path: Path) -> str:
    """Ask qemu-img what a disk file is; only qcow2 and raw are accepted as golden images."""
    try:
        out = subprocess.run(["qemu-img", "info", "--output=json", str(path)], check=True,
                             capture_output=True, text=True).stdout
    except subprocess.CalledProcessError as exc:
        raise ImageError(f"{path}: not a disk image qemu-img can read: "
                         f"{exc.stderr.strip().splitlines()[-1:]}") from None
    info = json.loads(out)
    if info.get("backing-filename"):
        raise ImageError(f"{path}: has a backing file; flatten it first "
                         "(qemu-img convert -O qcow2 IN OUT)")
    fmt = info.get("format")
    if fmt not in ("qcow2", "raw"):
        raise ImageError(f"{path}: format {fmt!r} is not supported; convert it to qcow2")
    return fmt


def copy_with_hash(source: Path, target: Path, progress: Progress | None = None) -> str:
    """Copy `source` to `target` (sparse-aware) and return the sha256 of the content."""
    digest = hashlib.sha256()
    total = source.stat().st_size
    done = 0
    with open(source, "rb") as src, open(target, "wb") as dst:
        while chunk := src.read(CHUNK):
            digest.update(chunk)
            if chunk.count(0) == len(chunk):
                dst.seek(len(chunk), os.SEEK_CUR)  # keep holes in sparse images
            else:
                dst.write(chunk)
            done += len(chunk)
            if progress:
                progress(done, total)
        dst.truncate(done)
    return digest.hexdigest()


def hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class ImageStore:
    """The image directory: one JSON record per image, next to its files."""

    def __init__(self, image_dir: Path):
        self.image_dir = image_dir

    def _record_path(self, name: str) -> Path:
        return self.image_dir / f"{check_image_name(name)}.json"

    def ensure_dir(self) -> None:
        # 0711: QEMU (as libvirt-qemu) must open the files, nobody needs to list them.
        self.image_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.image_dir, 0o711)

    def check_unchanged(self, image: Image) -> None:
        """Refuse an image whose files were deleted or changed after import (size or mtime):
        a job must not boot a disk nobody verified, nor fail half-way on a missing one."""
        for file_name, (size, mtime_ns) in sorted(image.stats.items()):
            try:
                st = (self.image_dir / file_name).stat()
            except FileNotFoundError:
                raise ImageError(f"image {image.name!r}: {self.image_dir / file_name} is missing; "
                                 "restore it or re-import the image") from None
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
        return Image(**data)

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

        For `images sync`: `expected` (role -> sha256, from the catalog) discards a copy whose
        sum differs; with `catalog`, file names carry their content's sum (NAME-<12 hex>.EXT),
        so that `update` writes a changed image beside the files running VMs still use (they
        become `superseded`) and files whose sum did not change are kept, not copied again.
        """
        check_image_name(name)
        old = self.get(name) if self.exists(name) else None
        if old is not None and not update:
            raise ImageError(f"image {name!r} already exists; remove it first or pick "
                             "another name")
        if kernel is None and (initrd is not None or cmdline):
            raise ImageError("an initrd or a kernel command line needs --kernel: a disk-boot "
                             "image's own boot loader holds them; leave them out, or give the "
                             "kernel for direct kernel boot")
        for path in (source, kernel, initrd):
            if path is not None and not path.is_file():
                raise ImageError(f"{path}: no such file")
        fmt = disk_format(source)
        self.ensure_dir()
        roles = {"disk": (source, fmt), "kernel": (kernel, "kernel"), "initrd": (initrd, "initrd")}
        kept = {role: getattr(old, role) for role in roles
                if old is not None and expected and getattr(old, role)
                and old.sha256.get(getattr(old, role)) == expected.get(role)}
        names: dict[str, str] = {}
        sums: dict[str, str] = {}
        written: list[Path] = []
        try:
            for role, (src, ext) in roles.items():
                if src is None:
                    continue
                if role in kept:
                    names[role] = kept[role]
                    sums[kept[role]] = old.sha256[kept[role]]
                    continue
                tmp = self.image_dir / f".{name}.{ext}.part"
                written.append(tmp)
                digest = copy_with_hash(src, tmp, progress if role == "disk" else None)
                want = (expected or {}).get(role, digest)
                if digest != want:
                    raise ImageError(f"{src}: sha256 {digest[:16]}... is not the {want[:16]}... "
                                     "the catalog gives; not imported (is the file still being "
                                     "written? the next sync tries again)")
                names[role] = (content_file_name(name, role, digest, fmt) if catalog
                               else f"{name}.{ext}")
                sums[names[role]] = digest
                os.chmod(tmp, 0o644)
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
        return image

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
            actual = hash_file(path)
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
        """Flatten a slot's current disk (overlay + its golden image) into a new golden image."""
        check_image_name(name)
        if self.exists(name):
            raise ImageError(f"image {name!r} already exists; choose another name")
        target = self.image_dir / f"{name}.qcow2"
        tmp = self.image_dir / f".{name}.qcow2.part"
        copied: list[Path] = [tmp]
        try:
            subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(disk), str(tmp)],
                           check=True, capture_output=True, text=True)
            os.chmod(tmp, 0o644)
            tmp.rename(target)
            copied = [target]
            sums = {target.name: hash_file(target)}
            boot: dict[str, str | None] = {"kernel": None, "initrd": None}
            for role in ("kernel", "initrd"):
                source_name = getattr(base, role)
                if source_name:
                    new_name = f"{name}.{role}"
                    shutil.copyfile(self.image_dir / source_name, self.image_dir / new_name)
                    copied.append(self.image_dir / new_name)
                    sums[new_name] = hash_file(self.image_dir / new_name)
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


def prepare_overlay(golden: Path, golden_format: str, overlay: Path) -> None:
    """Create a qcow2 overlay backed by the golden image: O(1) in the image's size."""
    overlay.parent.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", golden_format,
                        "-b", str(golden), str(overlay)],
                       check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as exc:
        overlay.unlink(missing_ok=True)
        if "No space left" in exc.stderr:
            raise NoSpace(f"no space left in {overlay.parent} for the job's overlay: free space "
                          "there (overlay_dir)") from None
        raise ImageError(f"creating overlay {overlay} on {golden} failed: "
                         f"{exc.stderr.strip()}") from None
    os.chmod(overlay, 0o600)
