"""Local accounts: the one place vmimagemanager asks NSS (pwd, grp) about a user.

A prolog asks about its job's owner several times (its uid for the context, its groups for the
VO, its home for the shares, its primary group for accounting): `account` answers from one
look-up per process. An unknown owner is one clear error, the same everywhere.
"""

from __future__ import annotations

import contextlib
import functools
import grp
import os
import pwd
from dataclasses import dataclass

from .errors import VmimError


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    home: str

    @functools.cached_property
    def group_names(self) -> frozenset[str]:
        """Names of the primary and supplementary groups (NSS does the work: LDAP sites too);
        a gid without a group entry is left out."""
        names = set()
        for gid in os.getgrouplist(self.name, self.gid):
            with contextlib.suppress(KeyError):
                names.add(grp.getgrgid(gid).gr_name)
        return frozenset(names)

    @property
    def primary_group(self) -> str:
        try:
            return grp.getgrgid(self.gid).gr_name
        except KeyError:
            return str(self.gid)


@functools.lru_cache(maxsize=64)
def account(name: str) -> Account:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise VmimError(f"job owner {name!r} is not a user on this host") from None
    return Account(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)


def current_account_name() -> str:
    """The account this process runs as (a starter: the job's owner)."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        raise VmimError(f"uid {os.getuid()} has no account on this host") from None


def group_members(group: str) -> list[str]:
    """Accounts whose primary group is `group`, sorted; [] for an unknown group."""
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        return []
    return sorted(p.pw_name for p in pwd.getpwall() if p.pw_gid == gid)
