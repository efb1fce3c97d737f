"""Which VO a job belongs to, and so which image it boots.

A job is matched by its owner's unix groups (pool accounts atlas001.. in group atlas, sgm/prd
accounts in their own groups), by user-name patterns, or by the queue it came through; the first
VO rule that matches wins, in the order of the configuration file.
"""

from __future__ import annotations

import contextlib
import fnmatch
import grp
import os
import pwd

from .config import Config, VoRule
from .errors import VmimError


def user_groups(owner: str) -> set[str]:
    """Names of the owner's primary and supplementary groups on this host."""
    try:
        entry = pwd.getpwnam(owner)
    except KeyError:
        raise VmimError(f"job owner {owner!r} is not a user on this host") from None
    names = set()
    for gid in os.getgrouplist(owner, entry.pw_gid):  # NSS does the work (LDAP sites too)
        with contextlib.suppress(KeyError):  # a gid without a group entry
            names.add(grp.getgrgid(gid).gr_name)
    return names


def match_vo(cfg: Config, owner: str, queue: str = "") -> VoRule | None:
    groups = user_groups(owner)
    for rule in cfg.vos:
        if groups.intersection(rule.groups):
            return rule
        if any(fnmatch.fnmatchcase(owner, pattern) for pattern in rule.users):
            return rule
        if queue and queue in rule.queues:
            return rule
    return None


def unmatched_message(cfg: Config, owner: str, queue: str) -> str:
    known = ", ".join(rule.name for rule in cfg.vos) or "none"
    return (f"vmimagemanager: job owner {owner!r} (queue {queue or '-'}) belongs to no VO "
            f"configured on this node (VOs: {known}); the site does not run such jobs here. "
            "Contact the site if you think this is wrong.")
