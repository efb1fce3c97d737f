"""Logging to stderr and syslog, the same way for the CLI and the batch hooks."""

from __future__ import annotations

import logging
import logging.handlers
import os


def setup_logging(program: str, verbose: bool = False, stderr_level: int | None = None) -> None:
    """stderr gets warnings (or everything with verbose); syslog gets info and above.

    syslog is where an admin follows one job's VM across prolog, starter and epilog: each line
    names the job and the slot.
    """
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    err = logging.StreamHandler()
    err.setLevel(logging.DEBUG if verbose else (stderr_level or logging.WARNING))
    err.setFormatter(logging.Formatter(f"{program}: %(message)s"))
    root.addHandler(err)
    if os.path.exists("/dev/log"):
        try:
            sys_handler = logging.handlers.SysLogHandler(address="/dev/log")
        except OSError:
            return
        sys_handler.setLevel(logging.INFO)
        sys_handler.setFormatter(logging.Formatter(f"{program}[{os.getpid()}]: %(message)s"))
        root.addHandler(sys_handler)
