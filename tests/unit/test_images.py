"""Image store: import with sha256, verify, remove, name validation, overlays."""

from __future__ import annotations

import json
import os
import subprocess
import threading

import pytest

from vmimagemanager.errors import ImageError
from vmimagemanager.images import ImageStore, prepare_overlay

SECRET = b"host secret: root's eyes only\n"


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    return path


def test_import_list_verify_remove(tmp_path, disk):
    store = ImageStore(tmp_path / "images")
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"kernel")
    image = store.import_image("sl5-atlas", disk, kernel=kernel, cmdline="console=ttyS0")
    assert image.format == "qcow2"
    assert set(image.sha256) == {"sl5-atlas.qcow2", "sl5-atlas.kernel"}
    assert [i.name for i in store.list()] == ["sl5-atlas"]
    assert store.verify("sl5-atlas") == []
    (tmp_path / "images" / "sl5-atlas.kernel").write_bytes(b"tampered")
    problems = store.verify("sl5-atlas")
    assert len(problems) == 1 and "sl5-atlas.kernel sha256" in problems[0]
    with pytest.raises(ImageError, match="in use by job 3.0"):
        store.remove("sl5-atlas", ["job 3.0 (slot s1)"])
    store.remove("sl5-atlas", [])
    assert store.list() == []
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == []


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ".hidden", "", "x" * 80, "a b",
                                  "x\ny"])
def test_bad_image_names_are_refused(tmp_path, disk, name):
    store = ImageStore(tmp_path / "images")
    with pytest.raises(ImageError, match="invalid image name"):
        store.import_image(name, disk)
    assert not (tmp_path / "evil.qcow2").exists()


def test_import_refuses_non_images_and_duplicates(tmp_path, disk):
    store = ImageStore(tmp_path / "images")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ImageError):
        store.import_image("x", tmp_path / "missing.qcow2")
    store.import_image("x", disk)
    with pytest.raises(ImageError, match="already exists"):
        store.import_image("x", disk)


def test_overlay_is_backed_by_golden_and_private(tmp_path, disk):
    overlay = tmp_path / "ov" / "s1.1.0.qcow2"
    prepare_overlay(disk, "qcow2", overlay)
    info = subprocess.run(["qemu-img", "info", "--output=json", str(overlay)], check=True,
                          capture_output=True, text=True).stdout
    assert str(disk) in info
    assert overlay.stat().st_mode & 0o077 == 0
    assert overlay.stat().st_size < 1024 * 1024


def test_boot_loader_settings_without_a_kernel_are_refused(tmp_path, disk):
    store = ImageStore(tmp_path / "images")
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"initrd")
    for kwargs in ({"initrd": initrd}, {"cmdline": "console=ttyS0"}):
        with pytest.raises(ImageError, match="needs --kernel"):
            store.import_image("sl6-disk", disk, **kwargs)
    assert not store.exists("sl6-disk")
    image = store.import_image("sl6-disk", disk)  # a disk that boots by itself
    assert (image.kernel, image.initrd, image.cmdline) == (None, None, None)
    assert image.boot_spec(store.image_dir).kernel is None


# -- what an image (its maker is an attacker) must not get root to do --------------------------
def qemu_img(*args) -> None:
    for _ in range(10):  # LUKS's key-derivation benchmark fails now and then on a busy machine
        result = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True)
        if "Unable to get accurate CPU usage" not in result.stderr:
            break
    assert result.returncode == 0, result.stderr


def nothing_imported(store: ImageStore) -> None:
    assert store.list() == []
    assert sorted(os.listdir(store.image_dir)) == []  # no copy, no .part, no record


@pytest.fixture
def host_secret(tmp_path):
    """A host file an image's maker wants a guest to read."""
    path = tmp_path / "host-secret"
    path.write_bytes(SECRET.ljust(1 << 20, b"\0"))
    return path


@pytest.mark.parametrize("data_file_raw", ["on", "off"])
def test_an_image_naming_a_host_data_file_is_refused_and_nothing_is_left(tmp_path, host_secret,
                                                                         data_file_raw):
    evil = tmp_path / "evil.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o",
             f"data_file={host_secret},data_file_raw={data_file_raw}", evil, "1M")
    host_secret.write_bytes(SECRET.ljust(1 << 20, b"\0"))  # create truncated it
    if data_file_raw == "on":  # what a guest booted from it would read: the host's file
        qemu_img("convert", "-f", "qcow2", "-O", "raw", evil, tmp_path / "seen.raw")
        assert (tmp_path / "seen.raw").read_bytes().startswith(SECRET)
    store = ImageStore(tmp_path / "images")
    with pytest.raises(ImageError, match="names an external data file.*not imported"):
        store.import_image("evil", evil)
    nothing_imported(store)
    assert host_secret.read_bytes().startswith(SECRET)


def test_an_image_with_a_backing_file_is_refused(tmp_path, host_secret):
    evil = tmp_path / "evil.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", host_secret, evil)
    store = ImageStore(tmp_path / "images")
    with pytest.raises(ImageError, match="names a backing file.*not imported"):
        store.import_image("evil", evil)
    nothing_imported(store)


SECRET_OBJECT = "secret,id=s0,data=letmein"


@pytest.mark.parametrize("fmt, create, message", [
    ("qcow2+luks", ["-f", "qcow2", "--object", SECRET_OBJECT, "-o",
                    "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10"],
     "is encrypted"),
    ("luks", ["-f", "luks", "--object", SECRET_OBJECT, "-o", "key-secret=s0,iter-time=10"],
     "is a luks"),
    ("vmdk", ["-f", "vmdk"], "is a vmdk image"),
    ("vmdk-flat", ["-f", "vmdk", "-o", "subformat=monolithicFlat"], "is a vmdk"),
    ("vdi", ["-f", "vdi"], "is a vdi image"),
    ("vhdx", ["-f", "vhdx"], "is a vhdx image"),
    ("vpc", ["-f", "vpc"], "is a vpc"),
    ("qed", ["-f", "qed"], "is a qed image"),
    ("qcow", ["-f", "qcow"], "is a qcow \\(version 1\\)"),
])
def test_encrypted_images_and_other_formats_are_refused(tmp_path, fmt, create, message):
    source = tmp_path / f"disk.{fmt}"
    qemu_img("create", "-q", *create, source, "1M")
    store = ImageStore(tmp_path / "images")
    with pytest.raises(ImageError, match=f"{message}.*not imported"):
        store.import_image("foreign", source)
    nothing_imported(store)


def test_a_vmdk_naming_a_fifo_is_refused_without_anything_opening_it(tmp_path):
    """A VMDK descriptor names extent files: qemu-img run on it as root opens them (a FIFO
    blocks it for ever). The format is known from the copy's first bytes; qemu-img never runs."""
    fifo = tmp_path / "extent"
    os.mkfifo(fifo)
    descriptor = tmp_path / "disk.vmdk"
    descriptor.write_text(f'# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n'
                          f'createType="monolithicFlat"\nRW 2048 FLAT "{fifo}" 0\n')
    store = ImageStore(tmp_path / "images")
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            store.import_image("vmdk", descriptor)
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(10)
    if worker.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # let the reader go
        worker.join(30)
        pytest.fail("the import opened the FIFO the image names (it blocked)")
    assert len(outcome) == 1 and isinstance(outcome[0], ImageError), outcome
    assert "is a vmdk (descriptor) image" in str(outcome[0])
    nothing_imported(store)


def test_links_and_fifos_are_refused_as_disk_kernel_or_initrd(tmp_path, disk, host_secret):
    store = ImageStore(tmp_path / "images")
    link = tmp_path / "link.qcow2"
    link.symlink_to(disk)
    with pytest.raises(ImageError, match="is a symbolic link: give the file itself"):
        store.import_image("x", link)
    kernel = tmp_path / "vmlinuz"
    kernel.symlink_to(host_secret)
    with pytest.raises(ImageError, match="is a symbolic link"):
        store.import_image("x", disk, kernel=kernel)
    fifo = tmp_path / "initrd.img"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="is not a regular file"):
        store.import_image("x", disk, kernel=disk, initrd=fifo)
    nothing_imported(store)


def test_a_file_swapped_for_a_link_during_the_import_does_not_get_in(tmp_path, disk,
                                                                      host_secret):
    """Every file is opened once, before anything is copied, and read through that descriptor:
    whatever the source's owner does to its name meanwhile, what is checked and recorded is
    what was opened."""
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"the kernel the admin meant")

    def swap(done: int, total: int) -> None:  # while the disk is copied
        if not kernel.is_symlink():
            kernel.unlink()
            kernel.symlink_to(host_secret)

    store = ImageStore(tmp_path / "images")
    image = store.import_image("x", disk, kernel=kernel, progress=swap)
    assert kernel.is_symlink()
    assert (store.image_dir / image.kernel).read_bytes() == b"the kernel the admin meant"
    assert store.verify("x") == []


def test_a_raw_image_imports_as_raw_and_one_with_a_foreign_header_does_not(tmp_path):
    raw = tmp_path / "disk.img"
    raw.write_bytes(b"\xeb\x63\x90" + bytes(1 << 20))
    store = ImageStore(tmp_path / "images")
    assert store.import_image("plain", raw).format == "raw"
    fake = tmp_path / "fake.img"
    fake.write_bytes(b"KDMV" + bytes(1 << 20))  # QEMU would take it for a VMDK
    with pytest.raises(ImageError, match="is a vmdk image"):
        store.import_image("fake", fake)


def test_no_overlay_is_made_on_a_golden_that_names_a_data_file(tmp_path, host_secret):
    golden = tmp_path / "golden.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o",
             f"data_file={host_secret},data_file_raw=on", golden, "1M")
    overlay = tmp_path / "ov" / "s1.1.0.qcow2"
    with pytest.raises(ImageError, match="names an external data file .* no VM boots it"):
        prepare_overlay(golden, "qcow2", overlay)
    assert not overlay.exists()


def test_a_golden_file_replaced_by_a_link_is_refused_before_use(tmp_path, disk):
    store = ImageStore(tmp_path / "images")
    image = store.import_image("x", disk)
    store.check_unchanged(image)
    path = store.disk_path(image)
    moved = tmp_path / "moved.qcow2"
    os.rename(path, moved)  # the same inode: size and modification time unchanged
    path.symlink_to(moved)
    with pytest.raises(ImageError, match="is not a regular file .a symbolic link"):
        store.check_unchanged(image)


def test_a_record_naming_a_file_outside_the_image_directory_is_refused(tmp_path, disk):
    store = ImageStore(tmp_path / "images")
    store.import_image("x", disk)
    record = store.image_dir / "x.json"
    data = json.loads(record.read_text())
    data["disk"] = "../../etc/shadow"
    record.write_text(json.dumps(data))
    with pytest.raises(ImageError, match="names ../../etc/shadow, not a file of the image"):
        store.get("x")


def test_a_slot_disk_stored_as_an_image_is_self_contained(tmp_path, disk):
    store = ImageStore(tmp_path / "images")
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"kernel")
    base = store.import_image("base", disk, kernel=kernel, cmdline="console=ttyS0")
    overlay = tmp_path / "ov" / "s1.2.0.qcow2"
    prepare_overlay(store.disk_path(base), base.format, overlay)
    saved = store.store_from_disk("saved", overlay, base)
    assert (saved.format, saved.cmdline) == ("qcow2", "console=ttyS0")
    assert store.verify("saved") == []
    info = json.loads(subprocess.run(
        ["qemu-img", "info", "-f", "qcow2", "--output=json", str(store.disk_path(saved))],
        check=True, capture_output=True, text=True).stdout)
    assert "backing-filename" not in info
    assert not [n for n in os.listdir(store.image_dir) if n.endswith(".part")]
