"""Which directories a job's guest is given: owner scope, tree scope, read-only mounts."""

from __future__ import annotations

import os
import pwd
import re

import pytest

from vmimagemanager.config import SharedPath, parse_config
from vmimagemanager.shares import ShareError, resolve_shares, seed_mounts, served_by_owner


def _a_user_with_a_home() -> pwd.struct_passwd:
    """A real account on this host whose home directory exists and is not '/'."""
    for entry in pwd.getpwall():
        home = os.path.realpath(entry.pw_dir)
        if entry.pw_uid != 0 and home != "/" and os.path.isdir(home):
            return entry
    pytest.fail("no account with an existing home directory on this host "
                "(harness/pool-accounts.sh creates some)")


def test_hypervisor_shares_default_to_the_owner_scope_guest_mounts_to_the_tree():
    data = {"slots": [{"name": "s1", "network": {"type": "user", "ssh_port": 2201}}],
            "vos": {"atlas": {"image": "atlas", "groups": ["atlas"]}},
            "shared_paths": [{"path": "/tmp", "mode": "hypervisor"},
                             {"path": "/work", "mode": "guest"}]}
    cfg = parse_config(data, "test.yaml")
    assert [(s.scope, s.accessmode, s.readonly) for s in cfg.shared_paths] == [
        ("owner", "passthrough", False), ("tree", "passthrough", False)]


def test_owner_scope_exports_only_the_owners_home():
    user = _a_user_with_a_home()
    parent = os.path.dirname(os.path.normpath(user.pw_dir))
    shares = resolve_shares([SharedPath(parent, "hypervisor", scope="owner")], user.pw_name)
    assert [s.path for s in shares] == [os.path.normpath(user.pw_dir)]
    assert shares[0].tag == "v0_" + parent.strip("/").replace("/", "_")


def test_owner_scope_refuses_a_home_outside_the_configured_path(tmp_path):
    user = _a_user_with_a_home()
    with pytest.raises(ShareError) as info:
        resolve_shares([SharedPath(str(tmp_path), "hypervisor", scope="owner")], user.pw_name)
    message = str(info.value)
    assert f"home directory of {user.pw_name} is {user.pw_dir}" in message
    assert "\n" not in message and "scope: tree" in message


def test_root_admin_vms_get_tree_shares_but_no_users_home(tmp_path):
    shares = resolve_shares([SharedPath("/home", "hypervisor", scope="owner"),
                             SharedPath(str(tmp_path), "hypervisor", scope="tree",
                                        readonly=True)], "root")
    assert [s.path for s in shares] == [str(tmp_path)]


def test_unknown_owner_is_a_clear_error():
    with pytest.raises(ShareError, match="'no-such-user-xyz' is not a user on this host"):
        resolve_shares([SharedPath("/home", "hypervisor", scope="owner")], "no-such-user-xyz")


def test_seed_mounts_only_for_hypervisor_shares_and_read_only_ones_say_ro(tmp_path):
    shares = resolve_shares([SharedPath(str(tmp_path), "hypervisor", scope="tree",
                                        readonly=True),
                             SharedPath("/work", "guest", scope="tree")], "root")
    mounts = seed_mounts(shares)
    assert len(mounts) == 1
    tag, where, fstype, options, *_ = mounts[0]
    assert (where, fstype) == (str(tmp_path), "9p")
    assert tag == ("v0_" + re.sub(r"[^A-Za-z0-9_]", "_", str(tmp_path).strip("/")))[:31]
    assert options.split(",")[-1] == "ro" and "trans=virtio" in options


def test_an_owners_home_is_mounted_over_virtiofs_a_tree_over_9p(tmp_path):
    user = _a_user_with_a_home()
    parent = os.path.dirname(os.path.realpath(user.pw_dir))
    shares = resolve_shares([SharedPath(parent, "hypervisor", scope="owner"),
                             SharedPath(str(tmp_path), "hypervisor", scope="tree",
                                        readonly=True)], user.pw_name)
    home, tree = seed_mounts(shares)
    assert home[1:4] == [os.path.normpath(user.pw_dir), "virtiofs", "defaults"]
    assert tree[1:3] == [str(tmp_path), "9p"] and tree[3].endswith(",ro")
    assert served_by_owner(shares[0]) and not served_by_owner(shares[1])
