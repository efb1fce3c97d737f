"""How vmimagemanager writes files that hold secrets or records, and reads files others control."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path


def write_private_file(path: Path, data: bytes, uid: int = 0, gid: int = 0,
                       mode: int = 0o600) -> None:
    """Create a file that is private from its first byte (no window with looser permissions,
    never through a symlink, never over an existing file)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)


def replace_private_file(path: Path, data: bytes) -> None:
    """Write root's private file `path` anew: made beside it (write_private_file) and renamed
    over it, so a reader never sees half of it."""
    fresh = path.with_name(f".{path.name}.{os.getpid()}")
    fresh.unlink(missing_ok=True)
    write_private_file(fresh, data)
    os.replace(fresh, path)


def read_private_json(path: Path) -> dict:
    """A JSON object root wrote with replace_private_file; {} if it is absent, unreadable or
    not an object (the next write makes it anew)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def append_line(path: Path, line: str, mode: int = 0o600) -> None:
    """Append one record in a single write (O_APPEND): concurrent hooks never interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, mode)
    try:
        os.write(fd, (line.rstrip("\n") + "\n").encode())
    finally:
        os.close(fd)


class UntrustedFileError(OSError):
    """A file another account controls is not what root may read (link, FIFO, device, wrong
    owner, too big)."""


def read_untrusted(path: str, owner_uid: int | None, max_bytes: int) -> bytes:
    """Read a file that another account controls, as root, without being led anywhere else.

    No symbolic link is followed at any level (each directory is opened with O_NOFOLLOW from
    the one before), the file is opened O_NONBLOCK (a FIFO cannot block the hook) and only
    after lstat said it is a regular file (no device is ever opened: a device node cannot be
    hard-linked by its non-owner, fs.protected_hardlinks), then fstat must agree: the same
    regular file, of `owner_uid` when given, at most `max_bytes` long.
    """
    if not path.startswith("/"):
        raise UntrustedFileError(f"{path!r}: not an absolute path")
    *parents, name = [part for part in path.split("/") if part not in ("", ".")]
    if not name or ".." in parents or name == "..":
        raise UntrustedFileError(f"{path!r}: not a plain path")
    # O_PATH: a directory the reader may only search (0711) is walked too
    dir_fd = os.open("/", os.O_PATH | os.O_DIRECTORY)
    try:
        for part in parents:
            next_fd = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
            os.close(dir_fd)
            dir_fd = next_fd
        before = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        _check_untrusted(path, before, owner_uid, max_bytes)
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY,
                     dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    try:
        st = os.fstat(fd)
        _check_untrusted(path, st, owner_uid, max_bytes)
        if (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino):
            raise UntrustedFileError(f"{path}: replaced while it was opened")
        chunks, left = [], max_bytes + 1
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 16))):
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > max_bytes:
        raise UntrustedFileError(f"{path}: larger than {max_bytes} bytes")
    return data


def _check_untrusted(path: str, st: os.stat_result, owner_uid: int | None,
                     max_bytes: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise UntrustedFileError(f"{path}: not a regular file")
    if owner_uid is not None and st.st_uid != owner_uid:
        raise UntrustedFileError(f"{path}: owned by uid {st.st_uid}, not {owner_uid}")
    if st.st_size > max_bytes:
        raise UntrustedFileError(f"{path}: larger than {max_bytes} bytes")
