"""Setting a node up: admin-key, config import-legacy, sge install-queue, slurm install-hooks.

The batch systems' set-up reads the configuration file itself (`install-queue` writes its path
into the hook wrappers), and `config import-legacy` needs none: their handlers get the path."""

from __future__ import annotations

import argparse
import sys

from ..config import Config
from ..errors import VmimError
from .command import Command, Group, configured


# -- admin-key --------------------------------------------------------------------------------
def admin_key(cfg: Config, args: argparse.Namespace) -> int:
    # lazy: the admin key lives with the life cycle (see command.open_node)
    from ..node.state import admin_key as public_key
    from ..node.state import ensure_admin_key

    path = ensure_admin_key(cfg)
    print(f"{path}: {public_key(cfg)[1]}")
    return 0


ADMIN_KEY = Command("admin-key", "make this node's admin key (root's login to its guests) if "
                    "there is none, and print it", configured(admin_key))


# -- config import-legacy ---------------------------------------------------------------------
def _import_legacy_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file")


def import_legacy(args: argparse.Namespace, config_path: str) -> int:
    # lazy: the INI reader (configparser) serves this one-off conversion only
    from ..legacy import convert

    try:
        with open(args.file, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise VmimError(f"cannot read {args.file}: {exc}") from None
    converted, warnings = convert(text, args.file)
    for line in warnings:
        print(f"vmimagemanager: {line}", file=sys.stderr)
    print(converted, end="")
    return 0


CONFIG = Group("config", "configuration tools (needs no configuration file)", (
    Command("import-legacy", "print the original vmimagemanager's INI configuration as this "
            "tool's YAML (warnings on stderr)", import_legacy, _import_legacy_arguments),
), metavar=None)


# -- sge install-queue ------------------------------------------------------------------------
def _install_queue_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--queue", default="vm.q")
    parser.add_argument("--hosts", nargs="+", help="execution hosts (default: this host)")
    parser.add_argument("--wrapper-dir", default="/usr/local/libexec/vmimagemanager",
                        help="where the root-owned hook wrappers are written")
    parser.add_argument("--slots", type=int,
                        help="job slots per host (default: the node's cores for VMs, node.cores)")
    parser.add_argument("--pe", default="smp", metavar="NAME",
                        help="the parallel environment multicore jobs ask for (qsub -pe NAME N), "
                        "made with allocation_rule $pe_slots if missing; 'none': no PE")
    parser.add_argument("--h-vmem", action="store_true",
                        help="make h_vmem a consumable with each host's VM memory, so that "
                        "SGE schedules memory as the node gives it (docs/job-shapes.md)")


def install_queue(args: argparse.Namespace, config_path: str) -> int:
    # lazy: the SGE adapter and its wrappers (and the life cycle they check) serve this only
    from ..batch.sge_queue import install_queue as configure_queue

    return configure_queue(config_path, args)


SGE = Group("sge", "gridengine set-up", (
    Command("install-queue", "configure a VM queue with qconf", install_queue,
            _install_queue_arguments),
))


# -- slurm install-hooks ----------------------------------------------------------------------
def _install_hooks_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", default="/etc/slurm/vmimagemanager",
                        help="where the root-owned wrappers and the plugin are written")
    parser.add_argument("--plugstack", default="/etc/slurm/plugstack.conf.d/vmimagemanager.conf",
                        help="the plugstack.conf include that loads the plugin")


def install_hooks(args: argparse.Namespace, config_path: str) -> int:
    # lazy: the Slurm adapter and its wrappers (and the life cycle they check) serve this only
    from ..batch.slurm_setup import install_hooks as write_hooks

    return write_hooks(config_path, args)


SLURM = Group("slurm", "Slurm set-up", (
    Command("install-hooks", "write this node's Prolog/Epilog wrappers and SPANK plugin (every "
            "job of the node runs in a VM)", install_hooks, _install_hooks_arguments),
))
