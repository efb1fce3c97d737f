"""The owner's home server (homeserver.py), run for real: QEMU's virtiofsd as the owner, in a
user namespace that maps the owner alone, its socket QEMU's user's; stopped without leftovers.
What a guest's root can do through it is tried in tests/vm/test_guest_containment.py."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from vmimagemanager.accounts import account
from vmimagemanager.homeserver import (
    HomeServerError,
    private_tools,
    servers_of,
    start,
    stop,
    stop_servers_of,
)

OWNER, QEMU_STAND_IN = "atlas001", "cms001"  # harness/pool-accounts.sh makes both


@pytest.fixture
def home():
    """A home of the owner's where the owner can reach it (pytest's tmp_path is root's 0700)."""
    for name in (OWNER, QEMU_STAND_IN):
        try:
            pwd.getpwnam(name)
        except KeyError:
            pytest.fail(f"no account {name} (harness/pool-accounts.sh makes it)")
    base = Path(tempfile.mkdtemp(prefix="vmim-home-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    path = base / OWNER
    path.mkdir(mode=0o755)
    owner = account(OWNER)
    os.chown(path, owner.uid, owner.gid)
    yield base, path
    shutil.rmtree(base)


def owner_reads_memory_of(pid: int) -> str:
    """What the owner gets opening /proc/PID/mem (ptrace access): 'read' or 'denied'."""
    code = (f"try:\n    open('/proc/{pid}/mem', 'rb').close()\n    print('read')\n"
            "except PermissionError:\n    print('denied')")
    return subprocess.run(["runuser", "-u", OWNER, "--", sys.executable, "-I", "-c", code],
                          capture_output=True, text=True, check=True).stdout.strip()


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        return dict(line.rstrip("\n").split(":\t", 1) for line in fh if ":\t" in line)


def test_the_server_runs_as_the_owner_alone_and_stops_without_leftovers(home):
    base, path = home
    owner, qemu = account(OWNER), account(QEMU_STAND_IN)
    run_dir = base / "run"
    tools = private_tools(base / "images")
    server = start(run_dir, "7.0", "v0_home", owner, str(path), (qemu.uid, qemu.gid), tools)
    try:
        status = _status(server.pid)
        assert status["Uid"].split() == [str(owner.uid)] * 4
        assert status["Gid"].split() == [str(owner.gid)] * 4
        assert status["Groups"].strip() == ""  # none of root's groups came along
        assert os.readlink(f"/proc/{server.pid}/ns/user") != os.readlink("/proc/self/ns/user")
        # the namespace maps the owner's uid and gid and nothing else: root is not in it
        for kind, want in (("uid_map", owner.uid), ("gid_map", owner.gid)):
            with open(f"/proc/{server.pid}/{kind}", encoding="ascii") as fh:
                assert fh.read().split() == [str(want), str(want), "1"]
        st = os.lstat(server.socket)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert (st.st_uid, st.st_gid) == (qemu.uid, qemu.gid)
        assert servers_of(run_dir) == {"7.0": [server.socket]}
        # the owner cannot ptrace it (it runs root's execute-only copy): no memory, no fds;
        # the owner's own sleep, for contrast, can be read
        sleeper = subprocess.Popen(["runuser", "-u", OWNER, "--", "sleep", "30"])
        try:
            time.sleep(0.2)
            sleep_pid = int(subprocess.run(["pgrep", "-P", str(sleeper.pid)], text=True,
                                           capture_output=True).stdout.split()[0])
            assert owner_reads_memory_of(sleep_pid) == "read"
            assert owner_reads_memory_of(server.pid) == "denied"
        finally:
            sleeper.kill()
            sleeper.wait()
    finally:
        stop_servers_of(run_dir, "7.0")
    assert not os.path.exists(f"/proc/{server.pid}") or _status(server.pid)["State"][0] == "Z"
    assert servers_of(run_dir) == {}
    stop(server.socket)  # again: nothing to do, no error


def test_a_home_the_server_cannot_serve_is_one_line_and_leaves_nothing(home):
    base, path = home
    owner, qemu = account(OWNER), account(QEMU_STAND_IN)
    run_dir = base / "run"
    with pytest.raises(HomeServerError) as err:
        start(run_dir, "8.0", "v0_home", owner, str(path / "missing"), (qemu.uid, qemu.gid),
              private_tools(base / "images"))
    assert "\n" not in str(err.value) and "8.0" in str(err.value)
    assert servers_of(run_dir) == {}
