"""Image store: import with sha256, verify, remove, name validation, overlays."""

from __future__ import annotations

import subprocess

import pytest

from vmimagemanager.errors import ImageError
from vmimagemanager.images import ImageStore, prepare_overlay


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
