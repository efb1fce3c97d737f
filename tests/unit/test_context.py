"""The job context root hands to the starter: the job's owner can read its copy, never replace or
redirect what root reads (root reads its own copy). Real files, real accounts (setuid in a
child), no daemons."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import time

import pytest

from tests.support import make_base_dir
from vmimagemanager.context import (
    JobContext,
    context_dir,
    key_path,
    list_contexts,
    read_context,
    read_root_context,
    remove_context,
    root_context_path,
    write_context,
)
from vmimagemanager.errors import VmimError

OWNER = "atlas001"
LABEL = "4711.0"


@pytest.fixture
def run_dir():
    base = make_base_dir("vmim-ctx-")
    yield base / "run"
    shutil.rmtree(base)


def as_owner(action) -> int:
    """Run `action()` as the job's owner in a child; its exit status (0: it returned)."""
    entry = pwd.getpwnam(OWNER)
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
            action()
            os._exit(0)
        except OSError:
            os._exit(13)
        except BaseException:
            os._exit(1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def write(run_dir, **fields) -> None:
    entry = pwd.getpwnam(OWNER)
    write_context(run_dir, JobContext(mode="vm", label=LABEL, host="127.0.0.1", port=2222,
                                      user=OWNER, host_key="ssh-ed25519 AAAAroot", **fields),
                  b"PRIVATE", entry.pw_uid, entry.pw_gid)


def test_the_owner_reads_its_copy_and_can_replace_nothing(run_dir):
    write(run_dir)
    entry = pwd.getpwnam(OWNER)
    directory = context_dir(run_dir, LABEL)
    st = directory.lstat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o711)
    for path in (directory / "context.json", key_path(run_dir, LABEL)):
        st = path.lstat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (entry.pw_uid, 0o400)
    mine = root_context_path(run_dir, LABEL).lstat()
    assert (mine.st_uid, stat.S_IMODE(mine.st_mode)) == (0, 0o600)
    assert stat.S_IMODE(mine.st_mode) == 0o600
    assert stat.S_IMODE(root_context_path(run_dir, LABEL).parent.lstat().st_mode) == 0o700

    assert as_owner(lambda: read_context(run_dir, LABEL)) == 0
    assert as_owner(lambda: key_path(run_dir, LABEL).read_bytes()) == 0
    # what the old layout (the owner's own 0500 directory) allowed: each is refused now
    assert as_owner(lambda: os.rename(directory / "context.json", directory / "x")) == 13
    assert as_owner(lambda: os.symlink("/etc/shadow", directory / "y")) == 13
    assert as_owner(lambda: os.chmod(directory, 0o700)) == 13
    assert as_owner(lambda: os.rename(directory, directory.with_name("z"))) == 13
    assert as_owner(lambda: root_context_path(run_dir, LABEL).read_bytes()) == 13


def test_root_reads_its_own_copy_whatever_the_owner_writes_in_its_own(run_dir):
    write(run_dir)
    path = context_dir(run_dir, LABEL) / "context.json"

    def rewrite() -> None:
        os.chmod(path, 0o600)
        path.write_text(json.dumps({"mode": "native", "label": LABEL, "host_key": "evil"}))

    assert as_owner(rewrite) == 0  # its own file: it may, and only its own starter reads it
    assert read_context(run_dir, LABEL).host_key == "evil"
    root = read_root_context(run_dir, LABEL)
    assert (root.mode, root.host_key) == ("vm", "ssh-ed25519 AAAAroot")


def test_a_fifo_or_a_link_where_a_context_should_be_neither_hangs_nor_redirects(run_dir):
    """Root's readers (reconcile, exec, power-off) get an error at once."""
    write(run_dir)
    mine = root_context_path(run_dir, LABEL)
    mine.unlink()
    os.mkfifo(mine, 0o600)
    started = time.monotonic()
    with pytest.raises(VmimError, match="not a regular file"):
        read_root_context(run_dir, LABEL)
    mine.unlink()
    mine.symlink_to(context_dir(run_dir, LABEL) / "context.json")
    with pytest.raises(VmimError, match="cannot read the VM context"):
        read_root_context(run_dir, LABEL)
    assert time.monotonic() - started < 5
    assert remove_context(run_dir, LABEL)
    assert not os.path.lexists(mine) and not context_dir(run_dir, LABEL).exists()


def test_a_context_directory_of_the_old_layout_is_removed_without_following_its_links(run_dir):
    """An upgrade finds contexts written when the directory was the owner's: what the owner
    put inside (a link to a root file) is removed, its target is not."""
    write(run_dir)
    directory = context_dir(run_dir, LABEL)
    entry = pwd.getpwnam(OWNER)
    os.chown(directory, entry.pw_uid, entry.pw_gid)
    os.chmod(directory, 0o700)
    victim = run_dir.parent / "victim"
    victim.write_text("keep")
    assert as_owner(lambda: os.symlink(victim, directory / "link")) == 0
    assert remove_context(run_dir, LABEL)
    assert victim.read_text() == "keep" and not directory.exists()


def test_both_copies_are_listed_and_removed_together(run_dir):
    write(run_dir)
    assert list_contexts(run_dir) == [LABEL]
    shutil.rmtree(context_dir(run_dir, LABEL))  # one copy left: still listed, for reconcile
    assert list_contexts(run_dir) == [LABEL]
    assert remove_context(run_dir, LABEL)
    assert list_contexts(run_dir) == [] and not remove_context(run_dir, LABEL)
