"""Which host directories one job's guest sees, and how (the site's home and work storage).

The configuration names directories (`shared_paths`); a job gets a resolved list. With
`scope: owner` (the default for hypervisor shares) only the job owner's own home directory below
the configured path is exported, so root inside a job's guest (a kernel exploit away from the
job's user) can reach that user's files but no other user's. See docs/shared-storage.md for the
trust boundary of each mode.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass

from .accounts import account
from .config import Config, SharedPath
from .errors import ConfigError, VmimError

NINEP_OPTIONS = "trans=virtio,version=9p2000.L,access=user,msize=262144"


class ShareError(ConfigError):
    """A configured share cannot be given to this job (the owner's home is not where it says)."""


@dataclass(frozen=True)
class GuestShare:
    """One directory a job's guest sees at the same path as the host."""

    path: str  # host path == guest path
    mode: str  # "hypervisor" (libvirt 9p <filesystem>) or "guest" (the image mounts it)
    tag: str  # 9p mount tag (hypervisor mode)
    accessmode: str = "passthrough"
    readonly: bool = False
    scope: str = "tree"  # "owner": the job owner's home (a warm spare binds it late)
    source: str = ""  # host directory exported, if not `path` itself (a warm spare's export)


def share_tag(index: int, path: str) -> str:
    """Mount tag (at most 31 bytes, unique by the entry's index, letters, digits and `_` only:
    it names a file server's socket too): (0, '/home') -> 'v0_home'."""
    return f"v{index}_{re.sub(r'[^A-Za-z0-9_]', '_', path.strip('/'))}"[:31]


def is_under(path: str, roots: Iterable[str]) -> bool:
    """True if `path` is one of `roots` or below one (lexically, after normalisation)."""
    norm = os.path.normpath(path)
    return any(norm == r or norm.startswith(r.rstrip("/") + "/") for r in roots)


def owner_home(owner: str) -> str:
    try:
        return account(owner).home
    except VmimError as exc:
        raise ShareError(str(exc)) from None


def resolve_shares(shared: Iterable[SharedPath], owner: str) -> tuple[GuestShare, ...]:
    """The shares of a job owned by `owner`.

    Owner-scoped shares export the owner's home directory (resolved on the host, symlinks
    followed) and only if it lies inside the configured path; root's admin VMs (`up`) get none.
    """
    result = []
    for index, item in enumerate(shared):
        tag = share_tag(index, item.path)
        if item.scope == "tree":
            result.append(GuestShare(item.path, item.mode, tag, item.accessmode, item.readonly))
            continue
        if owner == "root":
            continue
        home = owner_home(owner)
        real_home, real_root = os.path.realpath(home), os.path.realpath(item.path)
        if real_home == real_root or not is_under(real_home, [real_root]):
            raise ShareError(f"shared_paths[{index}] ({item.path}, scope owner): the home "
                             f"directory of {owner} is {home}, not a directory below "
                             f"{item.path}; fix the account or use 'scope: tree'")
        if item.mode == "hypervisor" and not os.path.isdir(real_home):
            raise ShareError(f"shared_paths[{index}]: the home directory {home} of {owner} does "
                             "not exist on this host; create it (as for a physical worker node)")
        result.append(GuestShare(os.path.normpath(home), item.mode, tag, item.accessmode,
                                 item.readonly, scope="owner"))
    return tuple(result)


def hypervisor_source(share: GuestShare) -> str:
    """The host directory libvirt exports (symlinks resolved, so the export is what was checked)."""
    return os.path.realpath(share.source or share.path)


def served_by_owner(share: GuestShare) -> bool:
    """An owner's home the hypervisor gives the guest: served by a virtiofsd running as the
    owner (homeserver.py), never by QEMU's 9p."""
    return share.mode == "hypervisor" and share.scope == "owner"


def needs_shared_memory(cfg: Config) -> bool:
    """Whether this node's VMs share their RAM with a virtiofsd: any owner home the hypervisor
    serves (a spare too, booted before its owner's home is attached)."""
    return any(item.mode == "hypervisor" and item.scope == "owner" for item in cfg.shared_paths)


def seed_mounts(shares: Iterable[GuestShare]) -> list[list[str]]:
    """cloud-init `mounts` entries that mount the hypervisor shares at their paths: an owner's
    home over virtiofs, a (read-only) tree over 9p."""
    return [[s.tag, s.path, "virtiofs", "ro" if s.readonly else "defaults", "0", "0"]
            if served_by_owner(s) else
            [s.tag, s.path, "9p", NINEP_OPTIONS + (",ro" if s.readonly else ""), "0", "0"]
            for s in shares if s.mode == "hypervisor"]


def unmounted_report(paths: Iterable[str]) -> str:
    """Shell snippet printing 'dir PATH' for each path that is not on a file system of its own.

    `test -d` is not enough: the image's own /home/USER exists too, and a job writing there
    after a failed mount would lose its files with the VM. A share (9p or the site's NFS/Lustre)
    has a different device number than the image's root file system.
    """
    quoted = " ".join(shlex.quote(p) for p in paths)
    return (f'r=$(stat -c %d /); for p in {quoted}; do test -d "$p" && '
            f'[ "$(stat -c %d "$p")" != "$r" ] || echo "dir $p"; done')
