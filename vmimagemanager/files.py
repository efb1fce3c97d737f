"""The two ways vmimagemanager writes files that hold secrets or records."""

from __future__ import annotations

import os
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


def append_line(path: Path, line: str, mode: int = 0o600) -> None:
    """Append one record in a single write (O_APPEND): concurrent hooks never interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, mode)
    try:
        os.write(fd, (line.rstrip("\n") + "\n").encode())
    finally:
        os.close(fd)
