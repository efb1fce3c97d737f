"""Where an image's sshd reads a pool account's keys: asked at the first bind, then known.

The bind script itself runs here in the node's real /bin/sh (the guest's side is exercised by
tests/cell/test_spares.py, whose first bind asks the real guest's sshd and whose later binds use the
kept answer)."""

from __future__ import annotations

import json
import logging
import stat
import subprocess

import pytest

from vmimagemanager import keysfiles
from vmimagemanager.config import parse_config
from vmimagemanager.node.spares import KEYS_FILE_LINE, bind_script


def _cfg(tmp_path):
    return parse_config({"state_dir": str(tmp_path), "slots": [
        {"name": "k1", "network": {"type": "user", "ssh_port": 30611}}]}, "c.yaml")


def test_an_answer_is_kept_root_only_per_image_content_and_account(tmp_path):
    cfg = _cfg(tmp_path)
    image = keysfiles.image_key({"wn.qcow2": "ab" * 32})
    assert keysfiles.known(cfg, image, "atlas001") is None
    keysfiles.remember(cfg, image, "atlas001", "/etc/ssh/authorized_keys/atlas001")
    keysfiles.remember(cfg, image, "cms001", "/etc/ssh/keys-cms/cms001")
    assert keysfiles.known(cfg, image, "atlas001") == "/etc/ssh/authorized_keys/atlas001"
    assert keysfiles.known(cfg, image, "cms001") == "/etc/ssh/keys-cms/cms001"
    assert keysfiles.known(cfg, image, "atlas002") is None
    st = (tmp_path / keysfiles.FILE_NAME).stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)
    assert [p.name for p in tmp_path.iterdir()] == [keysfiles.FILE_NAME]  # no temporary left
    # any file of the image changed (a re-import): another image, asked again
    changed = keysfiles.image_key({"wn.qcow2": "ab" * 32, "vmlinuz": "cd" * 32})
    assert changed != image and keysfiles.known(cfg, changed, "atlas001") is None
    assert keysfiles.image_key({"wn.qcow2": "ab" * 32}) == image


@pytest.mark.parametrize("path", ["relative/keys", "/etc/ssh/a\nb", "/etc/\x1bx", "/" + "a" * 5000,
                                  ""])
def test_only_an_absolute_plain_path_is_kept_or_given_out(tmp_path, path):
    cfg = _cfg(tmp_path)
    with pytest.raises(ValueError, match="not a usable AuthorizedKeysFile"):
        keysfiles.remember(cfg, "img", "atlas001", path)
    (tmp_path / keysfiles.FILE_NAME).write_text(json.dumps({"img": {"atlas001": path}}))
    assert keysfiles.known(cfg, "img", "atlas001") is None


def test_an_unreadable_file_means_asking_again_and_is_written_anew(tmp_path, caplog):
    cfg = _cfg(tmp_path)
    (tmp_path / keysfiles.FILE_NAME).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="vmimagemanager.keysfiles"):
        assert keysfiles.known(cfg, "img", "atlas001") is None
    assert "is unreadable" in caplog.text and "asked again" in caplog.text
    keysfiles.remember(cfg, "img", "atlas001", "/etc/ssh/authorized_keys/atlas001")
    assert keysfiles.known(cfg, "img", "atlas001") == "/etc/ssh/authorized_keys/atlas001"


def test_past_max_images_the_image_learned_longest_ago_is_forgotten(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    monkeypatch.setattr(keysfiles, "MAX_IMAGES", 2)
    for image in ("a", "b", "c"):
        keysfiles.remember(cfg, image, "u1", f"/keys/{image}")
    keysfiles.remember(cfg, "b", "u2", "/keys/b2")  # learned again: the newest now
    keysfiles.remember(cfg, "d", "u1", "/keys/d")
    assert [keysfiles.known(cfg, i, "u1") for i in "abcd"] == [None, "/keys/b", None, "/keys/d"]
    assert keysfiles.known(cfg, "b", "u2") == "/keys/b2"


def _run(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-s"], input=script, capture_output=True, text=True)


def test_the_bind_script_writes_the_key_where_it_is_told_without_asking_sshd(tmp_path):
    target = tmp_path / "authorized_keys" / "root"
    script = bind_script("root", "/nonexistent-home", "ssh-ed25519 AAAAC3Nza job", [],
                         keys_file=str(target))
    # the 0.12 s command under TCG is not run, nor any other command: builtins only
    assert "sshd" not in script and "/etc/passwd" not in script and "stat" not in script
    for _round in range(2):  # the second time over a file the image had: its mode is not kept
        r = _run(script)
        assert r.returncode == 0, r.stderr
        assert target.read_text() == "ssh-ed25519 AAAAC3Nza job\n"
        assert stat.S_IMODE(target.stat().st_mode) == 0o644  # sshd reads it as the user
        assert r.stdout.splitlines() == [f"{KEYS_FILE_LINE} {target}"]
        target.write_text("an image's own key\n")
        target.chmod(0o600)


def test_the_bind_script_refuses_a_keys_file_in_the_home_and_asks_sshd_otherwise(tmp_path):
    home = tmp_path / "home"
    r = _run(bind_script("root", str(home), "ssh-ed25519 AAAA job", [],
                         keys_file=f"{home}/.ssh/authorized_keys"))
    assert r.returncode == 3 and "is in the home directory" in r.stderr
    assert not home.exists()
    # not known: sshd is asked (this node has no sshd: the script says so and stops)
    script = bind_script("root", str(home), "ssh-ed25519 AAAA job", [])
    assert "-T -C" in script
    r = _run(script)
    assert r.returncode == 3 and "names no AuthorizedKeysFile" in r.stderr
