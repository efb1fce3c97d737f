"""The agent's part for memory snapshots (snapshot_starts; docs/snapshots.md).

Each round the agent makes the snapshots that are missing or outdated: one for each image and
shape it keeps spares of (the spares are then restored from it), and one for each a job found
none of (snapshots.want). A snapshot is made in a free place, like a spare, with the same
limits: never more boots at once than the agent's `parallel`, never what a job holds.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .audit import record
from .errors import ImageError, NoFreeSlot
from .keysfiles import image_key
from .node.snapshots import (
    MAX_PER_IMAGE,
    Snapshot,
    all_snapshots,
    refused,
    unwant,
    usable,
    wanted,
)
from .shape import Shape

if TYPE_CHECKING:
    from .leases import Lease
    from .node import Node

log = logging.getLogger("vmimagemanager.agent")

Kind = tuple[str, Shape]  # image, shape
BACKOFF_FIRST, BACKOFF_MAX = 60.0, 3600.0  # seconds before a failed kind is tried again


def back_off(backoff: dict[Kind, tuple[float, float]], kind: Kind, first: float,
             most: float) -> float:
    """Note in `backoff` that `kind` failed again: its next try after twice the last delay
    (at least `first`, at most `most`); that delay."""
    delay = min(max(first, 2 * backoff.get(kind, (0, 0))[1]), most)
    backoff[kind] = (time.monotonic() + delay, delay)
    return delay


@dataclass
class SnapshotMaker:
    """`make_life` gives each snapshot's boot a life cycle of its own (as the agent's spares)."""

    make_life: Callable[[], Node]
    # the agent's: a boot thread learns which lease it works on, and forgets it when done
    working: Callable[[Lease | None], None] = lambda lease: None
    making: dict[Future, Kind] = field(default_factory=dict)
    backoff: dict[Kind, tuple[float, float]] = field(default_factory=dict)

    def kinds(self, life: Node) -> list[Kind]:
        """The images and shapes the node should have a usable snapshot of."""
        found: list[Kind] = []
        for image, shape, _count in life.cfg.spares.counts:
            if (image, shape) not in found:
                found.append((image, shape))
        for kind in wanted(life.cfg):
            if kind not in found:
                found.append(kind)
        return found

    def missing(self, life: Node) -> list[Kind]:
        """Kinds without a usable snapshot that may be made now (not being made, not backed
        off, their image present and not refused). A shape only jobs asked for (any job may
        ask for any memory) only while its image has fewer than MAX_PER_IMAGE snapshots, and
        none while overlay_dir would keep less than health.min_free_mib free."""
        cfg = life.cfg
        out, no_snapshots = [], refused(cfg)
        spare_kinds = {(image, shape) for image, shape, _count in cfg.spares.counts}
        per_image: dict[str, int] = {}
        for snap in all_snapshots(cfg):
            per_image[snap.image] = per_image.get(snap.image, 0) + 1
        free_mib = shutil.disk_usage(cfg.overlay_dir).free / 2**20
        for image_name, shape in self.kinds(life):
            kind = (image_name, shape)
            if kind in self.making.values() or time.monotonic() < self.backoff.get(
                    kind, (0.0, 0.0))[0]:
                continue
            try:
                image = life.images.get(image_name)
            except ImageError:
                unwant(life.cfg, image_name, shape)  # the image is gone
                continue
            if image_key(image.sha256) in no_snapshots:
                continue
            if usable(life, image, shape) is not None:
                continue
            if kind not in spare_kinds and per_image.get(image_name, 0) >= MAX_PER_IMAGE:
                continue
            if free_mib - shape.memory_mib < cfg.health.min_free_mib:
                log.warning("agent: no snapshot of %s (%s): overlay_dir %s would keep less than "
                            "health.min_free_mib free", image_name, shape, cfg.overlay_dir)
                continue
            per_image[image_name] = per_image.get(image_name, 0) + 1
            free_mib -= shape.memory_mib
            out.append(kind)
        return out

    def start(self, life: Node, submit: Callable[[Callable[[], Snapshot]], Future],
              room: Callable[[Shape], bool]) -> None:
        """Start making the missing snapshots `room` says there is room for (`submit` runs
        the work on the agent's pool)."""
        for image, shape in self.missing(life):
            if not room(shape):
                return
            self.making[submit(lambda i=image, s=shape: self._make(i, s))] = (image, shape)

    def busy(self, kind: Kind) -> bool:
        return kind in self.making.values()

    def _make(self, image: str, shape: Shape) -> Snapshot:
        from .node.restore import make_snapshot

        life = self.make_life()
        vo = next((rule.name for rule in life.cfg.vos if rule.image == image), "")
        try:
            snap = make_snapshot(life, image, vo, shape, self.working)
        except NoFreeSlot:
            raise
        except Exception as exc:
            record(life.cfg, "snapshot", outcome="failed", image=image, cores=shape.cores,
                   memory_mib=shape.memory_mib, reason=str(exc))
            raise
        else:
            record(life.cfg, "snapshot", outcome="ready", image=image, cores=shape.cores,
                   memory_mib=shape.memory_mib, **snap.sizes_mib(),
                   phases={k: round(v, 3) for k, v in life.phase.seconds.items()})
            return snap
        finally:
            self.working(None)
            life.leases.close()
            life.hv.close()

    def collect(self) -> list[str]:
        actions = []
        for future in [f for f in self.making if f.done()]:
            kind = self.making.pop(future)
            image, shape = kind
            exc = future.exception()
            if exc is None:
                self.backoff.pop(kind, None)
                sizes = future.result().sizes_mib()
                actions.append(f"snapshot of {image} ({shape}) made: {sizes['memory_mib']} MiB "
                               f"of memory, {sizes['disk_mib']} MiB of disk")
            elif not isinstance(exc, NoFreeSlot):
                delay = back_off(self.backoff, kind, BACKOFF_FIRST, BACKOFF_MAX)
                actions.append(f"snapshot of {image} ({shape}) failed, next try in "
                               f"{delay:.0f} s: {exc}")
        return actions

    def wait(self) -> list[str]:
        for future in list(self.making):
            future.exception()
        return self.collect()
