"""Which VO a job belongs to, and so which image it boots.

A job is matched by its owner's unix groups (pool accounts atlas001.. in group atlas, sgm/prd
accounts in their own groups), by user-name patterns, or by the queue it came through; the first
VO rule that matches wins, in the order of the configuration file.
"""

from __future__ import annotations

import fnmatch

from .accounts import account
from .config import Config, VoRule


def user_groups(owner: str) -> frozenset[str]:
    """Names of the owner's primary and supplementary groups on this host."""
    return account(owner).group_names


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
