"""Disk preparation vs image size: a qcow2 overlay (what vmimagemanager does) next to a full
copy of the same golden image (what a copy/rsync-based image manager does).

Golden images are sparse raw files of 1, 10 and 50 GiB with some data written at spread offsets.
The full copy writes every byte (cp --sparse=never); it is skipped for a size the disk cannot hold
twice with 10 GiB to spare, and says so.
Usage: python -m benchmarks.overlay_vs_copy [--sizes 1 10 50]    (from the tree's top)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.common import report
from vmimagemanager.images import prepare_overlay

GIB = 1 << 30


def make_golden(path: Path, size_gib: int) -> None:
    with open(path, "wb") as fh:
        fh.truncate(size_gib * GIB)
        for i in range(16):  # a little real data spread over the image
            fh.seek(i * size_gib * GIB // 16)
            fh.write(os.urandom(1 << 20))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--dir", default="/var/tmp")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="vmim-bench-disk-", dir=args.dir) as tmp:
        for size in args.sizes:
            golden = Path(tmp) / f"golden-{size}.raw"
            make_golden(golden, size)
            times = []
            for i in range(5):
                overlay = Path(tmp) / f"ov-{size}-{i}.qcow2"
                start = time.perf_counter()
                prepare_overlay(golden, "raw", overlay)
                times.append(time.perf_counter() - start)
                overlay.unlink()
            row = {"image GiB": size, "overlay s (best of 5)": min(times),
                   "overlay s (median)": sorted(times)[2]}
            free = shutil.disk_usage(tmp).free
            if free > 2 * size * GIB + 10 * GIB:
                copy = Path(tmp) / f"copy-{size}.raw"
                start = time.perf_counter()
                subprocess.run(["cp", "--sparse=never", str(golden), str(copy)], check=True)
                os.sync()
                row["full copy s"] = time.perf_counter() - start
                copy.unlink()
            else:
                row["full copy s"] = f"skipped ({free / GIB:.0f} GiB free)"
            golden.unlink()
            rows.append(row)
    report("overlay_vs_copy", rows, ["image GiB", "overlay s (best of 5)", "overlay s (median)",
                                     "full copy s"])


if __name__ == "__main__":
    main()
