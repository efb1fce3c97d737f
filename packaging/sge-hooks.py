"""Write the SGE hook wrappers a package ships (prolog, starter, epilog) into DIR.

Usage (from the source tree, at package build time):
    python3 packaging/sge-hooks.py DIR [BINDIR] [PYTHON] [CONFIG] [BUSYBOX]

They are what `vmimagemanager sge install-queue` writes on a node where the package put the
hooks in BINDIR (/usr/bin) for PYTHON (/usr/bin/python3), the configuration at CONFIG
(/etc/vmimagemanager/vmimagemanager.yaml) and the static BusyBox the package depends on at
BUSYBOX (/bin/busybox: Debian's busybox-static): the same generator, so the two never differ.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vmimagemanager.batch.sge_queue import hook_script  # noqa: E402
from vmimagemanager.batch.wrappers import DEFAULT_STATIC_SHELL  # noqa: E402
from vmimagemanager.config import DEFAULT_CONFIG_PATH  # noqa: E402


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 5:
        print(__doc__, file=sys.stderr)
        return 2
    directory = Path(argv[0])
    bindir = argv[1] if len(argv) > 1 else "/usr/bin"
    python = argv[2] if len(argv) > 2 else "/usr/bin/python3"
    config = argv[3] if len(argv) > 3 else DEFAULT_CONFIG_PATH
    busybox = argv[4] if len(argv) > 4 else DEFAULT_STATIC_SHELL
    directory.mkdir(parents=True, exist_ok=True)
    for hook in ("prolog", "starter", "epilog"):
        path = directory / hook
        path.write_text(hook_script(hook, f"{bindir}/vmim-sge-{hook}", config, python,
                                    shell=busybox))
        os.chmod(path, 0o755)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
