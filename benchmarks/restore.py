"""Probe for starts from memory snapshots (issue 30): one booted VM saved, restored as several.

Boots a spare of the atlas test image with the node's own code (`provision_spare`), closes
every connection to it, saves its memory and device state (virDomainSave: the domain stops)
and freezes its overlay (the disk as the saved memory knows it). Then restores the saved
state --restores times, one after the other, each with its own overlay on top of the frozen
one, console log and ssh forward port. Name, UUID and VM generation ID stay the saved ones':
libvirt 9.0's restore refuses any other (its ABI check), so a saved state restores only into
its own slot, and the guests are not told to reseed (the urandom column shows what that
means). For each: the restore's wall time, time to the first command over ssh (the
snapshot's host key, the node's admin key), QEMU's CPU-seconds until then, and from inside
32 bytes of /dev/urandom, the guest's clock against the host's, its boot_id and whether its
kernel sees the vmgenid device. The cold boot of the same spare is measured alongside (wall
time and QEMU's CPU-seconds to the host key).

Usage: python -m benchmarks.restore [--restores 2] [--age 5]   (from the tree's top; root)
--age: seconds the saved state rests before the first restore (the guest's clock lags by it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import time
from pathlib import Path

import libvirt
from lxml import etree

from benchmarks.common import report, scratch_config
from tests.support import free_port
from tests.support.sgecell import pids_matching
from vmimagemanager.domain_meta import QEMU_NS
from vmimagemanager.guest import Endpoint, connect, console_host_key
from vmimagemanager.node import open_node
from vmimagemanager.node.model import lease_files
from vmimagemanager.node.spares import provision_spare
from vmimagemanager.node.state import admin_key, ensure_admin_key

INSIDE = ("head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s; "
          "cat /proc/sys/kernel/random/boot_id; "
          "ls /sys/bus/acpi/devices | grep -c QEMUVGID || true")


def restored_xml(saved: str, name: str, overlay: Path, console: Path, port: int) -> str:
    """The saved domain's XML made another machine's: name, overlay, console log and ssh
    forward port. Not its UUID nor its VM generation ID: libvirt 9.0 refuses a restore whose
    UUID or genid is not the saved one's ("Target domain uuid/genid ... does not match
    source"; its ABI check), and two domains cannot share a UUID, so restores from one saved
    state run one at a time, as the saved domain (its name too: "Target domain name ... does not
match source"), and each guest is told no new generation."""
    root = etree.fromstring(saved.encode())
    root.find("name").text = name
    root.find("devices/disk/source").set("file", str(overlay))
    for chardev in (*root.iterfind("devices/serial"), *root.iterfind("devices/console")):
        if chardev.find("source") is not None:
            chardev.find("source").set("path", str(console))
    for arg in root.iter(f"{{{QEMU_NS}}}arg"):
        value = arg.get("value")
        if "hostfwd=" in value:
            head, _, tail = value.partition("hostfwd=tcp:")
            listen, _, rest = tail.partition("-:22")
            arg.set("value", f"{head}hostfwd=tcp:{listen.rsplit(':', 1)[0]}:{port}-:22{rest}")
    return etree.tostring(root, encoding="unicode")


def inside(port: int, host_key: str, key: Path) -> tuple[float, list[str]]:
    start = time.perf_counter()
    session = connect(Endpoint("127.0.0.1", port, "root", key, host_key), timeout=30)
    try:
        out = session.check_call(INSIDE)
    finally:
        session.close()
    return time.perf_counter() - start, out.strip().split("\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--restores", type=int, default=2)
    parser.add_argument("--age", type=float, default=5)
    args = parser.parse_args()
    base, _path, cfg = scratch_config(1, prefix="r")
    conn = libvirt.open(cfg.libvirt_uri)
    restored: list[str] = []
    try:
        ensure_admin_key(cfg)
        life = open_node(cfg)
        start = time.perf_counter()
        spare = provision_spare(life, "atlas", "atlas", cfg.job_shape("atlas", 1, None))
        cold_s = time.perf_counter() - start
        slot = cfg.slot(spare.slot)
        cold_cpu = life.hv.usage(slot.domain_name)["cpu_seconds"]
        files = lease_files(cfg, slot.name, spare.job_label)
        host_key = console_host_key(files.console)
        key = admin_key(cfg)[0]
        for pid in pids_matching(f"{spare.job_label}/control".encode()):  # the kept login
            os.kill(pid, 15)
        dom = conn.lookupByName(slot.domain_name)
        saved_xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE | libvirt.VIR_DOMAIN_XML_MIGRATABLE)
        snap = base / "atlas.save"
        start = time.perf_counter()
        dom.save(str(snap))
        save_s = time.perf_counter() - start
        frozen = base / "atlas.frozen.qcow2"
        os.replace(files.overlay, frozen)
        os.chmod(frozen, 0o444)
        time.sleep(args.age)
        rows = [{"start": "cold boot (spare)", "wall s": cold_s, "QEMU CPU s": cold_cpu}]
        for i in range(args.restores):
            other = slot  # the saved domain's name is the only one it restores as
            overlay = base / f"{other.name}.{i}.qcow2"
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                            str(frozen), str(overlay)], check=True)
            console = files.console.with_name(f"{other.name}.restored{i}.log")
            port = free_port()
            xml = restored_xml(saved_xml, other.domain_name, overlay, console, port)
            start = time.perf_counter()
            conn.restoreFlags(str(snap), xml, libvirt.VIR_DOMAIN_SAVE_RUNNING)
            restore_s = time.perf_counter() - start
            restored.append(other.domain_name)
            login_s, (random, clock, boot_id, genid_devices) = inside(port, host_key, key)
            cpu = life.hv.usage(other.domain_name)["cpu_seconds"]
            conn.lookupByName(other.domain_name).destroy()  # its UUID is the next one's
            rows.append({"start": f"restore {i + 1}", "wall s": restore_s + login_s,
                         "restore s": restore_s, "first command s": login_s,
                         "QEMU CPU s": cpu,
                         "clock lag s": round(time.time() - int(clock)),  # busybox date: seconds
                         "urandom": random[:16], "boot_id": boot_id[:8],
                         "vmgenid device": genid_devices})
        report("restore", rows, ["start", "wall s", "restore s", "first command s",
                                 "QEMU CPU s", "clock lag s", "urandom", "boot_id",
                                 "vmgenid device"],
               extra={"save s": save_s, "saved state MiB": snap.stat().st_size / 2**20,
                      "age s": args.age,
                      "distinct urandom": len({r.get("urandom") for r in rows[1:]})})
    finally:
        running = {dom.name(): dom for dom in conn.listAllDomains()}
        for name in restored:
            if name in running:
                running[name].destroy()
        open_node(cfg).reconcile()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
