"""Cold boot of the test image by boot form, all measured in one run on the same machine.

"compressed": the Debian bzImage (XZ) and a gzip'd initramfs, as the test image was built before;
"pvh": the uncompressed vmlinux with its PVH entry and the initramfs uncompressed, as it is built
now; "disk": the same root file system as a disk that boots by itself (SeaBIOS, SYSLINUX, the
bzImage; imported without --kernel, as sites' SL/EL cloud images are). Jobs alternate between
the forms (same root file system, same domain, same slot), each through the
library's own start path: QEMU start -> host key on the console -> login done (a real ssh login
as the job's account), then the slot's teardown.
Usage: python -m benchmarks.boot [--jobs 3]    (jobs per form; from the tree's top)
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import statistics
import time
from pathlib import Path

from benchmarks.common import build_images, report, scratch_config


def add_compressed_image(cfg, manifest: dict, work) -> None:
    from vmimagemanager.images import ImageStore

    d = manifest["dir"]
    initrd = work / "initrd.img.gz"
    initrd.write_bytes(gzip.compress((d / manifest["initrd"]).read_bytes(), compresslevel=6))
    kernel = Path(f"/boot/vmlinuz-{manifest['kernel_release']}")
    ImageStore(cfg.image_dir).import_image(
        "atlas-compressed", d / manifest["images"]["atlas"]["disk"], kernel=kernel,
        initrd=initrd, cmdline=manifest["cmdline"])
    ImageStore(cfg.image_dir).import_image(
        "atlas-diskboot", d / manifest["images"]["atlas-diskboot"]["disk"])


FORMS = {"atlas-compressed": "compressed", "atlas": "pvh", "atlas-diskboot": "disk"}


def one_boot(path: str, n: int, image: str) -> dict:
    from vmimagemanager.config import load_config
    from vmimagemanager.node import JobRequest, open_node

    cfg = load_config(path)
    life = open_node(cfg)
    started = life.start_vm(JobRequest(str(70000 + n), "0", "atlas001", image, "atlas"))
    lease, ctx = started.lease, started.context
    life.end_vm(lease.slot, job_label=ctx.label)
    p = life.phase.seconds
    to_key = p["guest boot (to host key on console)"]
    return {"form": FORMS[image], "job": n,
            "to host key": to_key, "host key -> login": p["wait for ssh"],
            "QEMU start -> login": to_key + p["wait for ssh"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=3)
    args = parser.parse_args()
    base, path, cfg = scratch_config(1, prefix="bb")
    try:
        add_compressed_image(cfg, build_images(), base)
        rows = []
        for n in range(args.jobs):
            for k, image in enumerate(FORMS):
                rows.append(one_boot(str(path), len(FORMS) * n + k, image))
                time.sleep(0.5)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    columns = ["form", "job", "to host key", "host key -> login", "QEMU start -> login"]
    medians = []
    for form in FORMS.values():
        mine = [r for r in rows if r["form"] == form]
        medians.append({"form": form, "job": "median",
                        **{c: statistics.median(r[c] for r in mine) for c in columns[2:]}})
    login = {m["form"]: m["QEMU start -> login"] for m in medians}
    ratios = {"pvh/compressed": login["pvh"] / login["compressed"],
              "disk/pvh": login["disk"] / login["pvh"]}
    print("Cold boot of the test image (seconds), TCG or KVM as the machine has it")
    report("boot", [*rows, *medians], columns, ratios)
    for name, ratio in ratios.items():
        print(f"{name} (QEMU start -> login): {ratio:.2f}")


if __name__ == "__main__":
    main()
