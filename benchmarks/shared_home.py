"""The shared home's speed inside a VM: the owner's virtiofsd against 9p, and natively on the host.

One run, one machine, the same workloads (busybox in the guest, the host's sh natively), each
timed inside the machine that does it (/proc/uptime, 10 ms):
- write 256 MiB sequentially (dd, fsync at the end), read it back after dropping the caches
  (the guest's and the host's);
- create 5,000 empty files, then remove them (rm -rf);
- `tar x` of a source tree (this repository, `git archive`).

Legs:
- native: on the host, as the pool account, in a directory of its home;
- virtiofs: a job's VM as vmimagemanager makes it (the owner's home through a virtiofsd running
  as the owner), the workload run as the owner;
- 9p: the same VM with a writable 9p export instead, as homes were served before the virtiofs
  design (QEMU's local backend, msize 256 KiB). QEMU now runs as libvirt-qemu, which cannot
  write a pool account's home: the export is a directory of QEMU's own user and the workload
  runs as root in the guest (`accessmode: squash`: the same I/O path as passthrough without its
  chown after each create).

Usage: python -m benchmarks.shared_home [--size-mib 256] [--files 5000]   (root, from the
tree's top). Writes benchmarks/results/shared_home.json; ratios are against native.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from benchmarks.common import REPO, report, scratch_config
from vmimagemanager.config import SharedPath

OWNER = "atlas001"
LEGS = ["native", "virtiofs", "9p"]  # virtiofs: the owner's virtiofsd; 9p: QEMU's own backend
STEPS = ["write", "read", "create", "remove", "tar x"]
DROP_CACHES = "sync; echo 3 > /proc/sys/vm/drop_caches"
TIMER = 'now() { read -r up _ < /proc/uptime; echo "$up"; }\n'


def scripts(directory: str, size_mib: int, files: int, tarball: str) -> tuple[str, str]:
    """Two POSIX sh scripts printing `STEP END START` lines: the write, then (after the caches
    are dropped, as root) the rest."""
    work = f"{directory}/vmim-bench"
    first = f"""set -e
rm -rf {work}; mkdir -p {work}; cd {work}
{TIMER}t=$(now); dd if=/dev/zero of=big bs=1M count={size_mib} conv=fsync 2>/dev/null
echo "write $(now) $t"
"""
    second = f"""set -e
cd {work}
{TIMER}t=$(now); dd if=big of=/dev/null bs=1M 2>/dev/null; echo "read $(now) $t"
rm -f big; mkdir many; t=$(now); i=0
while [ $i -lt {files} ]; do : > many/f$i; i=$((i+1)); done
echo "create $(now) $t"
t=$(now); rm -rf many; echo "remove $(now) $t"
t=$(now); tar xf {tarball}; echo "tar x $(now) $t"
cd /; rm -rf {work}
"""
    return first, second


def measure(run: Callable[[str], str], drop: Callable[[], None], directory: str, args,
            tarball: str) -> dict[str, float]:
    first, second = scripts(directory, args.size_mib, args.files, tarball)
    out = run(first)
    drop()
    out += run(second)
    found = {}
    for line in out.splitlines():
        parts = line.rsplit(" ", 2)
        if len(parts) == 3 and parts[0] in STEPS:
            found[parts[0]] = round(float(parts[1]) - float(parts[2]), 2)
    if missing := [s for s in STEPS if s not in found]:
        raise SystemExit(f"the workload printed no {missing}: {out[-500:]}")
    return found


def native(home: Path, tarball: Path, args) -> dict[str, float]:
    def run(script: str) -> str:
        return subprocess.run(["runuser", "-u", OWNER, "--", "sh", "-s"], input=script,
                              capture_output=True, text=True, check=True).stdout

    return measure(run, lambda: subprocess.run(["sh", "-c", DROP_CACHES], check=True),
                   str(home), args, str(tarball))


def in_vm(life, cfg, job_id: str, directory: str, tarball: str, as_root: bool,
          args) -> dict[str, float]:
    from vmimagemanager.context import key_path
    from vmimagemanager.guest import Endpoint, connect
    from vmimagemanager.node import JobRequest

    started = life.start_vm(JobRequest(job_id, "0", OWNER, "atlas", "atlas"))
    try:
        ctx = started.context
        admin = connect(life.admin_login(cfg.slot(started.lease.slot), ctx.host_key))
        user = admin if as_root else connect(Endpoint(
            ctx.host, ctx.port, ctx.user, key_path(cfg.run_dir, ctx.label), ctx.host_key))
        try:
            def drop() -> None:  # the guest's caches and the host's (the server's side)
                admin.check_call(DROP_CACHES)
                subprocess.run(["sh", "-c", DROP_CACHES], check=True)

            return measure(lambda script: user.check_call("sh -s", stdin=script.encode()),
                           drop, directory, args, tarball)
        finally:
            if user is not admin:
                user.close()
            admin.close()
    finally:
        life.end_vm(started.lease.slot)


def ratios(figures: dict[str, float], against: dict[str, float]) -> dict[str, float]:
    return {s: round(figures[s] / max(against[s], 0.01), 2) for s in STEPS}


def main() -> None:
    from vmimagemanager.node import open_node

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--leg", action="append", choices=LEGS,
                        help="only this leg (repeatable; default: all, ratios need all)")
    args = parser.parse_args()
    legs = args.leg or LEGS
    owner = pwd.getpwnam(OWNER)
    home = Path(owner.pw_dir)
    tarball = home / "vmim-bench-tree.tar"
    subprocess.run(["git", "-C", str(REPO), "archive", "-o", str(tarball), "HEAD"], check=True)
    os.chown(tarball, owner.pw_uid, owner.pw_gid)
    base, _path, cfg = scratch_config(1, prefix="sh")
    life = open_node(cfg)
    qemu_uid, qemu_gid = life.qemu_ids() or (0, 0)
    ninep = base / "ninep"
    ninep.mkdir()
    shutil.copy(tarball, ninep / tarball.name)
    for path in (ninep, ninep / tarball.name):
        os.chown(path, qemu_uid, qemu_gid)
    try:
        rows = {}
        if "native" in legs:
            rows["native"] = native(home, tarball, args)
        if "virtiofs" in legs:
            homes = replace(cfg, shared_paths=(SharedPath(str(home.parent), "hypervisor",
                                                          scope="owner"),))
            rows["virtiofs"] = in_vm(open_node(homes), homes, "97001", str(home),
                                     str(tarball), False, args)
        if "9p" in legs:
            tree = replace(cfg, shared_paths=(SharedPath(str(ninep), "hypervisor", "squash"),))
            rows["9p"] = in_vm(open_node(tree), tree, "97002", str(ninep),
                               str(ninep / tarball.name), True, args)
    finally:
        tarball.unlink(missing_ok=True)
        shutil.rmtree(base, ignore_errors=True)
    table = []
    for leg, figures in rows.items():
        table.append({"leg": leg, **figures})
        if leg != "native" and "native" in rows:
            table.append({"leg": "  ratio to native", **ratios(figures, rows["native"])})
    if "virtiofs" in rows and "9p" in rows:
        table.append({"leg": "virtiofs / 9p", **ratios(rows["virtiofs"], rows["9p"])})
    print(f"Seconds per step, {args.size_mib} MiB, {args.files} files (inside the machine that "
          "does it)")
    report("shared_home", table, ["leg", *STEPS], {"size_mib": args.size_mib,
                                                   "files": args.files})


if __name__ == "__main__":
    main()
