"""How root reads files others control (files.read_untrusted) and where root's temporary files go
(rootenv.use_private_tmp). Real files, no daemons."""

from __future__ import annotations

import os
import tempfile
import time

import pytest

from vmimagemanager.errors import VmimError
from vmimagemanager.files import UntrustedFileError, read_untrusted
from vmimagemanager.rootenv import use_private_tmp


def test_a_regular_file_of_the_owner_is_read_whole_within_the_bound(tmp_path):
    path = tmp_path / "proxy"
    path.write_bytes(b"x" * 100)
    assert read_untrusted(str(path), os.getuid(), 100) == b"x" * 100
    with pytest.raises(UntrustedFileError, match="larger than 99 bytes"):
        read_untrusted(str(path), os.getuid(), 99)
    with pytest.raises(UntrustedFileError, match="owned by uid"):
        read_untrusted(str(path), os.getuid() + 1, 100)


def test_no_link_is_followed_at_any_level_and_a_fifo_or_device_is_never_read(tmp_path):
    target = tmp_path / "real"
    target.mkdir()
    (target / "f").write_text("secret")
    (tmp_path / "dirlink").symlink_to(target)
    (tmp_path / "filelink").symlink_to(target / "f")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "devlink").symlink_to("/dev")
    started = time.monotonic()
    for path in (tmp_path / "dirlink" / "f", tmp_path / "filelink", tmp_path / "fifo",
                 tmp_path / "devlink" / "zero", "/dev/zero", "relative/f",
                 f"{tmp_path}/real/../real/f"):
        with pytest.raises(OSError):
            read_untrusted(str(path), None, 1 << 20)
    assert time.monotonic() - started < 5  # the FIFO did not block
    assert read_untrusted(str(target / "f"), None, 100) == b"secret"


def test_root_temporary_files_go_to_a_private_directory_under_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    before = tempfile.tempdir
    try:
        path = use_private_tmp(run_dir)
        assert path == run_dir / "tmp" and tempfile.gettempdir() == str(path)
        assert oct(path.stat().st_mode & 0o777) == oct(0o700)
        with tempfile.TemporaryDirectory() as made:
            assert made.startswith(f"{path}/")
    finally:
        tempfile.tempdir = before


@pytest.mark.parametrize("spoil", ["group-writable run_dir", "link", "loose mode"])
def test_a_private_tmp_others_could_touch_is_refused(tmp_path, spoil):
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o711)
    if spoil == "group-writable run_dir":
        os.chmod(run_dir, 0o775)
    elif spoil == "link":
        (run_dir / "tmp").symlink_to(tmp_path)
    else:
        (run_dir / "tmp").mkdir(mode=0o755)
        os.chmod(run_dir / "tmp", 0o755)
    before = tempfile.tempdir
    try:
        with pytest.raises(VmimError, match="that no one else can write"):
            use_private_tmp(run_dir)
    finally:
        tempfile.tempdir = before


def test_the_agent_runs_with_the_allow_list_whatever_shell_started_it(tmp_path, monkeypatch):
    """A long-lived root process: the children it starts (ssh, qemu-img, ssh-keygen) must not
    get an admin's or a job's OPENSSL_CONF, TMPDIR or LD_* from the shell that started it."""
    from tests.support.testdriver import write_node_config
    from vmimagemanager.cli import main
    from vmimagemanager.rootenv import BASE_ENVIRONMENT

    config = write_node_config(tmp_path / "c.yaml")
    before = dict(os.environ)
    for key in ("OPENSSL_CONF", "TMPDIR", "LD_LIBRARY_PATH", "GCONV_PATH"):
        monkeypatch.setenv(key, str(tmp_path / "x"))
    try:
        assert main(["--config", str(config), "agent", "--once"]) == 0
        assert dict(os.environ) == dict(BASE_ENVIRONMENT)
        assert (tmp_path / "state" / "keys" / "admin_ed25519").exists()  # made by the agent
    finally:
        os.environ.clear()
        os.environ.update(before)
