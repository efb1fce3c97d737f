"""Where a node's time goes, slot by slot: the leases sampled while jobs run, drawn as a PNG.

One row per slot; each job's lease is a bar coloured by its state: preparing + booting (the
prolog's cold boot; "restoring" where the caller marks a start from a snapshot), spare and
binding (warm spares), running (the payload, from ssh answering to the epilog), tearing-down
(the detached destroy); white is a free slot. A thin grey line marks every minute. The PNG is
written with zlib alone (no plotting library on the nodes).
"""

from __future__ import annotations

import struct
import threading
import time
import zlib
from pathlib import Path

COLOURS = {
    "preparing": (240, 160, 40), "booting": (240, 160, 40),  # orange: boot
    "restoring": (40, 190, 190),                                # teal: from a snapshot
    "spare": (150, 190, 230), "binding": (60, 110, 200),      # light blue / blue: warm spare
    "running": (60, 170, 80),                                   # green: the payload
    "tearing-down": (200, 60, 60), "failed": (120, 0, 120),    # red: teardown; purple: failed
}
ROW, GAP, MARGIN = 24, 6, 10


class LeaseSampler:
    """Reads the leases every `interval` seconds in a thread; `segments()` once stopped."""

    def __init__(self, leases_db: Path, interval: float = 0.2):
        self.leases_db = leases_db
        self.interval = interval
        self.samples: list[tuple[float, dict[str, tuple[str, str]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.started = time.monotonic()

    def __enter__(self) -> LeaseSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        from vmimagemanager.leases import LeaseStore

        store = LeaseStore(self.leases_db)
        while not self._stop.is_set():
            now = time.monotonic() - self.started
            self.samples.append((now, {lease.slot: (lease.job_label, str(lease.state))
                                       for lease in store.all()}))
            self._stop.wait(self.interval)

    def segments(self) -> list[dict]:
        """Per slot, runs of equal (job, state): {slot, job, state, start, end} in seconds."""
        open_: dict[str, dict] = {}
        done: list[dict] = []
        for t, leases in self.samples:
            for slot in set(open_) | set(leases):
                seg = open_.get(slot)
                now = leases.get(slot)
                if seg is not None and (now is None or (seg["job"], seg["state"]) != now):
                    done.append(open_.pop(slot))
                    seg = None
                if now is not None:
                    if seg is None:
                        open_[slot] = seg = {"slot": slot, "job": now[0], "state": now[1],
                                             "start": t, "end": t}
                    seg["end"] = t + self.interval
        return sorted(done + list(open_.values()), key=lambda s: (s["slot"], s["start"]))


def write_png(path: Path, segments: list[dict], width: int = 1600) -> None:
    slots = sorted({s["slot"] for s in segments})
    total = max((s["end"] for s in segments), default=1.0)
    scale = (width - 2 * MARGIN) / total
    height = 2 * MARGIN + len(slots) * (ROW + GAP)
    pixels = bytearray(b"\xff" * (width * height * 3))

    def box(x0: int, y0: int, x1: int, y1: int, colour: tuple[int, int, int]) -> None:
        for y in range(max(0, y0), min(height, y1)):
            row = y * width * 3
            for x in range(max(0, x0), min(width, x1)):
                pixels[row + 3 * x:row + 3 * x + 3] = bytes(colour)

    for minute in range(1, int(total // 60) + 1):
        x = MARGIN + int(minute * 60 * scale)
        box(x, 0, x + 1, height, (200, 200, 200))
    for seg in segments:
        y = MARGIN + slots.index(seg["slot"]) * (ROW + GAP)
        x0 = MARGIN + int(seg["start"] * scale)
        x1 = max(x0 + 1, MARGIN + int(seg["end"] * scale) - 1)  # a 1 px gap between jobs
        box(x0, y, x1, y + ROW, COLOURS.get(seg["state"], (0, 0, 0)))
    path.write_bytes(png(width, height, bytes(pixels)))


def png(width: int, height: int, rgb: bytes) -> bytes:
    """An 8-bit RGB PNG (filter 0 on every scanline)."""
    stride = width * 3
    raw = b"".join(b"\0" + rgb[y * stride:(y + 1) * stride] for y in range(height))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
