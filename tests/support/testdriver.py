"""A node on libvirt's in-process test driver (test:///default): real libvirt code, no daemon and
no QEMU. The one configuration every unit test that needs a node starts from."""

from __future__ import annotations

from pathlib import Path

import yaml

URI = "test:///default"


def node_data(base: Path, slots: int | list[dict] = 4, first_port: int = 30001,
              prefix: str = "s", **settings) -> dict:
    """A configuration's data with its directories below `base` and `slots` user-network slots
    named `prefix`1.. on ports from `first_port` (or the slots given); `settings` are added or
    replace these."""
    if isinstance(slots, int):
        slots = [{"name": f"{prefix}{i}", "network": {"type": "user",
                                                      "ssh_port": first_port + i - 1}}
                 for i in range(1, slots + 1)]
    data = {"libvirt_uri": URI, "domain_type": "qemu",
            "image_dir": str(base / "images"), "overlay_dir": str(base / "overlays"),
            "state_dir": str(base / "state"), "run_dir": str(base / "run"), "slots": slots}
    data.update(settings)
    return data


def node_config(base: Path, **kwargs):
    """The parsed configuration (`node_data`'s arguments), as if read from base/c.yaml."""
    from vmimagemanager.config import parse_config

    return parse_config(node_data(base, **kwargs), str(base / "c.yaml"))


def write_node_config(path: Path, **kwargs) -> Path:
    """`node_data` for the directory `path` is in, written to `path` (for the CLI and hooks)."""
    path.write_text(yaml.safe_dump(node_data(path.parent, **kwargs)))
    return path


def clean(hv):
    """`hv`, a connection to the test driver, with no domain: the driver's state lives as long
    as the process, so a test starts clean."""
    for name in hv.domain_names():
        hv.destroy(name)
    return hv


def hypervisor():
    """A clean LibvirtHypervisor on the test driver."""
    from vmimagemanager.hypervisor import LibvirtHypervisor

    return clean(LibvirtHypervisor(URI))


def node_life(base: Path, **kwargs):
    """A Node on the test driver and its configuration (`node_data`'s arguments)."""
    from vmimagemanager.node import Node
    from vmimagemanager.node.state import ensure_state_dirs

    cfg = node_config(base, **kwargs)
    ensure_state_dirs(cfg)  # what open_node does before a Node
    return Node(cfg, hypervisor()), cfg
