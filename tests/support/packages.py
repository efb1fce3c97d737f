"""The tree as packages are built from it, and the SGE hooks a package installs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.support import REPO
from vmimagemanager.batch.sge_queue import hook_script
from vmimagemanager.config import DEFAULT_CONFIG_PATH

HOOKS = ("prolog", "starter", "epilog")


def source_tree(dest: Path) -> Path:
    """The tree as a clean checkout would have it (tracked and new files, nothing ignored)."""
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard",
                            "-z"], capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, files):
        source = REPO / name.decode()
        if source.is_file():
            (dest / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name.decode())
    return dest


def packaged_hooks(bindir: str = "/usr/bin", python: str = "/usr/bin/python3",
                   busybox: str = "/bin/busybox") -> dict:
    """The SGE wrappers a package ships; the RPM's BusyBox is EPEL's /usr/sbin/busybox."""
    return {h: hook_script(h, f"{bindir}/vmim-sge-{h}", DEFAULT_CONFIG_PATH, python,
                           shell=busybox)
            for h in HOOKS}
