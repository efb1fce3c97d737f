"""Where an image's sshd reads a pool account's authorized keys: asked once, then known.

A spare's bind puts the job's key where the guest's sshd reads it for the job's account, which
only sshd can say (`sshd -T -C user=...`, Match blocks applied). Under TCG that one command costs
the guest 0.12 s of CPU and of the job's start, more than the rest of the bind together. Its
answer depends only on the image's files and the account: every spare of an image boots from
the same files with the same kind of seed, and none has run a job when it is bound. So the bind
asks once per image and account, and the answer is kept here (root's state directory, one small
JSON file). The key is the digest of all the image's files' sha256 sums: a re-imported image is
asked again, and past MAX_IMAGES the image learned longest ago is forgotten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
from pathlib import Path

from .config import Config
from .files import write_private_file

log = logging.getLogger("vmimagemanager.keysfiles")

FILE_NAME = "authorized-keys-files.json"
MAX_IMAGES = 64
MAX_PATH = 4096


def image_key(sha256: dict[str, str]) -> str:
    """One name for an image's exact content (its files' sums, as the catalog records them)."""
    return hashlib.sha256(json.dumps(sha256, sort_keys=True).encode()).hexdigest()[:32]


def _path(cfg: Config) -> Path:
    return cfg.state_dir / FILE_NAME


def _read(cfg: Config) -> dict[str, dict[str, str]]:
    try:
        data = json.loads(_path(cfg).read_text("utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:  # asked again at the next bind, and written anew
        log.warning("%s is unreadable (%s); each image's sshd is asked again", _path(cfg), exc)
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict)}


def usable(path: str) -> bool:
    """An absolute path without control characters: what the bind script may be given."""
    return (path.startswith("/") and len(path) < MAX_PATH
            and not any(ord(c) < 32 or ord(c) == 127 for c in path))


def known(cfg: Config, image: str, user: str) -> str | None:
    """The file image `image`'s sshd reads `user`'s keys from, if a bind learned it."""
    path = _read(cfg).get(image, {}).get(user)
    return path if isinstance(path, str) and usable(path) else None


def remember(cfg: Config, image: str, user: str, path: str) -> None:
    """Keep what the guest's sshd said (written whole, then renamed: a concurrent bind that
    loses its entry asks again next time)."""
    if not usable(path):
        raise ValueError(f"not a usable AuthorizedKeysFile path: {path[:80]!r}")
    data = _read(cfg)
    users = data.pop(image, {})
    users[user] = path
    data[image] = users  # last: the most recently learned image
    for old in list(data)[:-MAX_IMAGES]:
        del data[old]
    target = _path(cfg)
    temporary = target.with_name(f".{FILE_NAME}.{secrets.token_hex(6)}")
    write_private_file(temporary, json.dumps(data, sort_keys=False).encode())
    try:
        os.replace(temporary, target)
    except OSError:
        temporary.unlink(missing_ok=True)
        raise
