"""Spares by shape: the boot time and the idle cost of a 1-core and an 8-core spare, measured in
one run on the same machine through the agent's own provision path (provision_spare: lease,
overlay, seed, domain, host key, the admin's login kept), then idle for --idle seconds.
Figures per spare: QEMU start -> login, the CPU seconds QEMU used while idle (libvirt's
cpu_time), QEMU's resident memory at the end (VmRSS) and its peak (VmHWM).
Usage: python -m benchmarks.shapes [--rounds 2] [--idle 30]    (from the tree's top)
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time

from benchmarks.common import build_images, report
from tests.support import import_test_images, make_base_dir, node_budget, write_config

SHAPES = {"1 core": (1, 2048), "8 cores": (8, 16000)}


def measure(life, shape, idle: float) -> dict:
    from vmimagemanager.node.spares import provision_spare

    life.phase.seconds.clear()
    start = time.monotonic()
    lease = provision_spare(life, "atlas", "atlas", shape)
    provision = time.monotonic() - start
    p = life.phase.seconds
    name = life.cfg.slot(lease.slot).domain_name
    before = life.hv.usage(name)
    time.sleep(idle)
    after = life.hv.usage(name)
    with open(f"/proc/{life.hv.process_id(name)}/status", encoding="ascii") as fh:
        status = dict(line.split(":", 1) for line in fh)
    life.retire_spare(slot=lease.slot)
    return {"QEMU start -> login": p["guest boot (to host key on console)"] + p["wait for ssh"],
            "provision": provision,
            "idle CPU s/min": (after["cpu_seconds"] - before["cpu_seconds"]) * 60 / idle,
            "RSS MiB": int(status["VmRSS"].split()[0]) / 1024,
            "peak RSS MiB": int(status["VmHWM"].split()[0]) / 1024}


def main() -> None:
    from vmimagemanager.config import load_config
    from vmimagemanager.node import open_node
    from vmimagemanager.shape import Shape

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--idle", type=float, default=30.0)
    args = parser.parse_args()
    base = make_base_dir("vmim-bench-")
    try:
        path = write_config(base, 1, prefix="bs", extra={
            **node_budget(cores=8, memory_mib=20480), "boot_timeout": 300})
        cfg = load_config(str(path))
        import_test_images(cfg, build_images(), names=("atlas",))
        life = open_node(cfg)
        rows = []
        for n in range(args.rounds):
            for label, (cores, memory) in SHAPES.items():  # alternating: same conditions
                rows.append({"shape": label, "round": n,
                             **measure(life, Shape(cores, memory), args.idle)})
    finally:
        shutil.rmtree(base, ignore_errors=True)
    columns = ["shape", "round", "QEMU start -> login", "provision", "idle CPU s/min",
               "RSS MiB", "peak RSS MiB"]
    medians = [{"shape": label, "round": "median",
                **{c: statistics.median(r[c] for r in rows if r["shape"] == label)
                   for c in columns[2:]}} for label in SHAPES]
    one, eight = medians
    ratios = {"8/1 boot": eight["QEMU start -> login"] / one["QEMU start -> login"],
              "8/1 idle CPU": eight["idle CPU s/min"] / max(one["idle CPU s/min"], 1e-9),
              "8/1 RSS": eight["RSS MiB"] / one["RSS MiB"]}
    print(f"Spares of two shapes (test image, {args.idle:.0f} s idle each), TCG or KVM as the "
          "machine has it")
    report("shapes", [*rows, *medians], columns, {"ratios": ratios, "idle_seconds": args.idle})
    for name, ratio in ratios.items():
        print(f"{name}: {ratio:.2f}")


if __name__ == "__main__":
    main()
