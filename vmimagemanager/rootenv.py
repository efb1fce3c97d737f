"""The environment root code runs with: an allow-list, never the job's.

Batch systems start the root hooks with the job's environment (SGE passes `qsub -v` variables,
TMP of the job's own directory, HOME of the owner). Any of it may be chosen by the job's owner:
OPENSSL_CONF loads a provider module into `openssl`, GCONV_PATH into glibc's iconv, TMP moves
Python's temporary files into a directory the owner controls. So a root hook reads what it needs
into Python first (`take`), then replaces its whole environment with `clean_environment()`, and
every child it starts inherits only that. docs/security.md lists each variable a hook keeps.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from .errors import VmimError

SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# What every root process gets, whoever started it; nothing the job chose.
BASE_ENVIRONMENT: Mapping[str, str] = {"PATH": SAFE_PATH, "LANG": "C.UTF-8"}
# The root-only directory under run_dir (0700) for root's temporary files: never /tmp, TMP or
# TMPDIR, which the job's owner may control.
ROOT_TMP = "tmp"


def clean_environment(keep: Mapping[str, str] | None = None) -> dict[str, str]:
    """The allow-list environment, plus `keep` (values a caller validated itself)."""
    return {**BASE_ENVIRONMENT, **(keep or {})}


def take(names: Iterable[str]) -> dict[str, str]:
    """Read `names` from this process's environment (absent ones left out), before it is
    replaced: the values are the caller's to validate."""
    return {name: os.environ[name] for name in names if name in os.environ}


def become_clean(keep: Mapping[str, str] | None = None) -> None:
    """Replace this process's environment with the allow-list (children inherit it)."""
    os.environ.clear()
    os.environ.update(clean_environment(keep))


def use_private_tmp(run_dir: Path) -> Path:
    """Make `run_dir/tmp` (root's, 0700, not a link) Python's temporary directory; returns it.
    A run_dir that is not root's own refuses, so root never writes where others can rename."""
    run_dir.mkdir(mode=0o711, parents=True, exist_ok=True)
    path = run_dir / ROOT_TMP
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    for where, mode in ((run_dir, 0o022), (path, 0o077)):
        st = os.lstat(where)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & mode:
            raise VmimError(f"{where} must be a directory of uid {os.getuid()} that no one "
                            "else can write (not a link); fix it or remove it and retry")
    tempfile.tempdir = str(path)
    return path


def _interrupted(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def interrupt_on_sigterm() -> None:
    """SIGTERM (the batch system ending a hook, systemd stopping the agent) raises
    KeyboardInterrupt, so the code under way cleans up on its way out (a lease, a half-booted
    VM) instead of dying where it stands."""
    signal.signal(signal.SIGTERM, _interrupted)
