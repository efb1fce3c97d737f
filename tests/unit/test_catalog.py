"""`images publish` / `images sync`: one catalog on a shared directory, several nodes' stores.

Each node is a configuration of its own (image store, overlays, lease database), driven through
the real CLI; libvirt is its test driver (no VM is booted: a sync never boots one). Leases and
overlays made here are what a prolog makes before it boots (the lease database, qemu-img).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.support import testdriver
from vmimagemanager.catalog import CATALOG_FILE, read_catalog, sync
from vmimagemanager.config import load_config
from vmimagemanager.errors import ImageError
from vmimagemanager.images import ImageStore, prepare_overlay
from vmimagemanager.node import open_node


class CatalogNode:
    def __init__(self, base: Path, name: str):
        self.base = base / name
        self.base.mkdir()
        self.config = testdriver.write_node_config(
            self.base / "vmimagemanager.yaml", slots=1,
            vos={"atlas": {"image": "atlas", "groups": ["atlas"]}})
        self.cfg = load_config(str(self.config))
        self.store = ImageStore(self.cfg.image_dir)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.popen_args(*args), capture_output=True, text=True,
                              timeout=120)

    def popen_args(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "vmimagemanager.cli", "--config", str(self.config), *args]

    def life(self):
        return open_node(self.cfg)

    def files(self) -> list[str]:
        return sorted(p.name for p in self.cfg.image_dir.iterdir() if p.name != ".lock")


def make_disk(path: Path, content: bytes) -> Path:
    raw = path.with_suffix(".raw")
    raw.write_bytes(content.ljust(1 << 20, b"\0"))
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(path)], check=True)
    raw.unlink()
    return path


@pytest.fixture
def root_base():
    """A directory whose every parent only root writes: a catalog below pytest's tmp_path is
    refused (/tmp is writable by all), so these tests work in /srv/vmim-test-XXXX (0755)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: a node accepts only root's catalogs")
    parent = next(d for d in ("/srv", "/var/lib", "/root")
                  if os.path.isdir(d) and os.stat(d).st_uid == 0
                  and not os.stat(d).st_mode & 0o022)
    base = Path(tempfile.mkdtemp(prefix="vmim-test-", dir=parent))
    os.chmod(base, 0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def site(root_base):
    """Node a (where the admin imports and publishes), nodes b and c, the catalog."""
    tmp_path = root_base
    nodes = {name: CatalogNode(tmp_path, name) for name in "abc"}
    catalog = tmp_path / "cvmfs" / "images"
    catalog.mkdir(mode=0o755, parents=True)
    os.chmod(catalog.parent, 0o755)  # whatever the umask
    os.chmod(catalog, 0o755)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"a kernel")
    disk = make_disk(tmp_path / "atlas-v1.qcow2", b"version 1")
    r = nodes["a"].cli("images", "import", "atlas", str(disk), "--kernel", str(kernel),
                       "--cmdline", "console=ttyS0")
    assert r.returncode == 0, r.stderr
    r = nodes["a"].cli("images", "publish", "atlas", str(catalog))
    assert r.returncode == 0 and "published atlas" in r.stdout, r.stderr
    return nodes, catalog, tmp_path


def test_a_published_image_reaches_every_node_verified_even_all_at_once(site):
    nodes, catalog, _ = site
    assert nodes["b"].cli("images", "sync", str(catalog), "--dry-run").stdout.startswith(
        "would import atlas")
    assert nodes["b"].store.list() == []
    # b twice and c, all at the same moment (cron on every node at the same minute)
    procs = [subprocess.Popen(nodes[n].popen_args("images", "sync", str(catalog)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in "bbc"]
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    assert [rc for rc, _, _ in results] == [0, 0, 0], results
    assert sum(out.startswith("imported atlas (sha256 ") for _, out, _ in results) >= 2, results
    for name in "bc":
        image = nodes[name].store.get("atlas")
        source = nodes["a"].store.get("atlas")
        assert image.sha256[image.disk] == source.sha256[source.disk]
        assert image.sha256[image.kernel] == source.sha256[source.kernel]
        assert image.cmdline == "console=ttyS0" and image.catalog == str(catalog.resolve())
        assert nodes[name].store.verify("atlas") == []
        assert not [f for f in nodes[name].files() if f.endswith(".part")]
    r = nodes["b"].cli("images", "sync", str(catalog))
    assert r.returncode == 0 and r.stdout.strip().endswith(
        "0 change(s), 1 image(s) unchanged, 0 problem(s)"), r.stdout


def test_a_copy_that_does_not_match_its_sum_is_not_imported(site):
    nodes, catalog, _ = site
    entry = read_catalog(catalog)["atlas"]
    with open(catalog / entry.files["disk"], "r+b") as handle:  # a file still being written
        handle.seek(1 << 16)
        handle.write(b"half-written")
    r = nodes["b"].cli("images", "sync", str(catalog))
    assert r.returncode == 1
    problem = [line for line in r.stderr.splitlines() if ": image atlas:" in line]
    assert len(problem) == 1 and "the catalog gives; not imported" in problem[0], r.stderr
    assert nodes["b"].store.list() == [] and nodes["b"].files() == []


def test_a_changed_image_is_taken_at_once_while_running_vms_keep_the_old_files(site):
    nodes, catalog, tmp = site
    assert nodes["b"].cli("images", "sync", str(catalog)).returncode == 0
    node = nodes["b"]
    life = node.life()
    old = node.store.get("atlas")
    lease, _ = life.leases.allocate(["s1"], "101", "0", "atlas001", "atlas", "atlas")
    overlay = node.cfg.overlay_dir / f"s1.{lease.job_label}.qcow2"
    prepare_overlay(node.store.disk_path(old), old.format, overlay)  # what a prolog does

    assert nodes["a"].cli("images", "remove", "atlas").returncode == 0
    disk2 = make_disk(tmp / "atlas-v2.qcow2", b"version 2")
    assert nodes["a"].cli("images", "import", "atlas", str(disk2), "--kernel",
                          str(tmp / "vmlinuz"), "--cmdline", "console=ttyS0").returncode == 0
    assert nodes["a"].cli("images", "publish", "atlas", str(catalog)).returncode == 0

    r = node.cli("images", "sync", str(catalog))
    assert r.returncode == 0 and "updated atlas" in r.stdout, (r.stdout, r.stderr)
    new = node.store.get("atlas")
    assert new.disk != old.disk and new.kernel == old.kernel  # the kernel was not copied again
    assert new.imported_at > old.imported_at  # the agent replaces spares booted before
    assert list(new.superseded) == [old.disk]
    assert (node.cfg.image_dir / old.disk).exists()  # the running VM's overlay names it
    # no grace: only the overlay keeps the old file, and it does
    with node.store.lock():
        assert sync(life, catalog, grace=0).done == []
    assert (node.cfg.image_dir / old.disk).exists()
    assert life.end_vm("s1", job_label=lease.job_label)  # the job ends: overlay deleted
    assert not overlay.exists()
    with node.store.lock():
        done = sync(life, catalog, grace=0).done
    assert done == [f"deleted {old.disk}, a file of an earlier version of atlas that no VM "
                    "uses any more"]
    assert node.files() == sorted([new.disk, new.kernel, "atlas.json"])
    assert node.store.get("atlas").superseded == {}


def test_an_image_that_left_the_catalog_goes_once_no_lease_uses_it(site):
    nodes, catalog, tmp = site
    node = nodes["b"]
    assert node.cli("images", "sync", str(catalog)).returncode == 0
    life = node.life()
    lease, _ = life.leases.allocate(["s1"], "102", "0", "atlas001", "atlas", "atlas")
    r = nodes["a"].cli("images", "unpublish", "atlas", str(catalog))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in catalog.iterdir() if not p.name.startswith(".")) == \
        [CATALOG_FILE]
    r = node.cli("images", "sync", str(catalog))
    assert r.returncode == 0
    assert "kept atlas although it left the catalog" in r.stdout and "102.0" in r.stdout
    assert "VO atlas: its image atlas is not on this node" not in r.stderr
    assert life.end_vm("s1", job_label=lease.job_label)
    r = node.cli("images", "sync", str(catalog))
    assert r.returncode == 0 and "removed image atlas (no longer in the catalog)" in r.stdout
    assert "VO atlas: its image atlas is not on this node" in r.stderr  # jobs would fail
    assert node.files() == []


def test_a_sync_never_replaces_an_image_imported_by_hand(site):
    nodes, catalog, tmp = site
    node = nodes["c"]
    mine = make_disk(tmp / "local.qcow2", b"the admin's own")
    assert node.cli("images", "import", "atlas", str(mine)).returncode == 0
    before = node.store.get("atlas")
    r = node.cli("images", "sync", str(catalog))
    assert r.returncode == 1
    assert "not replaced by the catalog's: the local one was imported by hand" in r.stderr
    assert node.store.get("atlas") == before


def _catalog_with(catalog: Path, **changes) -> None:
    data = yaml.safe_load((catalog / CATALOG_FILE).read_text())
    data["images"]["atlas"].update(changes)
    (catalog / CATALOG_FILE).write_text(yaml.safe_dump(data))


@pytest.mark.parametrize("changes, message", [
    ({"disk": "/etc/passwd"}, "must be a path inside the catalog directory"),
    ({"disk": "../../a/vmimagemanager.yaml"}, "must be a path inside the catalog directory"),
    ({"disk": "escape.qcow2"}, "leads out of the catalog directory"),
    ({"sha256": "ABC"}, "sha256 must be 64 lower-case hex digits"),
    ({"owner": "me"}, "unknown keys ['owner']"),
    ({"kernel": None, "kernel_sha256": None}, "kernel_sha256 must be 64"),
])
def test_catalog_entries_that_escape_or_are_malformed_are_refused(site, changes, message):
    nodes, catalog, _ = site
    (catalog / "escape.qcow2").symlink_to("/etc/shadow")
    _catalog_with(catalog, **changes)
    r = nodes["b"].cli("images", "sync", str(catalog))
    assert r.returncode == 1 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert nodes["b"].store.list() == []


def test_a_catalog_others_may_write_or_that_is_not_there_is_refused(site):
    nodes, catalog, tmp = site
    os.chmod(catalog / CATALOG_FILE, 0o666)
    r = nodes["b"].cli("images", "sync", str(catalog))
    assert r.returncode == 1 and "writable by group or others" in r.stderr
    r = nodes["b"].cli("images", "sync", str(tmp / "not-mounted"))
    assert r.returncode == 1 and "is the catalog file system mounted?" in r.stderr
    with pytest.raises(ImageError, match="not valid YAML"):
        (catalog / CATALOG_FILE).write_text("images: [unclosed")
        os.chmod(catalog / CATALOG_FILE, 0o644)
        read_catalog(catalog)


# -- who may change a catalog decides what every node boots, as root -------------------------
def refused(node: CatalogNode, catalog: Path, message: str) -> None:
    r = node.cli("images", "sync", str(catalog))
    assert r.returncode == 1 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "retry" in r.stderr, r.stderr
    assert node.store.list() == [] and node.files() == []


@pytest.mark.parametrize("which", ["catalog directory", CATALOG_FILE, "parent"])
def test_a_catalog_not_owned_by_root_is_refused(site, which):
    nodes, catalog, _ = site
    target = {"catalog directory": catalog, CATALOG_FILE: catalog / CATALOG_FILE,
              "parent": catalog.parent}[which]
    os.chown(target, 65534, 65534)
    refused(nodes["b"], catalog, f"{target} belongs to uid 65534, not root")


@pytest.mark.parametrize("mode", [0o775, 0o757, 0o1777])
@pytest.mark.parametrize("which", ["parent", "grandparent"])
def test_a_catalog_below_a_directory_others_may_write_is_refused(site, which, mode):
    """Any directory on the way, group- or other-writable, sticky (like /tmp) or not."""
    nodes, catalog, base = site
    target = catalog.parent if which == "parent" else base
    os.chmod(target, mode)
    refused(nodes["b"], catalog, f"{target} is writable by group or others (mode {mode:o})")


def test_a_catalog_reached_through_another_users_link_is_refused(site):
    nodes, catalog, base = site
    link = base / "catalog-link"
    link.symlink_to(catalog)
    os.lchown(link, 65534, 65534)
    refused(nodes["b"], link, f"{link} is a symbolic link of uid 65534")
    os.lchown(link, 0, 0)  # root's own link is fine: nobody else can change it
    r = nodes["b"].cli("images", "sync", str(link))
    assert r.returncode == 0 and "imported atlas" in r.stdout, r.stderr
    assert nodes["b"].store.get("atlas").catalog == str(catalog)


@pytest.mark.parametrize("which", ["disk", "kernel", CATALOG_FILE])
def test_a_symbolic_link_in_the_catalog_is_refused(site, which):
    """Even one pointing at a file inside the catalog: publish never makes one, and root
    opens what a catalog names without following links."""
    nodes, catalog, _ = site
    entry = read_catalog(catalog)["atlas"]
    name = CATALOG_FILE if which == CATALOG_FILE else entry.files[which]
    real = catalog / f"real-{name}"
    os.rename(catalog / name, real)
    (catalog / name).symlink_to(real.name)
    refused(nodes["b"], catalog, "is a symbolic link")


def test_a_catalog_image_naming_a_host_data_file_is_not_imported(site):
    nodes, catalog, base = site
    secret = base / "host-secret"
    evil = catalog / "atlas-evil.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    f"data_file={secret},data_file_raw=on", str(evil), "1M"], check=True)
    _catalog_with(catalog, disk=evil.name,
                  sha256=hashlib.sha256(evil.read_bytes()).hexdigest())
    r = nodes["b"].cli("images", "sync", str(catalog))
    assert r.returncode == 1, r.stdout
    problem = [line for line in r.stderr.splitlines() if ": image atlas:" in line]
    assert len(problem) == 1 and "names an external data file" in problem[0], r.stderr
    assert nodes["b"].store.list() == [] and nodes["b"].files() == []
