"""`vmimagemanager images ACTION`: the node's golden images (import, list, verify, remove,
check) and the catalogs nodes share them through (sync, publish, unpublish)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import Config
from .command import Command, Group, configured, open_node
from .output import progress_bar, table

if TYPE_CHECKING:
    from ..images import ImageStore


def _store(cfg: Config) -> ImageStore:
    # lazy: the image store brings the domain XML and NSS modules, which most commands never use
    from ..images import ImageStore

    return ImageStore(cfg.image_dir)


def _name_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name")


def _json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true")


# -- import, list, verify, remove -------------------------------------------------------------
def _import_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name")
    parser.add_argument("file")
    parser.add_argument("--kernel", help="kernel for direct kernel boot")
    parser.add_argument("--initrd", help="initrd for direct kernel boot")
    parser.add_argument("--cmdline", help="kernel command line for direct kernel boot")


def import_image(cfg: Config, args: argparse.Namespace) -> int:
    store = _store(cfg)
    with store.lock():
        image = store.import_image(args.name, Path(args.file),
                                   kernel=Path(args.kernel) if args.kernel else None,
                                   initrd=Path(args.initrd) if args.initrd else None,
                                   cmdline=args.cmdline,
                                   progress=progress_bar(f"importing {args.name}"))
    print(f"imported {image.name}: {image.disk} ({image.format}) "
          f"sha256 {image.sha256[image.disk][:16]}...")
    return 0


def list_images(cfg: Config, args: argparse.Namespace) -> int:
    # lazy: the snapshot store brings the node's modules
    from ..node.snapshots import all_snapshots, kind_name

    snapshots: dict[str, list] = {}
    for snap in all_snapshots(cfg):
        snapshots.setdefault(snap.image, []).append(snap)
    rows = []
    for image in _store(cfg).list():
        size = (cfg.image_dir / image.disk).stat().st_size
        its = snapshots.get(image.name, [])
        sizes = [snap.sizes_mib() for snap in its]
        rows.append({"name": image.name, "format": image.format,
                     "size_mib": size >> 20, "boot": "kernel" if image.kernel else "disk",
                     "sha256": image.sha256.get(image.disk, "")[:16],
                     "catalog": image.catalog,
                     "imported": time.strftime("%Y-%m-%d %H:%M",
                                               time.localtime(image.imported_at)),
                     "snapshots": [kind_name(snap.image, snap.shape) for snap in its],
                     "snapshots_mib": round(sum(s["memory_mib"] + s["disk_mib"]
                                                for s in sizes), 1)})
    print(json.dumps(rows, indent=2) if args.json else
          table(rows, ["name", "format", "size_mib", "boot", "sha256", "imported",
                       "snapshots_mib"]))
    return 0


def _verify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*")


def verify_images(cfg: Config, args: argparse.Namespace) -> int:
    store = _store(cfg)
    names = args.names or [image.name for image in store.list()]
    problems = [p for name in names for p in store.verify(name)]
    for name in names:
        if not any(p.startswith(f"{name}:") for p in problems):
            print(f"{name}: OK")
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


def remove_image(cfg: Config, args: argparse.Namespace) -> int:
    # lazy: the catalog brings the image store (see _store)
    from .. import catalog

    with _store(cfg).lock():
        for line in catalog.remove_image(open_node(cfg), args.name):
            print(line)
    return 0


IMPORT = Command("import", "copy a disk image into the image store (sha256 recorded)",
                 configured(import_image), _import_arguments)
LIST = Command("list", "list images", configured(list_images), _json_argument)
VERIFY = Command("verify", "re-hash images and report mismatches", configured(verify_images),
                 _verify_arguments)
REMOVE = Command("remove", "remove an image (refused while a lease uses it)",
                 configured(remove_image), _name_argument)


# -- sync, publish, unpublish -----------------------------------------------------------------
def _sync_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("catalog", help="the catalog directory (holds images.yaml)")
    parser.add_argument("--dry-run", action="store_true", help="say what would be done")
    parser.add_argument("--splay", type=float, default=0.0, metavar="SECONDS",
                        help="wait a random time up to SECONDS first (many nodes' cron runs)")


def sync_catalog(cfg: Config, args: argparse.Namespace) -> int:
    # lazy: the catalog brings the image store (see _store)
    from .. import catalog

    directory = Path(args.catalog)
    catalog.wait_splay(args.splay)
    report = catalog.sync_with_lock(open_node(cfg), directory, dry_run=args.dry_run)
    if report is None:
        print("another 'images sync' or import is running on this node; this run did nothing "
              "(the next one catches up)")
        return 0
    for line in report.done:  # problems and warnings went to stderr and syslog as logged
        print(line)
    print(f"{directory}: {len(report.done)} change(s), {report.unchanged} image(s) unchanged, "
          f"{len(report.problems)} problem(s)")
    return 1 if report.problems else 0


def _publish_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name")
    parser.add_argument("catalog")


def publish_image(cfg: Config, args: argparse.Namespace) -> int:
    # lazy: the catalog brings the image store (see _store)
    from .. import catalog

    print(catalog.publish(_store(cfg), args.name, Path(args.catalog)))
    return 0


def unpublish_image(cfg: Config, args: argparse.Namespace) -> int:
    # lazy: the catalog brings the image store (see _store)
    from .. import catalog

    print(catalog.unpublish(args.name, Path(args.catalog)))
    return 0


SYNC = Command("sync", "import new and changed images from a catalog on a shared file system, "
               "remove those that left it (cron-safe)", configured(sync_catalog), _sync_arguments)
PUBLISH = Command("publish", "put a local image into a catalog directory",
                  configured(publish_image), _publish_arguments)
UNPUBLISH = Command("unpublish", "take an image out of a catalog directory",
                    configured(unpublish_image), _publish_arguments)


# -- check ------------------------------------------------------------------------------------
def _check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name")
    parser.add_argument("--user", help="pool account to test logging in as (default: first "
                        "account of the image's VO)")
    parser.add_argument("--json", action="store_true")


def check_image(cfg: Config, args: argparse.Namespace) -> int:
    # lazy: the check boots a VM (the node's whole machinery); the SGE adapter only says where
    # the admin's cell keeps its settings
    from ..batch.sge_spool import sge_settings_path
    from ..imagecheck import check_image as boot_and_check

    settings = sge_settings_path(os.environ)  # the admin's SGE_ROOT/SGE_CELL, if any
    return boot_and_check(cfg, args.name, args.user, json_output=args.json,
                          batch_files=(settings,) if settings else ())


CHECK = Command("check", "boot an image once and report which guest requirements it meets",
                configured(check_image), _check_arguments)

IMAGES = Group("images", "manage golden images",
               (IMPORT, LIST, VERIFY, REMOVE, SYNC, PUBLISH, UNPUBLISH, CHECK))
