"""What the tests (and benchmarks/) share besides pytest fixtures: the tree's paths, the switch that
makes a missing daemon a failure, scratch node configurations and the test images.

Modules: sgecell (the real gridengine cell as pool accounts), ce_jobs (job scripts shaped as a CE
writes them), ce_submit (a CE's submissions on the cell), testdriver (a node on libvirt's
test:///default driver), pki (test certificates and proxies), prometheus (the text format as a
scraper reads it), packages (the tree as packages are built from it), squat (another account on
a VM's port). Import them as `tests.support...` from the tree's top (pytest's pythonpath, or
`python -m benchmarks.NAME` there).
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
HARNESS = REPO / "harness"
# VMIM_INTEGRATION=1 (`make test`, CI): an integration test that finds no daemon fails.
INTEGRATION = os.environ.get("VMIM_INTEGRATION") == "1"
# pgrep/pkill options that match only this host's daemons: not those of a node the tests run in
# namespaces of its own (harness/sge-node.sh, tests/cell/test_systemd.py's container)
THIS_HOST = ("--ns", str(os.getpid()), "--nslist", "pid,mnt")


def require(ok: bool, what: str) -> None:
    """Skip the test unless `ok`; with VMIM_INTEGRATION=1 fail it instead."""
    if ok:
        return
    if INTEGRATION:
        pytest.fail(f"{what} (VMIM_INTEGRATION=1: integration tests must not be skipped)")
    pytest.skip(what)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], capture_output=True, text=True)


def make_base_dir(prefix: str) -> Path:
    """A directory pool accounts can traverse (the starter reads its context below it)."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    os.chmod(base, 0o755)
    return base


def node_budget(cores: int, memory_mib: int, per_core_mib: int = 256) -> dict:
    """A configuration's settings for a node of job-shaped VMs (docs/job-shapes.md): `cores`
    and `memory_mib` for all VMs (QEMU's 128 MiB each included), `per_core_mib` for a job that
    asks for no memory; instead of the fixed slot size write_config gives."""
    return {"slot_defaults": None,
            "node": {"cores": cores, "memory_mib": memory_mib, "vm_overhead_mib": 128},
            "job_defaults": {"memory_per_core_mib": per_core_mib}}


def write_config(base: Path, slots: int, extra: dict | None = None, prefix: str = "t") -> Path:
    """A configuration on the real libvirtd (qemu:///system) with `slots` user-network slots."""
    data = {
        "libvirt_uri": "qemu:///system",
        "domain_type": "auto",
        "image_dir": str(base / "images"),
        "overlay_dir": str(base / "overlays"),
        "state_dir": str(base / "state"),
        "run_dir": str(base / "run"),
        "boot_timeout": 150,
        "slot_defaults": {"vcpus": 1, "memory_mib": 256},
        "slots": [{"name": f"{prefix}{i}", "network": {"type": "user", "ssh_port": free_port()}}
                  for i in range(1, slots + 1)],
        "vos": {"atlas": {"image": "atlas", "groups": ["atlas"]},
                "cms": {"image": "cms", "groups": ["cms"]}},
        "unmatched": "reject",
    }
    data.update(extra or {})
    path = base / "vmimagemanager.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))  # VO order matters
    os.chmod(path, 0o644)
    return path


def import_test_images(cfg, manifest: dict, names=("atlas", "cms", "atlas-nossh")) -> None:
    """The test node's admin set-up: its images, and its admin key (made at install time,
    never by a job's hook)."""
    from vmimagemanager.images import ImageStore
    from vmimagemanager.node.state import ensure_admin_key

    ensure_admin_key(cfg)

    store = ImageStore(cfg.image_dir)
    d = manifest["dir"]
    for name in names:
        if not store.exists(name):
            store.import_image(name, d / manifest["images"][name]["disk"],
                               kernel=d / manifest["kernel"], initrd=d / manifest["initrd"],
                               cmdline=manifest["cmdline"])
