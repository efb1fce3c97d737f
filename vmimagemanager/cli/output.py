"""How the commands show things: aligned tables on stdout, progress on a terminal's stderr."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence

Progress = Callable[[int, int], None]
"""Called with (bytes done, bytes in all)."""


def table(rows: Sequence[Mapping[str, object]], columns: Sequence[str]) -> str:
    """`rows` as text columns headed by the upper-cased column names."""
    widths = {c: max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in columns}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns)]
    for row in rows:
        lines.append("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))
    return "\n".join(line.rstrip() for line in lines)


def progress_bar(label: str) -> Progress | None:
    """A bar redrawn on stderr at most five times a second; None when stderr is no terminal."""
    last = [0.0]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - last[0] < 0.2:
            return
        last[0] = now
        pct = 100 * done // total if total else 100
        bar = "#" * (pct // 4)
        sys.stderr.write(f"\r{label} [{bar:<25}] {pct:3d}% {done >> 20}/{total >> 20} MiB")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return report if sys.stderr.isatty() else None
