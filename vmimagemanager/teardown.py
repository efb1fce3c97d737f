"""The epilog's detached teardown: `python -I -m vmimagemanager.teardown CONFIG SLOT LABEL`.

A fresh interpreter (never a forked copy of the epilog: SQLite's locks and shared memory must
not be carried across fork), started by flow.end_job in a session of its own and without the
job's groups, so execd's end-of-job kill does not reach it. It destroys the VM of job LABEL in
SLOT, removes its files and frees the slot (Node.end_vm: every step tried; the VM's usage
was recorded by the epilog before). If it dies, the lease names it, and reconcile finishes.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from .jobs import check_label
    from .logsetup import setup_logging

    setup_logging("vmimagemanager-teardown")
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 3:
        print("usage: python -m vmimagemanager.teardown CONFIG SLOT LABEL", file=sys.stderr)
        return 2
    config, slot, label = args
    import logging

    from .config import load_config
    from .errors import VmimError
    from .node import open_node

    try:
        cfg = load_config(config)
        open_node(cfg).end_vm(
            cfg.slot(slot).name, job_label=check_label(label), account=False)
    except VmimError as exc:
        logging.getLogger("vmimagemanager.teardown").error(
            "job %s slot %s: teardown incomplete (%s); reconcile finishes it", label, slot, exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
