"""Wake the node's agent when it has work: a spare was taken, or a slot became free.

Without it the agent sees either only at its next round (`spares.interval`, 5 s by default), and
under a burst of jobs every replacement spare would start that much later. The agent listens on
a FIFO in the root-only state directory; a hook writes one byte to it, never blocking: with no
agent running nobody reads it and nothing happens (the agent's next start catches up anyway).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import stat
from pathlib import Path

from .config import Config

log = logging.getLogger("vmimagemanager.agent")


def wake_path(cfg: Config) -> Path:
    return cfg.state_dir / "agent.wake"


def poke(cfg: Config) -> None:
    """Start the agent's next round now. Never blocks, never fails the caller: a poke nobody
    hears (no agent, or one already poked) changes nothing."""
    try:
        fd = os.open(wake_path(cfg), os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENXIO):  # no agent made it, or none reads it
            log.warning("cannot wake the agent through %s (%s); it starts its next round on "
                        "its own", wake_path(cfg), exc.strerror)
        return
    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            os.write(fd, b".")
    except BlockingIOError:
        pass  # the FIFO is full of pokes the agent has not read yet: it is awake already
    finally:
        os.close(fd)


def listen(cfg: Config) -> int:
    """The agent's end: the FIFO (made if missing), open for reading and writing so that it never
    reads end-of-file when a hook closes its end."""
    path = wake_path(cfg)
    try:
        os.mkfifo(path, 0o600)
    except FileExistsError:
        if not stat.S_ISFIFO(os.lstat(path).st_mode):
            path.unlink()
            os.mkfifo(path, 0o600)
    return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_NOFOLLOW)


def wait(fd: int, seconds: float) -> bool:
    """Sleep up to `seconds` or until poked; True if poked (the pokes are read away)."""
    ready, _, _ = select.select([fd], [], [], seconds)
    if not ready:
        return False
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass  # read empty
    return True
