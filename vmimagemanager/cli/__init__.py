"""`vmimagemanager`: the admin command line (run as root on a worker node).

Each command is a `Command` (or a `Group` of actions) defined next to its handler, in the module
of its subject: slots.py, images.py, report.py, node_setup.py. COMMANDS is the order --help
lists them in; the parsed command line carries its handler (`run`), so nothing dispatches by
name.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..config import config_path
from ..errors import VmimError
from ..logsetup import setup_logging
from . import images, node_setup, report, slots, snapshots
from .command import Command, Group

COMMANDS: tuple[Command | Group, ...] = (
    slots.SLOTS, slots.SPARES, slots.AGENT, report.HEALTH, report.HISTORY, report.METRICS,
    images.IMAGES, snapshots.SNAPSHOTS,
    slots.UP, slots.DOWN, slots.KILL, slots.STORE, slots.RECONCILE, report.PRINT_CONFIG,
    node_setup.ADMIN_KEY, node_setup.CONFIG, slots.EXEC, node_setup.SGE, node_setup.SLURM,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmimagemanager",
        description="Run each batch job in its own freshly booted VM: manage slots and images.")
    parser.add_argument("--config", help="configuration file (default: $VMIM_CONFIG, then "
                        "/etc/vmimagemanager/vmimagemanager.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    ours, guest_command = slots.split_guest_command(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(ours)
    args.guest_command = guest_command  # exec's command, after its '--'
    setup_logging("vmimagemanager", verbose=args.verbose)
    path = config_path(args.config)
    try:
        return args.run(args, path)
    except VmimError as exc:
        print(f"vmimagemanager: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vmimagemanager: interrupted", file=sys.stderr)
        return 130
