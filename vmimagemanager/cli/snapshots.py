"""`vmimagemanager snapshots ACTION`: the node's memory snapshots (docs/snapshots.md): list
them with what they cost, make one now, remove them."""

from __future__ import annotations

import argparse
import json
import time

from ..config import Config
from .command import Command, Group, configured, open_node
from .output import table


def _rows(cfg: Config) -> list[dict]:
    # lazy: the node's snapshot store brings the image store
    from ..errors import ImageError
    from ..images import ImageStore
    from ..node.snapshots import all_snapshots, kind_name, why_unusable

    store, rows = ImageStore(cfg.image_dir), []
    for snap in all_snapshots(cfg):
        try:
            why = why_unusable(cfg, snap, store.get(snap.image))
        except ImageError as exc:
            why = str(exc)
        rows.append({"snapshot": kind_name(snap.image, snap.shape), "image": snap.image,
                     "cores": snap.cores, "memory_mib": snap.memory_mib, **snap.sizes_mib(),
                     "made": time.strftime("%Y-%m-%d %H:%M", time.localtime(snap.created)),
                     "usable": not why, "why_not": why})
    return rows


def _list_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true")


def list_snapshots(cfg: Config, args: argparse.Namespace) -> int:
    rows = _rows(cfg)
    if args.json:
        print(json.dumps({"enabled": cfg.snapshot_starts, "snapshots": rows}, indent=2))
        return 0
    print(table(rows, ["snapshot", "usable", "memory_mib", "disk_mib", "made", "why_not"]))
    if not cfg.snapshot_starts:
        print("snapshot starts are off (snapshot_starts: true in the configuration)")
    return 0


def _make_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image")
    parser.add_argument("--cores", type=int, default=1)
    parser.add_argument("--memory", type=int, metavar="MIB",
                        help="the VM's memory (default: the image's VO's for the cores)")


def make(cfg: Config, args: argparse.Namespace) -> int:
    from ..node.restore import make_snapshot

    vo = next((rule.name for rule in cfg.vos if rule.image == args.image), "")
    shape = cfg.job_shape(vo, args.cores, args.memory)
    snap = make_snapshot(open_node(cfg), args.image, vo, shape)
    sizes = snap.sizes_mib()
    print(f"made the snapshot of {args.image} ({shape}): {sizes['memory_mib']} MiB of memory, "
          f"{sizes['disk_mib']} MiB of disk")
    return 0


def _remove_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", nargs="?", help="only this image's (default: every one)")


def remove(cfg: Config, args: argparse.Namespace) -> int:
    from ..node.snapshots import all_snapshots, remove_of_image

    images = [args.image] if args.image else sorted({s.image for s in all_snapshots(cfg)})
    for image in images:
        for line in remove_of_image(cfg, image):
            print(line)
    return 0


SNAPSHOTS = Group("snapshots", "memory snapshots VMs start from (snapshot_starts)", (
    Command("list", "list the snapshots, their size and whether they are usable",
            configured(list_snapshots), _list_arguments),
    Command("make", "boot an image once and save it as its snapshot (the agent does this "
            "itself)", configured(make), _make_arguments),
    Command("remove", "remove snapshots (VMs restored from them keep running)",
            configured(remove), _remove_arguments),
))
