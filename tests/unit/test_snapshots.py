"""Snapshot starts without a VM: the save file's head, the restored domain's XML, the renew
script, the snapshot store's checks. On real VMs and the real cell: tests/cell/test_snapshots.py.
"""

from __future__ import annotations

import os
import shlex
import struct
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
from lxml import etree

from tests.support import testdriver
from vmimagemanager.config import Slot, UserNetwork
from vmimagemanager.domain_meta import QEMU_NS, SSH_PORT_KEY, lease_metadata
from vmimagemanager.domain_xml import DomainSpec, build_domain_xml, restored_domain_xml
from vmimagemanager.errors import ConfigError, ImageError, VmimError
from vmimagemanager.images import BootSpec
from vmimagemanager.keysfiles import image_key
from vmimagemanager.node.restore import new_identity, renew_script, sshd_facts
from vmimagemanager.node.snapshots import (
    Snapshot,
    frozen_disk_size,
    kind_name,
    new_directory,
    publish,
    read,
    unfinished,
    unwant,
    want,
    wanted,
    why_unusable,
)
from vmimagemanager.savefile import HEADER, MAGIC, SaveFileError, stream_offset, write_head
from vmimagemanager.shape import Shape

STREAM = b"QEVM\0\0\0\3" + bytes(range(256)) * 64


def save_file(path: Path, xml: bytes = b"<domain><name>old</name></domain>",
              cookie: bytes = b"<cookie><cpu/></cookie>", *, fmt: int = 0,
              stream: bytes = STREAM, magic: bytes = MAGIC) -> Path:
    """A file laid out as libvirt 9.0 writes one: header, XML, cookie, 64 KiB of zeros."""
    data = xml + b"\0" + cookie + b"\0" + b"\0" * 65536
    header = HEADER.pack(magic, 2, len(data), 1, fmt, len(xml) + 1, *([0] * 14))
    path.write_bytes(header + data + stream)
    return path


def test_write_head_gives_our_xml_and_leaves_the_stream_alone(tmp_path):
    path = save_file(tmp_path / "state")
    fd = os.open(path, os.O_RDWR)
    try:
        offset = stream_offset(fd)
        write_head(fd, "<domain><name>vmim-s2</name></domain>")
    finally:
        os.close(fd)
    data = path.read_bytes()
    magic, version, data_len, running, fmt, cookie, *_ = HEADER.unpack(data[:HEADER.size])
    assert (magic, version, running, fmt, cookie) == (MAGIC, 2, 1, 0, 0)
    assert HEADER.size + data_len == offset  # the stream did not move
    assert data[offset:] == STREAM
    area = data[HEADER.size:offset]
    assert area.split(b"\0", 1)[0] == b"<domain><name>vmim-s2</name></domain>"
    assert b"old" not in area and b"cookie" not in area  # nothing of the file's own head


@pytest.mark.parametrize("kwargs, why", [
    ({"magic": b"LibvirtQemudPart"}, "not a libvirt QEMU save file"),
    ({"fmt": 1}, "compressed"),
    ({"stream": b"XXXX" + STREAM[4:]}, "no QEMU stream"),
])
def test_a_save_file_that_is_not_as_expected_is_refused(tmp_path, kwargs, why):
    path = save_file(tmp_path / "state", **kwargs)
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(SaveFileError, match=why):
            write_head(fd, "<domain/>")
    finally:
        os.close(fd)


def test_an_xml_larger_than_the_data_area_is_refused_and_nothing_is_written(tmp_path):
    path = save_file(tmp_path / "state")
    before = path.read_bytes()
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(SaveFileError, match="does not fit"):
            write_head(fd, "<domain>" + "x" * 70000 + "</domain>")
    finally:
        os.close(fd)
    assert path.read_bytes() == before


def test_a_header_naming_a_huge_data_area_is_refused(tmp_path):
    path = save_file(tmp_path / "state")
    data = bytearray(path.read_bytes())
    struct.pack_into("=I", data, 20, 1 << 30)
    path.write_bytes(bytes(data))
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(SaveFileError, match="data length"):
            stream_offset(fd)
    finally:
        os.close(fd)


# -- the restored domain --------------------------------------------------------------------------
def saved_xml() -> str:
    """What libvirt gives of a running spare (secure, migratable): our XML plus its values."""
    spec = DomainSpec(slot=Slot("s1", 1, 256, UserNetwork(2201)), shape=Shape(1, 256),
                      domain_type="qemu", overlay=Path("/o/s1.vmim-spare.ab.qcow2"),
                      seed=Path("/o/s1.vmim-spare.ab.seed.iso"),
                      console_log=Path("/s/console/s1.log"),
                      boot=BootSpec(Path("/img/a.kernel"), Path("/img/a.initrd"), "console=ttyS0"),
                      job_label="vmim-spare.ab", image="atlas", owner="", ssh_port=2201)
    root = etree.fromstring(build_domain_xml(spec).encode())
    etree.SubElement(root, "uuid").text = "11111111-2222-3333-4444-555555555555"
    root.find("genid").text = "66666666-7777-8888-9999-000000000000"
    etree.SubElement(etree.SubElement(root, "cputune"), "shares").text = "64"
    chain = etree.SubElement(root.find("devices/disk"), "backingStore", type="file")
    etree.SubElement(chain, "source", file="/img/atlas.qcow2")
    return etree.tostring(root, encoding="unicode")


def test_the_restored_domain_is_another_machine_in_its_own_slot():
    slot = Slot("s2", 1, 256, UserNetwork(2202))
    chain = ((Path("/o/s2.7.0.qcow2"), "qcow2", True), (Path("/snap/disk.qcow2"), "qcow2", False),
             (Path("/img/atlas.qcow2"), "raw", False))
    xml = restored_domain_xml(saved_xml(), slot, {"job": "7.0", "image": "atlas"},
                              {"vda": chain, "vdb": ((Path("/snap/seed.iso"), "raw", False),)},
                              Path("/s/console/s2.log"), 31234)
    root = etree.fromstring(xml.encode())
    assert root.findtext("name") == "vmim-s2"
    assert root.findtext("uuid") != "11111111-2222-3333-4444-555555555555"
    assert root.findtext("genid") not in ("", "66666666-7777-8888-9999-000000000000")
    assert lease_metadata(xml) == {"job": "7.0", "image": "atlas", SSH_PORT_KEY: "31234"}
    sources = [d.find("source").get("file") for d in root.findall("devices/disk")]
    assert sources == ["/o/s2.7.0.qcow2", "/snap/seed.iso"]
    # the whole chain is given (libvirt reads no backing file name from a file), and only the
    # job's own overlay is relabelled for QEMU
    vda = root.find("devices/disk")
    layers, store = [], vda
    while (store := store.find("backingStore")) is not None and store.find("source") is not None:
        layers.append((store.find("source").get("file"), store.find("format").get("type"),
                       store.find("source/seclabel").get("relabel")))
    assert layers == [("/snap/disk.qcow2", "qcow2", "no"), ("/img/atlas.qcow2", "raw", "no")]
    assert store is not None and len(store) == 0  # an empty <backingStore/> ends it
    assert vda.find("source/seclabel") is None
    assert root.find("devices/disk[2]/source/seclabel").get("relabel") == "no"
    assert root.find("cputune/shares") is None  # a job's weight, not the idle spare's
    assert root.find("devices/serial/source").get("path") == "/s/console/s2.log"
    args = [a.get("value") for a in root.iter(f"{{{QEMU_NS}}}arg")]
    assert any("hostfwd=tcp:127.0.0.1:31234-:22" in a for a in args)
    assert not any("2201" in a for a in args)
    again = restored_domain_xml(saved_xml(), slot, {}, {}, Path("/c"), 31235)
    assert etree.fromstring(again.encode()).findtext("genid") != root.findtext("genid")


def test_libvirts_test_driver_takes_the_restored_xml(tmp_path):
    hv = testdriver.hypervisor()
    slot = Slot("s3", 1, 256, UserNetwork(2203))
    xml = restored_domain_xml(saved_xml(), slot, {"job": "8.0"},
                              {"vda": ((tmp_path / "o.qcow2", "qcow2", True),
                                       (tmp_path / "f.qcow2", "qcow2", False))},
                              tmp_path / "c.log", 31236)
    hv.start(xml)
    try:
        assert lease_metadata(hv.domain_xml("vmim-s3"))["job"] == "8.0"
    finally:
        hv.destroy("vmim-s3")


# -- the renew script -----------------------------------------------------------------------------
def snapshot(tmp_path: Path, **kw) -> Snapshot:
    data = dict(image="atlas", cores=1, memory_mib=256, image_key="k", recipe="r",
                host_key="ssh-ed25519 AAAAold", host_key_files=("/etc/ssh/ssh_host_ed25519_key",),
                sshd_pidfile="/run/sshd.pid", domain_xml="<domain/>", golden="/img/a.qcow2",
                golden_format="qcow2", created=time.time(), directory=str(tmp_path))
    data.update(kw)
    return Snapshot(**data)


def test_sshd_facts_need_an_ed25519_host_key():
    out = "hostkey /etc/ssh/ssh_host_rsa_key\nhostkey /etc/ssh/ssh_host_ed25519_key\n" \
          "pidfile /run/sshd.pid\n"
    assert sshd_facts(out) == (("/etc/ssh/ssh_host_rsa_key", "/etc/ssh/ssh_host_ed25519_key"),
                               "/run/sshd.pid")
    with pytest.raises(VmimError, match="no ed25519 HostKey"):
        sshd_facts("hostkey /etc/ssh/ssh_host_rsa_key\n")


def test_the_renew_script_quotes_what_the_guest_said(tmp_path):
    """The host key files and pid file come from the snapshot's guest (an image's config):
    each reaches the script as one quoted word, never as shell code."""
    hostile = "/etc/ssh/k'$(touch /tmp/vmim-pwned)'ed25519 key"
    snap = snapshot(tmp_path, host_key_files=(hostile, "/etc/ssh/ssh_host_rsa_key"),
                    sshd_pidfile="/run/x;reboot")
    cfg = testdriver.node_config(tmp_path)
    body, wait, line = new_identity(cfg, snap, Slot("s1", 1, 256, UserNetwork(2201)))
    assert line.startswith("ssh-ed25519 ") and len(line.split()) == 2
    assert subprocess.run(["sh", "-n"], input=(body + wait).encode()).returncode == 0
    removals = [shlex.split(s) for s in body.splitlines()
                if s.startswith("rm -f ") and "/etc/ssh" in s]
    assert removals == [["rm", "-f", hostile, hostile + ".pub"],
                        ["rm", "-f", "/etc/ssh/ssh_host_rsa_key",
                         "/etc/ssh/ssh_host_rsa_key.pub"]]
    assert f"cat > {shlex.quote(hostile)} <<'VMIM_HOST_KEY'" in body
    assert "cat '/run/x;reboot'" in body
    # the node-made private key is in the script, its public half is what gets pinned
    assert "BEGIN OPENSSH PRIVATE KEY" in body and line in body


def test_two_renew_scripts_never_share_a_secret(tmp_path):
    snap, slot = snapshot(tmp_path), Slot("s1", 1, 256, UserNetwork(2201))
    cfg = testdriver.node_config(tmp_path)
    (one, _, key1), (two, _, key2) = new_identity(cfg, snap, slot), new_identity(cfg, snap, slot)
    assert key1 != key2
    # the bytes mixed into the guest's RNG and its machine-id are new each time
    secrets_of = [[line for line in script.splitlines()
                   if "/dev/urandom" in line or "> /etc/machine-id" in line]
                  for script in (one, two)]
    assert len(secrets_of[0]) == 2 and not set(secrets_of[0]) & set(secrets_of[1])


def test_the_renew_script_sets_the_clock_and_mounts_the_trees_again(tmp_path):
    body, _wait = renew_script(snapshot(tmp_path), "s1", b"KEY", "ssh-ed25519 AAAA",
                               [("v1_opt_sw", "/opt/sw", "trans=virtio,ro")])
    assert "mkdir -p /opt/sw; mount -t 9p -o trans=virtio,ro v1_opt_sw /opt/sw" in body
    (clock,) = [line for line in body.splitlines() if line.startswith("date ")]
    assert abs(int(clock.split("@")[1].split()[0]) - time.time()) < 5


# -- the store ------------------------------------------------------------------------------------
@pytest.fixture
def node(tmp_path):
    from vmimagemanager.node.state import ensure_admin_key

    cfg = testdriver.node_config(tmp_path, snapshot_starts=True)
    ensure_admin_key(cfg)
    return cfg


class FakeImage:
    def __init__(self, name: str, sha: dict, imported_at: float):
        self.name, self.sha256, self.imported_at = name, sha, imported_at


def made(cfg, tmp_path, **kw) -> Snapshot:
    from vmimagemanager.node.snapshots import recipe

    directory = new_directory(cfg, "atlas", Shape(1, 256))
    for name in ("private/state", "disk.qcow2", "seed.iso"):
        (directory / name).write_bytes(b"x")
    snap = snapshot(directory, image_key=image_key({"atlas.qcow2": "aa"}), recipe=recipe(cfg),
                    created=time.time(), **kw)
    return publish(cfg, directory, snap)


def test_a_published_snapshot_reads_back_and_its_checks_hold(node, tmp_path):
    cfg = node
    snap = made(cfg, tmp_path)
    assert snap.path.name == kind_name("atlas", Shape(1, 256)) == "atlas.1c256m"
    assert read(cfg, "atlas", Shape(1, 256)) == replace(snap, host_key_files=tuple(
        snap.host_key_files))
    assert oct((snap.path / "private" / "record.json").stat().st_mode & 0o777) == "0o600"
    assert oct((snap.path / "private").stat().st_mode & 0o777) == "0o700"
    assert oct(snap.path.stat().st_mode & 0o777) == "0o711"
    image = FakeImage("atlas", {"atlas.qcow2": "aa"}, snap.created - 10)
    assert why_unusable(cfg, snap, image) == ""
    assert "changed" in why_unusable(cfg, snap, FakeImage("atlas", {"atlas.qcow2": "bb"}, 0))
    assert "changed" in why_unusable(cfg, snap, FakeImage("atlas", {"atlas.qcow2": "aa"},
                                                           snap.created + 1))
    snap.state.unlink()
    assert "state is missing" in why_unusable(cfg, snap, image)


def test_a_recipe_change_makes_a_snapshot_unusable(node, tmp_path):
    snap = made(node, tmp_path)
    other = testdriver.node_config(tmp_path, snapshot_starts=True, domain_type="kvm")
    image = FakeImage("atlas", {"atlas.qcow2": "aa"}, 0)
    assert "settings" in why_unusable(other, snap, image)


def test_an_unfinished_snapshot_directory_of_a_dead_process_is_found(node, tmp_path):
    mine = new_directory(node, "atlas", Shape(1, 256))
    dead = mine.with_name(".cms.1c256m.new-999999-1")
    dead.mkdir()
    assert unfinished(node) == [dead]  # the live process's own is not


def test_wanted_kinds_are_noted_once(node):
    assert want(node, "atlas", Shape(2, 1024)) and not want(node, "atlas", Shape(2, 1024))
    assert wanted(node) == [("atlas", Shape(2, 1024))]
    unwant(node, "atlas", Shape(2, 1024))
    assert wanted(node) == []


def test_the_frozen_disk_must_name_exactly_the_images_disk(tmp_path):
    golden = tmp_path / "golden.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(golden), "64M"], check=True)
    other = tmp_path / "other.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(other), "64M"], check=True)
    for backing, fmt in ((golden, "qcow2"), (other, "qcow2"), (golden, "raw")):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-F", fmt, "-b",
                        str(backing), str(tmp_path / f"{backing.stem}-{fmt}.qcow2"), "64M"],
                       check=True)
    def snap(name: str) -> Snapshot:
        return snapshot(tmp_path / name, golden=str(golden))

    for name in ("ok", "bad1", "bad2"):
        (tmp_path / name).mkdir()
    os.link(tmp_path / "golden-qcow2.qcow2", tmp_path / "ok" / "disk.qcow2")
    os.link(tmp_path / "other-qcow2.qcow2", tmp_path / "bad1" / "disk.qcow2")
    os.link(tmp_path / "golden-raw.qcow2", tmp_path / "bad2" / "disk.qcow2")
    assert frozen_disk_size(snap("ok")) == 64 << 20
    with pytest.raises(ImageError, match="names backing file"):
        frozen_disk_size(snap("bad1"))
    with pytest.raises(ImageError, match="format"):
        frozen_disk_size(snap("bad2"))
    (tmp_path / "link").mkdir()
    (tmp_path / "link" / "disk.qcow2").symlink_to(tmp_path / "ok" / "disk.qcow2")
    with pytest.raises(ImageError):
        frozen_disk_size(snap("link"))


def test_snapshot_starts_is_a_boolean(tmp_path):
    with pytest.raises(ConfigError, match="snapshot_starts"):
        testdriver.node_config(tmp_path, snapshot_starts="yes")
    assert not testdriver.node_config(tmp_path).snapshot_starts


def test_a_state_file_not_as_root_made_it_is_refused_and_a_replaced_snapshot_is_left(node,
                                                                                      tmp_path):
    from vmimagemanager.node.snapshots import SnapshotUnusable, locked, remove

    snap = made(node, tmp_path)
    os.link(snap.state, tmp_path / "second-name")  # a descriptor or name someone else kept
    with pytest.raises(SnapshotUnusable, match="root-owned"), locked(snap):
        pass
    (tmp_path / "second-name").unlink()
    os.chown(snap.state, 65534, 65534)
    with pytest.raises(SnapshotUnusable, match="root-owned"), locked(snap):
        pass
    newer = made(node, tmp_path)  # published over it meanwhile
    with pytest.raises(VmimError, match="replaced"), locked(snap):
        pass
    remove(snap)  # the old one's removal leaves the newer one
    assert read(node, "atlas", Shape(1, 256)) is not None
    remove(newer)
    remove(newer)  # gone already: nothing to do
    assert read(node, "atlas", Shape(1, 256)) is None


def test_a_failed_start_from_a_snapshot_gives_the_lease_up_and_says_why(tmp_path):
    """The batch system's contract: whatever fails, the caller boots the job's VM (here the
    frozen disk is not a qcow2 file: the snapshot is removed too)."""
    from vmimagemanager.node.model import JobRequest
    from vmimagemanager.node.restore import start_from_snapshot
    from vmimagemanager.node.state import ensure_admin_key

    life, cfg = testdriver.node_life(tmp_path, snapshot_starts=True)
    ensure_admin_key(cfg)
    made(cfg, tmp_path)
    shape = Shape(1, 256)
    request = JobRequest("42", "0", "atlas001", "atlas", "atlas", shape)
    lease, _ = life.leases.allocate([s.name for s in cfg.slots], "42", "0", "atlas001",
                                    "atlas", "atlas", shape=shape)
    image = FakeImage("atlas", {"atlas.qcow2": "aa"}, 0)
    context, why = start_from_snapshot(life, cfg.slot(lease.slot), request, image, 5001, 5000,
                                       ())
    assert context is None and "unusable and was removed" in why and "qcow2" in why, why
    assert life.leases.all() == [] and read(cfg, "atlas", shape) is None
    assert not list(cfg.overlay_dir.glob("*.qcow2"))
    # no snapshot at all: nothing tried, the lease is the job's still, the agent is asked
    lease, _ = life.leases.allocate([s.name for s in cfg.slots], "43", "0", "atlas001",
                                    "atlas", "atlas", shape=shape)
    assert start_from_snapshot(life, cfg.slot(lease.slot), replace(request, job_id="43"),
                               image, 5001, 5000, ()) == (None, "")
    assert [lease.job_label for lease in life.leases.all()] == ["43.0"]
    assert wanted(cfg) == [("atlas", shape)]


def test_the_wait_for_sshd_needs_every_socket_new_and_keeps_its_count(tmp_path):
    """sshd binds IPv4 and IPv6 one after the other after its restart: one new socket is not
    yet sshd back (a job's login came in between, in a stress run). The functions run in
    busybox sh on files laid out as /proc/net/tcp{,6}."""
    body, wait = renew_script(snapshot(tmp_path), "s1", b"KEY", "ssh-ed25519 AAAA")
    functions = "\n".join(line for line in body.splitlines()
                          if line.startswith(("listening()", "renewed()")))
    tcp, tcp6 = tmp_path / "tcp", tmp_path / "tcp6"
    functions = functions.replace("/proc/net/tcp /proc/net/tcp6", f"{tcp} {tcp6}")
    head = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  " \
           "timeout inode\n"

    def sockets(v4: str, v6: str) -> str:
        def line(inode: str, address: str) -> str:
            return (f"   0: {address}:0016 00000000:0000 0A 00000000:00000000 00:00000000 "
                    f"00000000     0        0 {inode} 1 0000000000000000 100 0 0 10 0\n")
        return (f"cat > {tcp} <<'E'\n{head}{line(v4, '00000000') if v4 else ''}E\n"
                f"cat > {tcp6} <<'E'\n{head}{line(v6, '0' * 32) if v6 else ''}E\n")

    script = "\n".join([
        functions, sockets("111", "222"), "listening; before=$l; nb=$n; i=7",
        sockets("", "333"), "renewed && echo early || echo waits; echo i=$i",
        sockets("444", "222"), "renewed && echo early || echo waits",
        sockets("444", "333"), "renewed && echo back || echo waits",
    ])
    out = subprocess.run(["busybox", "sh", "-c", script], capture_output=True, text=True)
    assert out.stdout.split() == ["waits", "i=7", "waits", "back"], (out.stdout, out.stderr)


def test_only_a_vm_behind_one_user_network_forward_is_restored():
    from vmimagemanager.config import BridgeNetwork

    bridged = Slot("s4", 1, 256, BridgeNetwork("br0", "52:54:00:aa:bb:cc", "wn-vm4"))
    with pytest.raises(ValueError, match="user-network"):
        restored_domain_xml(saved_xml(), bridged, {}, {}, Path("/c"), 31237)
    root = etree.fromstring(saved_xml().encode())
    for commandline in root.findall(f"{{{QEMU_NS}}}commandline"):
        root.remove(commandline)
    with pytest.raises(ValueError, match="0 ssh forwards"):
        restored_domain_xml(etree.tostring(root, encoding="unicode"),
                            Slot("s5", 1, 256, UserNetwork(2205)), {}, {}, Path("/c"), 31238)


def test_a_snapshot_that_keeps_failing_is_removed_and_a_success_clears_the_count(node,
                                                                                  tmp_path):
    from vmimagemanager.node.restore import count_failure
    from vmimagemanager.node.snapshots import note_success

    snap = made(node, tmp_path)
    image = FakeImage("atlas", {"atlas.qcow2": "aa"}, 0)
    count_failure(snap, image, VmimError("renew failed"))
    note_success(snap)
    for _ in range(2):
        assert "removed" not in count_failure(snap, image, VmimError("renew failed"))
    assert read(node, "atlas", Shape(1, 256)) is not None
    why = count_failure(snap, image, VmimError("renew failed"))
    assert "failed 3 starts in a row and was removed" in why, why
    assert read(node, "atlas", Shape(1, 256)) is None
