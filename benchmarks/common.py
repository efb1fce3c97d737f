"""Shared set-up for the benchmarks: test images, a scratch configuration, result output.

The benchmarks run as modules from the tree's top (`python -m benchmarks.NAME`), which puts the
tree on the path: they import vmimagemanager and the tests' helpers (tests.support) from it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support import REPO, import_test_images, make_base_dir, write_config


def build_images() -> dict:
    out = subprocess.run([sys.executable, str(REPO / "examples/guest/build_images.py"),
                          "--json"], check=True, capture_output=True, text=True).stdout
    manifest = json.loads(out)
    manifest["dir"] = Path(manifest["dir"])
    return manifest


def scratch_config(slots: int, prefix: str = "b", extra: dict | None = None,
                   overlay_tmpfs_mib: int = 0):
    """A configuration under /var/tmp with `slots` user-network slots and atlas/cms imported;
    `extra` settings added; overlay_dir a tmpfs of its own (to be filled) if a size is given."""
    from vmimagemanager.config import load_config

    base = make_base_dir("vmim-bench-")
    if overlay_tmpfs_mib:
        (base / "overlays").mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={overlay_tmpfs_mib}m,mode=0711",
                        "vmim-bench", str(base / "overlays")], check=True)
    path = write_config(base, slots, extra={"boot_timeout": 180, **(extra or {})},
                        prefix=prefix)
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
