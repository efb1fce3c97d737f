"""What a command of `vmimagemanager` is: a name, its arguments and its handler, registered
together; `Group` is a command of actions (`images import`, `sge install-queue`).

Handlers import the subsystem they drive inside themselves when it is heavy (the node's
life cycle, the image store, the batch adapters): one command never pays for another's modules,
and `--help` or `config import-legacy` start without any of them.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import Config, load_config

if TYPE_CHECKING:
    from ..node import Node

Handler = Callable[[argparse.Namespace, str], int]
"""Runs a parsed command line, given the configuration file's path; returns the exit code."""
ConfigHandler = Callable[[Config, argparse.Namespace], int]
"""Runs a parsed command line with the node's validated configuration."""
Arguments = Callable[[argparse.ArgumentParser], None]
"""Adds a command's options and positional arguments to its parser."""


def no_arguments(parser: argparse.ArgumentParser) -> None:
    """A command that takes nothing but --help."""


def configured(handler: ConfigHandler) -> Handler:
    """`handler` run with the configuration loaded and validated (every command but the set-up
    ones, which read it themselves or need none)."""

    def run(args: argparse.Namespace, path: str) -> int:
        return handler(load_config(path), args)

    return run


def open_node(cfg: Config) -> Node:
    """The node as the commands drive it: libvirt at cfg.libvirt_uri and the leases database."""
    # lazy: the life cycle brings the hypervisor, leases, images and seed modules, which
    # --help, the set-up commands and the read-only reports never need
    from ..node import open_node as open_life_cycle

    return open_life_cycle(cfg)


@dataclass(frozen=True)
class Command:
    """`vmimagemanager NAME` (or one of `aliases`) with `arguments`, run by `run`."""

    name: str
    help: str
    run: Handler
    arguments: Arguments = no_arguments
    aliases: tuple[str, ...] = ()

    def register(self, commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
        parser = commands.add_parser(self.name, help=self.help, aliases=list(self.aliases))
        self.arguments(parser)
        parser.set_defaults(run=self.run)


@dataclass(frozen=True)
class Group:
    """`vmimagemanager NAME ACTION ...`: the action (one of `actions`) is required; its name is
    the parsed arguments' NAME_command."""

    name: str
    help: str
    actions: tuple[Command, ...]
    metavar: str | None = "ACTION"

    def register(self, commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
        parser = commands.add_parser(self.name, help=self.help)
        actions = parser.add_subparsers(dest=f"{self.name}_command", required=True,
                                        metavar=self.metavar)
        for action in self.actions:
            action.register(actions)
