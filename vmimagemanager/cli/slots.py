"""The slots' commands: slots (status), spares, agent, up (restore), down, kill, store,
reconcile, exec."""

from __future__ import annotations

import argparse
import collections
import json
import logging
import shlex
import socket
import sys
import time
from typing import TYPE_CHECKING

from ..config import Config
from ..errors import VmimError
from ..logsetup import setup_logging
from .command import Command, configured, open_node
from .output import table

if TYPE_CHECKING:
    from ..leases import Lease
    from ..node import Node

SLOT_COLUMNS = ["slot", "state", "job", "owner", "vo", "image", "cores", "memory_mib", "domain",
                "ssh", "since"]


# -- slots (status) ---------------------------------------------------------------------------
def _slots_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--watch", type=float, nargs="?", const=2.0, metavar="SECONDS",
                        help="redraw the table every SECONDS (2) until Ctrl-C")


def show_slots(cfg: Config, args: argparse.Namespace) -> int:
    life = open_node(cfg)
    if args.watch is not None:
        return _watch_slots(life, args.watch)
    rows = life.status()
    print(json.dumps(rows, indent=2) if args.json else table(rows, SLOT_COLUMNS))
    return 0


def _watch_slots(life: Node, interval: float) -> int:
    """The slot table, redrawn every `interval` seconds from the leases database and libvirt
    until Ctrl-C; on a terminal the screen is cleared each time, else frames follow each other."""
    clear = "\033[H\033[2J" if sys.stdout.isatty() else ""
    try:
        while True:
            rows = life.status()
            states = collections.Counter(str(row["state"]) for row in rows)
            summary = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
            print(f"{clear}vmimagemanager slots on {socket.gethostname()} at "
                  f"{time.strftime('%H:%M:%S')} ({summary}; every {interval:g} s, Ctrl-C ends)\n"
                  f"{table(rows, SLOT_COLUMNS)}\n", flush=True)
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0


SLOTS = Command("slots", "show every slot: state, job, image, domain", configured(show_slots),
                _slots_arguments, aliases=("status",))


# -- spares -----------------------------------------------------------------------------------
def _spares_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--retire", action="store_true", help="destroy every idle spare first "
                        "(stop the agent before, or it boots new ones)")


def show_spares(cfg: Config, args: argparse.Namespace) -> int:
    """Warm spares: the idle ones and those being booted, with their age."""
    life = open_node(cfg)
    if args.retire:
        while slot := life.retire_spare():
            print(f"retired the idle spare in slot {slot}")
    rows = [row for row in life.status() if row["spare"]]
    wanted = [{"image": image, "cores": shape.cores, "memory_mib": shape.memory_mib,
               "count": n, "ready": sum(1 for r in rows if r["image"] == image
                                        and r["state"] == "spare" and r["cores"] == shape.cores
                                        and r["memory_mib"] == shape.memory_mib)}
              for image, shape, n in cfg.spares.counts]
    if args.json:
        print(json.dumps({"configured": wanted, "max_age": cfg.spares.max_age,
                          "spares": rows}, indent=2))
        return 0
    print(table(rows, ["slot", "state", "job", "image", "vo", "cores", "memory_mib", "domain",
                       "age_s"]))
    print("configured: " + (", ".join(f"{w['image']} ({w['cores']} cores, {w['memory_mib']} "
                                      f"MiB) {w['ready']}/{w['count']} ready" for w in wanted)
                            or "no spares (spares: in the configuration)"))
    return 0


SPARES = Command("spares", "show the warm spares (idle VMs booted ahead of jobs)",
                 configured(show_spares), _spares_arguments)


# -- agent ------------------------------------------------------------------------------------
def _agent_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--once", action="store_true",
                        help="one round, then exit (cron, tests)")
    parser.add_argument("--interval", type=float, help="seconds between rounds (default: "
                        "spares.interval, 5)")


def run_agent(cfg: Config, args: argparse.Namespace) -> int:
    # lazy: the agent's loop and its thread pool serve this long-running command only
    from ..agent import run
    from ..batch import service
    from ..node.state import ensure_admin_key
    from ..rootenv import become_clean

    # a long-lived root process: whatever shell started it, its children (ssh, qemu-img,
    # ssh-keygen, genisoimage, qstat) get the allow-list environment only (docs/security.md)
    become_clean()
    ensure_admin_key(cfg)  # spares log in as root: the key is made here, never by a hook
    setup_logging("vmimagemanager-agent", verbose=args.verbose, stderr_level=logging.INFO)
    return run(open_node(cfg), lambda: open_node(cfg), once=args.once, interval=args.interval,
               scheduling=service)


AGENT = Command("agent", "keep warm spares ready and heal the node (long-running)",
                configured(run_agent), _agent_arguments)


# -- up (restore), down, kill, store ----------------------------------------------------------
def _up_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("slot")
    parser.add_argument("--image", required=True)


def boot_for_admin(cfg: Config, args: argparse.Namespace) -> int:
    # lazy: JobRequest and the admin key live with the life cycle (see open_node)
    from ..node import JobRequest
    from ..node.state import ensure_admin_key

    cfg.slot(args.slot)
    ensure_admin_key(cfg)
    life = open_node(cfg)
    label_job = "admin-" + args.slot.replace(".", "-")
    started = life.start_vm(JobRequest(job_id=label_job, task_id="0", owner="root",
                                          image=args.image, vo="admin"), slots=[args.slot])
    lease, ctx = started.lease, started.context
    print(f"slot {lease.slot}: {args.image} running as {cfg.slot(args.slot).domain_name}, "
          f"ssh root@{ctx.host} -p {ctx.port}")
    return 0


UP = Command("up", "boot IMAGE in SLOT for an admin (alias: restore)", configured(boot_for_admin),
             _up_arguments, aliases=("restore",))


def _slot_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("slot")


def _end_vm(cfg: Config, slot: str, graceful: bool) -> int:
    life = open_node(cfg)
    if life.end_vm(cfg.slot(slot).name, graceful=graceful):
        print(f"slot {slot}: VM stopped and lease released")
    else:
        print(f"slot {slot}: already free")
    return 0


def shut_down(cfg: Config, args: argparse.Namespace) -> int:
    return _end_vm(cfg, args.slot, graceful=True)


def kill(cfg: Config, args: argparse.Namespace) -> int:
    return _end_vm(cfg, args.slot, graceful=False)


DOWN = Command("down", "shut the slot's VM down (graceful, then destroy), release",
               configured(shut_down), _slot_argument)
KILL = Command("kill", "destroy the slot's VM at once and release the slot", configured(kill),
               _slot_argument)


def _store_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("slot")
    parser.add_argument("name")


def store_slot(cfg: Config, args: argparse.Namespace) -> int:
    open_node(cfg).store_slot(cfg.slot(args.slot).name, args.name)
    print(f"slot {args.slot}: disk saved as image {args.name}; slot released")
    return 0


STORE = Command("store", "save a slot's current disk as a new image NAME", configured(store_slot),
                _store_arguments)


# -- reconcile --------------------------------------------------------------------------------
def _reconcile_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="only say what would be done")
    parser.add_argument("--rebuild", action="store_true", help="move the leases database aside "
                        "(kept in state_dir) and rebuild it from the domains libvirt runs")


def reconcile(cfg: Config, args: argparse.Namespace) -> int:
    life = open_node(cfg)
    if args.rebuild and not args.dry_run:
        # lazy: the lifecycle (node.rebuild with it) is loaded by open_node, not at the CLI's start
        from ..node.rebuild import rebuild_leases

        life.leases.close()
        life.leases = rebuild_leases(cfg, life.hv, None, "asked by 'reconcile --rebuild'",
                                     force=True)
    actions = life.reconcile(dry_run=args.dry_run)
    prefix = "would " if args.dry_run else ""
    for action in actions:
        print(prefix + action)
    if not actions:
        print("nothing to do: leases, domains and files agree")
    if not args.dry_run:
        # lazy: the metrics' collectors are needed only after a real reconcile
        from ..metrics import observe

        observe(cfg)  # the reconcile timer keeps the metrics' gauges fresh
    return 0


RECONCILE = Command("reconcile", "compare leases, domains and files; remove orphans",
                    configured(reconcile), _reconcile_arguments)


# -- exec -------------------------------------------------------------------------------------
def split_guest_command(argv: list[str]) -> tuple[list[str], list[str]]:
    """(our arguments, the guest's command): everything after the '--' following `exec` is the
    command to run in the VM, never options of ours."""
    if "exec" in argv and "--" in argv[argv.index("exec"):]:
        cut = argv.index("--", argv.index("exec"))
        return argv[:cut], argv[cut + 1:]
    return argv, []


def _exec_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("slot")
    parser.add_argument("--user", help="run as this account in the guest")
    parser.add_argument("cmd", nargs="*", help="-- COMMAND [ARG...]")


def exec_in_guest(cfg: Config, args: argparse.Namespace) -> int:
    # lazy: the ssh session is exec's alone
    from ..guest import connect

    slot = cfg.slot(args.slot)
    life = open_node(cfg)
    lease = life.leases.get(slot.name)
    if lease is None or not life.hv.is_running(slot.domain_name):
        raise VmimError(f"slot {slot.name} has no running VM; start one with "
                        f"'vmimagemanager up {slot.name} --image NAME'")
    session = connect(life.admin_login(slot, _guest_host_key(life, slot, lease)))
    try:
        command = _guest_command(args)
        return session.run(command, {}, None, stdin_fd=0 if not sys.stdin.isatty() else None)
    finally:
        session.close()


def _guest_host_key(life, slot, lease: Lease) -> str:
    """The VM's ssh host key: from the job's context in root's directory, or an idle spare's
    (a spare has no job context)."""
    # lazy: job contexts and the spares' host keys matter to exec only
    from ..context import read_root_context
    from ..node.spares import idle_host_key

    if lease.is_spare:
        return idle_host_key(life, slot, lease)
    return read_root_context(life.cfg.run_dir, lease.job_label).host_key


def _guest_command(args: argparse.Namespace) -> list[str]:
    command = [*args.cmd, *args.guest_command]
    if not command:
        raise VmimError("nothing to run: give a command after '--'")
    if args.user and args.user != "root":
        command = ["su", "-s", "/bin/sh", args.user, "-c", shlex.join(command)]
    return command


EXEC = Command("exec", "run a command in a slot's VM (as root, or --user)",
               configured(exec_in_guest), _exec_arguments)
