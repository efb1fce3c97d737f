"""Golden images and per-lease copy-on-write overlays.

An image is a disk file (qcow2 or raw) plus, for direct kernel boot, a kernel, an initrd and a
command line, all kept in the image directory next to a JSON record holding their sha256 sums.
Jobs never write a golden image: each lease boots from a qcow2 overlay whose backing file is the
golden image, created in milliseconds whatever the image's size and deleted at release.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
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

    def boot_spec(self, image_dir: Path) -> BootSpec:
        return BootSpec(
            kernel=image_dir / self.kernel if self.kernel else None,
            initrd=image_dir / self.initrd if self.initrd else None,
            cmdline=self.cmdline,
        )


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

    def import_image(self, name: str, source: Path, *, kernel: Path | None = None,
                     initrd: Path | None = None, cmdline: str | None = None,
                     progress: Progress | None = None) -> Image:
        check_image_name(name)
        if self.exists(name):
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
        files = {"disk": (source, f"{name}.{fmt}"), "kernel": (kernel, f"{name}.kernel"),
                 "initrd": (initrd, f"{name}.initrd")}
        sums: dict[str, str] = {}
        written: list[Path] = []
        try:
            for role, (src, target_name) in files.items():
                if src is None:
                    continue
                target = self.image_dir / target_name
                tmp = target.with_name(f".{target_name}.part")
                written.append(tmp)
                sums[target_name] = copy_with_hash(src, tmp, progress if role == "disk" else None)
                os.chmod(tmp, 0o644)
                tmp.rename(target)
                written[-1] = target
            image = Image(name=name, disk=f"{name}.{fmt}", format=fmt, sha256=sums,
                          kernel=f"{name}.kernel" if kernel else None,
                          initrd=f"{name}.initrd" if initrd else None,
                          cmdline=cmdline, imported_at=time.time(), source=str(source),
                          stats=self._stats(sums))
            self._write_record(image)
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise
        return image

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
        for file_name in image.sha256:
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
