"""Shared set-up for the benchmarks: test images, a scratch configuration, result output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def build_images() -> dict:
    out = subprocess.run([sys.executable, str(REPO / "examples/guest/build_images.py"),
                          "--json"], check=True, capture_output=True, text=True).stdout
    manifest = json.loads(out)
    manifest["dir"] = Path(manifest["dir"])
    return manifest


def scratch_config(slots: int, prefix: str = "b"):
    """A configuration under /var/tmp with `slots` user-network slots and atlas/cms imported."""
    import yaml

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import free_port, import_test_images

    from vmimagemanager.config import load_config

    base = Path(tempfile.mkdtemp(prefix="vmim-bench-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    data = {
        "domain_type": "auto", "image_dir": str(base / "images"),
        "overlay_dir": str(base / "overlays"), "state_dir": str(base / "state"),
        "run_dir": str(base / "run"), "boot_timeout": 180,
        "slot_defaults": {"vcpus": 1, "memory_mib": 256},
        "slots": [{"name": f"{prefix}{i}", "network": {"type": "user", "ssh_port": free_port()}}
                  for i in range(1, slots + 1)],
        "vos": {"atlas": {"image": "atlas", "groups": ["atlas"]},
                "cms": {"image": "cms", "groups": ["cms"]}},
    }
    path = base / "vmimagemanager.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    os.chmod(path, 0o644)
    cfg = load_config(str(path))
    import_test_images(cfg, build_images(), names=("atlas", "cms"))
    return base, path, cfg


def report(name: str, rows: list[dict], columns: list[str], extra: dict | None = None) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(_fmt(row.get(c)).ljust(widths[c]) for c in columns))
    out = REPO / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"rows": rows, **(extra or {})}, indent=2,
                                                 default=str) + "\n")
    print(f"(written to benchmarks/results/{name}.json)")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "" if value is None else str(value)
