"""`vmimagemanager`: the admin command line (run as root on a worker node)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .config import Config, config_path, load_config
from .errors import VmimError
from .logsetup import setup_logging

log = logging.getLogger("vmimagemanager.cli")


def _life(cfg: Config):
    from .lifecycle import open_node

    return open_node(cfg)


def _table(rows: list[dict[str, object]], columns: list[str]) -> str:
    widths = {c: max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in columns}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns)]
    for row in rows:
        lines.append("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))
    return "\n".join(line.rstrip() for line in lines)


def _progress_bar(label: str):
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


# -- commands ---------------------------------------------------------------------------------
SLOT_COLUMNS = ["slot", "state", "job", "owner", "vo", "image", "domain", "ssh", "since"]


def cmd_slots(cfg: Config, args) -> int:
    life = _life(cfg)
    if args.watch is not None:
        return _watch_slots(life, args.watch)
    rows = life.status()
    print(json.dumps(rows, indent=2) if args.json else _table(rows, SLOT_COLUMNS))
    return 0


def _watch_slots(life, interval: float) -> int:
    """The slot table, redrawn every `interval` seconds from the leases database and libvirt
    until Ctrl-C; on a terminal the screen is cleared each time, else frames follow each other."""
    import collections
    import socket

    clear = "\033[H\033[2J" if sys.stdout.isatty() else ""
    try:
        while True:
            rows = life.status()
            states = collections.Counter(str(row["state"]) for row in rows)
            summary = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
            print(f"{clear}vmimagemanager slots on {socket.gethostname()} at "
                  f"{time.strftime('%H:%M:%S')} ({summary}; every {interval:g} s, Ctrl-C ends)\n"
                  f"{_table(rows, SLOT_COLUMNS)}\n", flush=True)
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0


def cmd_spares(cfg: Config, args) -> int:
    """Warm spares: the idle ones and those being booted, with their age."""
    life = _life(cfg)
    if args.retire:
        while slot := life.retire_spare():
            print(f"retired the idle spare in slot {slot}")
    rows = [row for row in life.status() if row["spare"]]
    wanted = dict(cfg.spares.counts)
    if args.json:
        print(json.dumps({"configured": wanted, "max_age": cfg.spares.max_age,
                          "spares": rows}, indent=2))
        return 0
    print(_table(rows, ["slot", "state", "job", "image", "vo", "domain", "age_s"]))
    have = {image: sum(1 for r in rows if r["image"] == image and r["state"] == "spare")
            for image in wanted}
    print("configured: " + (", ".join(f"{image} {have[image]}/{n} ready"
                                      for image, n in sorted(wanted.items()))
                            or "no spares (spares: in the configuration)"))
    return 0


def cmd_agent(cfg: Config, args) -> int:
    from .agent import run
    from .lifecycle import ensure_admin_key

    ensure_admin_key(cfg)  # spares log in as root: the key is made here, never by a hook
    setup_logging("vmimagemanager-agent", verbose=args.verbose, stderr_level=logging.INFO)
    return run(_life(cfg), lambda: _life(cfg), once=args.once, interval=args.interval)


def cmd_images(cfg: Config, args) -> int:
    from .images import ImageStore

    store = ImageStore(cfg.image_dir)
    if args.images_command == "import":
        with store.lock():
            image = store.import_image(args.name, Path(args.file),
                                       kernel=Path(args.kernel) if args.kernel else None,
                                       initrd=Path(args.initrd) if args.initrd else None,
                                       cmdline=args.cmdline,
                                       progress=_progress_bar(f"importing {args.name}"))
        print(f"imported {image.name}: {image.disk} ({image.format}) "
              f"sha256 {image.sha256[image.disk][:16]}...")
        return 0
    if args.images_command == "list":
        rows = []
        for image in store.list():
            size = (cfg.image_dir / image.disk).stat().st_size
            rows.append({"name": image.name, "format": image.format,
                         "size_mib": size >> 20, "boot": "kernel" if image.kernel else "disk",
                         "sha256": image.sha256.get(image.disk, "")[:16],
                         "catalog": image.catalog,
                         "imported": time.strftime("%Y-%m-%d %H:%M",
                                                   time.localtime(image.imported_at))})
        print(json.dumps(rows, indent=2) if args.json else
              _table(rows, ["name", "format", "size_mib", "boot", "sha256", "imported"]))
        return 0
    if args.images_command == "verify":
        names = args.names or [image.name for image in store.list()]
        problems = [p for name in names for p in store.verify(name)]
        for name in names:
            if not any(p.startswith(f"{name}:") for p in problems):
                print(f"{name}: OK")
        for problem in problems:
            print(problem, file=sys.stderr)
        return 1 if problems else 0
    if args.images_command == "remove":
        from .catalog import remove_image

        with store.lock():
            for line in remove_image(_life(cfg), args.name):
                print(line)
        return 0
    if args.images_command in ("sync", "publish", "unpublish"):
        return _catalog_command(cfg, store, args)
    if args.images_command == "check":
        from .batch.sge import sge_settings_path
        from .imagecheck import check_image

        settings = sge_settings_path(os.environ)  # the admin's SGE_ROOT/SGE_CELL, if any
        return check_image(cfg, args.name, args.user, json_output=args.json,
                           batch_files=(settings,) if settings else ())
    raise AssertionError(args.images_command)


def _catalog_command(cfg: Config, store, args) -> int:
    from . import catalog

    directory = Path(args.catalog)
    if args.images_command == "publish":
        print(catalog.publish(store, args.name, directory))
        return 0
    if args.images_command == "unpublish":
        print(catalog.unpublish(args.name, directory))
        return 0
    catalog.wait_splay(args.splay)
    report = catalog.sync_with_lock(_life(cfg), directory, dry_run=args.dry_run)
    if report is None:
        print("another 'images sync' or import is running on this node; this run did nothing "
              "(the next one catches up)")
        return 0
    for line in report.done:  # problems and warnings went to stderr and syslog as logged
        print(line)
    print(f"{directory}: {len(report.done)} change(s), {report.unchanged} image(s) unchanged, "
          f"{len(report.problems)} problem(s)")
    return 1 if report.problems else 0


def cmd_history(cfg: Config, args) -> int:
    """The audit trail: every job event on this node, oldest first."""
    from .audit import read_history

    events = read_history(cfg, job=args.job, user=args.user)
    if args.json:
        print(json.dumps(events, indent=2))
        return 0
    rows = [{**e, "time": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["time"])),
             "result": e.get("outcome") or e.get("exit_status") or e.get("action", ""),
             "where": e.get("slot", "")} for e in events]
    print(_table(rows, ["time", "event", "job", "owner", "vo", "image", "where", "result",
                        "identity"]))
    return 0


def cmd_up(cfg: Config, args) -> int:
    from .lifecycle import JobRequest, ensure_admin_key

    cfg.slot(args.slot)
    ensure_admin_key(cfg)
    life = _life(cfg)
    label_job = "admin-" + args.slot.replace(".", "-")
    lease, ctx = life.start_vm(JobRequest(job_id=label_job, task_id="0", owner="root",
                                          image=args.image, vo="admin"), slots=[args.slot])
    print(f"slot {lease.slot}: {args.image} running as {cfg.slot(args.slot).domain_name}, "
          f"ssh root@{ctx.host} -p {ctx.port}")
    return 0


def cmd_down(cfg: Config, args) -> int:
    life = _life(cfg)
    if life.end_vm(cfg.slot(args.slot).name, graceful=args.command == "down"):
        print(f"slot {args.slot}: VM stopped and lease released")
    else:
        print(f"slot {args.slot}: already free")
    return 0


def cmd_store(cfg: Config, args) -> int:
    _life(cfg).store_slot(cfg.slot(args.slot).name, args.name)
    print(f"slot {args.slot}: disk saved as image {args.name}; slot released")
    return 0


def cmd_reconcile(cfg: Config, args) -> int:
    actions = _life(cfg).reconcile(dry_run=args.dry_run)
    prefix = "would " if args.dry_run else ""
    for action in actions:
        print(prefix + action)
    if not actions:
        print("nothing to do: leases, domains and files agree")
    if not args.dry_run:
        from .metrics import observe

        observe(cfg)  # the reconcile timer keeps the metrics' gauges fresh
    return 0


def cmd_metrics(cfg: Config, args) -> int:
    """Print the metrics node_exporter serves; --write also writes them to metrics_dir."""
    from . import metrics

    if args.write:
        if cfg.metrics_dir is None:
            raise VmimError(f"no metrics_dir in {cfg.path}: set it to node_exporter's "
                            "--collector.textfile.directory (Debian: "
                            "/var/lib/prometheus/node-exporter)")
        try:
            print(f"written: {metrics.update(cfg)}", file=sys.stderr)
        except OSError as exc:
            raise VmimError(f"metrics not written: {exc}") from None
    print(metrics.text(cfg), end="")
    return 0


def cmd_print_config(cfg: Config, args) -> int:
    from dataclasses import asdict

    data = asdict(cfg)
    print(json.dumps(data, indent=2, default=str))
    return 0


def cmd_import_legacy(file: str) -> int:
    from .legacy import convert

    try:
        with open(file, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise VmimError(f"cannot read {file}: {exc}") from None
    converted, warnings = convert(text, file)
    for line in warnings:
        print(f"vmimagemanager: {line}", file=sys.stderr)
    print(converted, end="")
    return 0


def cmd_exec(cfg: Config, args) -> int:
    from .guest import connect

    slot = cfg.slot(args.slot)
    life = _life(cfg)
    lease = life.leases.get(slot.name)
    if lease is None or not life.hv.is_running(slot.domain_name):
        raise VmimError(f"slot {slot.name} has no running VM; start one with "
                        f"'vmimagemanager up {slot.name} --image NAME'")
    from .context import read_root_context

    if lease.is_spare:  # an idle spare has no job context: its key is on its console
        from .lifecycle import lease_files
        from .spares import spare_host_key

        host_key = spare_host_key(lease_files(cfg, slot.name, lease.job_label).console)
    else:
        host_key = read_root_context(cfg.run_dir, lease.job_label).host_key
    session = connect(life.admin_login(slot, host_key))
    command = list(args.cmd)
    if not command:
        raise VmimError("nothing to run: give a command after '--'")
    if args.user and args.user != "root":
        command = ["su", "-s", "/bin/sh", args.user, "-c", shlex.join(command)]
    try:
        return session.run(command, {}, None, stdin_fd=0 if not sys.stdin.isatty() else None)
    finally:
        session.close()


def cmd_admin_key(cfg: Config, args) -> int:
    from .lifecycle import admin_key, ensure_admin_key

    path = ensure_admin_key(cfg)
    print(f"{path}: {admin_key(cfg)[1]}")
    return 0


def cmd_sge(cfg_path: str, args) -> int:
    from .batch.sge_queue import install_queue

    return install_queue(cfg_path, args)


def cmd_slurm(cfg_path: str, args) -> int:
    from .batch.slurm_setup import install_hooks

    return install_hooks(cfg_path, args)


# -- parser -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vmimagemanager",
        description="Run each batch job in its own freshly booted VM: manage slots and images.")
    p.add_argument("--config", help="configuration file (default: $VMIM_CONFIG, then "
                   "/etc/vmimagemanager/vmimagemanager.yaml)")
    p.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for name in ("slots", "status"):
        s = sub.add_parser(name, help="show every slot: state, job, image, domain")
        s.add_argument("--json", action="store_true")
        s.add_argument("--watch", type=float, nargs="?", const=2.0, metavar="SECONDS",
                       help="redraw the table every SECONDS (2) until Ctrl-C")
    s = sub.add_parser("spares", help="show the warm spares (idle VMs booted ahead of jobs)")
    s.add_argument("--json", action="store_true")
    s.add_argument("--retire", action="store_true", help="destroy every idle spare first (stop "
                   "the agent before, or it boots new ones)")
    s = sub.add_parser("agent", help="keep warm spares ready and heal the node (long-running)")
    s.add_argument("--once", action="store_true", help="one round, then exit (cron, tests)")
    s.add_argument("--interval", type=float, help="seconds between rounds (default: "
                   "spares.interval, 5)")
    s = sub.add_parser("history", help="the audit trail: who ran what, in which image, how "
                       "it ended (root)")
    s.add_argument("--job", help="one job: ID or ID.TASK")
    s.add_argument("--user", help="one owner (pool account)")
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("metrics", help="print the Prometheus metrics of this node (root)")
    s.add_argument("--write", action="store_true", help="also write them to metrics_dir for "
                   "node_exporter's textfile collector")
    img = sub.add_parser("images", help="manage golden images")
    isub = img.add_subparsers(dest="images_command", required=True, metavar="ACTION")
    i = isub.add_parser("import", help="copy a disk image into the image store (sha256 recorded)")
    i.add_argument("name")
    i.add_argument("file")
    i.add_argument("--kernel", help="kernel for direct kernel boot")
    i.add_argument("--initrd", help="initrd for direct kernel boot")
    i.add_argument("--cmdline", help="kernel command line for direct kernel boot")
    i = isub.add_parser("list", help="list images")
    i.add_argument("--json", action="store_true")
    i = isub.add_parser("verify", help="re-hash images and report mismatches")
    i.add_argument("names", nargs="*")
    i = isub.add_parser("remove", help="remove an image (refused while a lease uses it)")
    i.add_argument("name")
    i = isub.add_parser("sync", help="import new and changed images from a catalog on a "
                        "shared file system, remove those that left it (cron-safe)")
    i.add_argument("catalog", help="the catalog directory (holds images.yaml)")
    i.add_argument("--dry-run", action="store_true", help="say what would be done")
    i.add_argument("--splay", type=float, default=0.0, metavar="SECONDS",
                   help="wait a random time up to SECONDS first (many nodes' cron runs)")
    i = isub.add_parser("publish", help="put a local image into a catalog directory")
    i.add_argument("name")
    i.add_argument("catalog")
    i = isub.add_parser("unpublish", help="take an image out of a catalog directory")
    i.add_argument("name")
    i.add_argument("catalog")
    i = isub.add_parser("check", help="boot an image once and report which guest "
                        "requirements it meets")
    i.add_argument("name")
    i.add_argument("--user", help="pool account to test logging in as (default: first "
                   "account of the image's VO)")
    i.add_argument("--json", action="store_true")

    s = sub.add_parser("up", help="boot IMAGE in SLOT for an admin (alias: restore)",
                       aliases=["restore"])
    s.add_argument("slot")
    s.add_argument("--image", required=True)
    s = sub.add_parser("down", help="shut the slot's VM down (graceful, then destroy), release")
    s.add_argument("slot")
    s = sub.add_parser("kill", help="destroy the slot's VM at once and release the slot")
    s.add_argument("slot")
    s = sub.add_parser("store", help="save a slot's current disk as a new image NAME")
    s.add_argument("slot")
    s.add_argument("name")
    s = sub.add_parser("reconcile", help="compare leases, domains and files; remove orphans")
    s.add_argument("--dry-run", action="store_true", help="only say what would be done")
    sub.add_parser("print-config", help="print the validated configuration")
    sub.add_parser("admin-key", help="make this node's admin key (root's login to its guests) "
                   "if there is none, and print it")
    s = sub.add_parser("config", help="configuration tools (needs no configuration file)")
    csub = s.add_subparsers(dest="config_command", required=True)
    s = csub.add_parser("import-legacy", help="print the original vmimagemanager's INI "
                        "configuration as this tool's YAML (warnings on stderr)")
    s.add_argument("file")
    s = sub.add_parser("exec", help="run a command in a slot's VM (as root, or --user)")
    s.add_argument("slot")
    s.add_argument("--user", help="run as this account in the guest")
    s.add_argument("cmd", nargs="*", help="-- COMMAND [ARG...]")
    sge = sub.add_parser("sge", help="gridengine set-up")
    ssub = sge.add_subparsers(dest="sge_command", required=True, metavar="ACTION")
    q = ssub.add_parser("install-queue", help="configure a VM queue with qconf")
    q.add_argument("--queue", default="vm.q")
    q.add_argument("--hosts", nargs="+", help="execution hosts (default: this host)")
    q.add_argument("--wrapper-dir", default="/usr/local/libexec/vmimagemanager",
                   help="where the root-owned hook wrappers are written")
    q.add_argument("--slots", type=int, help="job slots per host (default: VM slots configured)")
    slurm = sub.add_parser("slurm", help="Slurm set-up")
    lsub = slurm.add_subparsers(dest="slurm_command", required=True, metavar="ACTION")
    h = lsub.add_parser("install-hooks", help="write this node's Prolog/Epilog wrappers and "
                        "SPANK plugin (every job of the node runs in a VM)")
    h.add_argument("--dir", default="/etc/slurm/vmimagemanager",
                   help="where the root-owned wrappers and the plugin are written")
    h.add_argument("--plugstack", default="/etc/slurm/plugstack.conf.d/vmimagemanager.conf",
                   help="the plugstack.conf include that loads the plugin")
    return p


COMMANDS = {
    "slots": cmd_slots, "status": cmd_slots, "images": cmd_images, "up": cmd_up,
    "restore": cmd_up, "down": cmd_down, "kill": cmd_down, "store": cmd_store,
    "reconcile": cmd_reconcile, "print-config": cmd_print_config, "exec": cmd_exec,
    "spares": cmd_spares, "agent": cmd_agent, "history": cmd_history, "metrics": cmd_metrics,
    "admin-key": cmd_admin_key,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    trailing: list[str] = []
    if "exec" in argv and "--" in argv[argv.index("exec"):]:
        cut = argv.index("--", argv.index("exec"))  # everything after '--' is the command
        argv, trailing = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    if args.command == "exec":
        args.cmd = [*args.cmd, *trailing]
    setup_logging("vmimagemanager", verbose=args.verbose)
    path = config_path(args.config)
    try:
        if args.command == "sge":
            return cmd_sge(path, args)
        if args.command == "slurm":
            return cmd_slurm(path, args)
        if args.command == "config":
            return cmd_import_legacy(args.file)
        cfg = load_config(path)
        return COMMANDS[args.command](cfg, args)
    except VmimError as exc:
        print(f"vmimagemanager: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vmimagemanager: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
