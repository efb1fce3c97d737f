"""What the node tells its admin: history (the audit trail), metrics, print-config."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict

from ..config import Config
from ..errors import VmimError
from .command import Command, configured
from .output import table


# -- health -----------------------------------------------------------------------------------
def _health_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true")


def health(cfg: Config, args: argparse.Namespace) -> int:
    """Each check, its state and since when; exit 0 healthy, 1 degraded, 2 out of service."""
    # lazy: the checks open the node (libvirt, leases, images): this command's alone
    from ..batch.service import out_of_service
    from ..health import as_json, run_checks, status
    from .command import open_node

    results, out = run_checks(open_node(cfg)), out_of_service(cfg)
    code = status(results, bool(out))
    if args.json:
        print(as_json(results, out))
        return code
    rows = [{"check": r.check, "scope": r.scope, "state": "ok" if r.ok else "FAILED",
             "since": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.since)),
             "detail": r.detail} for r in results]
    print(table(rows, ["check", "scope", "state", "since", "detail"]))
    if out:
        print(f"taken out of scheduling by the agent since "
              f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(out['since']))}: "
              f"{out['reason']} ({', '.join(out['sge']) or out['slurm'] or 'nothing to take'})")
    print(["healthy", "degraded: see the failed check (a VO's jobs are held, or reconcile is "
           "owed)", "out of service: no VM job can start on this node"][code])
    return code


HEALTH = Command("health", "the node's health checks: each one's state and since when",
                 configured(health), _health_arguments)


# -- history ----------------------------------------------------------------------------------
def _history_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--job", help="one job: ID or ID.TASK")
    parser.add_argument("--user", help="one owner (pool account)")
    parser.add_argument("--json", action="store_true")


def history(cfg: Config, args: argparse.Namespace) -> int:
    """The audit trail: every job event on this node, oldest first."""
    # lazy: the audit trail's reader (and its journal look-ups) serve this command only
    from ..audit import read_history

    events = read_history(cfg, job=args.job, user=args.user)
    if args.json:
        print(json.dumps(events, indent=2))
        return 0
    rows = [{**e, "time": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["time"])),
             "result": e.get("outcome") or e.get("exit_status") or e.get("action", ""),
             "where": e.get("slot", "")} for e in events]
    print(table(rows, ["time", "event", "job", "owner", "vo", "image", "where", "result",
                       "identity"]))
    return 0


HISTORY = Command("history", "the audit trail: who ran what, in which image, how it ended (root)",
                  configured(history), _history_arguments)


# -- metrics ----------------------------------------------------------------------------------
def _metrics_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--write", action="store_true", help="also write them to metrics_dir "
                        "for node_exporter's textfile collector")


def metrics(cfg: Config, args: argparse.Namespace) -> int:
    """Print the metrics node_exporter serves; --write also writes them to metrics_dir."""
    # lazy: the metrics' collectors serve this command and reconcile only
    from .. import metrics as node_metrics

    if args.write:
        if cfg.metrics_dir is None:
            raise VmimError(f"no metrics_dir in {cfg.path}: set it to node_exporter's "
                            "--collector.textfile.directory (Debian: "
                            "/var/lib/prometheus/node-exporter)")
        try:
            print(f"written: {node_metrics.update(cfg)}", file=sys.stderr)
        except OSError as exc:
            raise VmimError(f"metrics not written: {exc}") from None
    print(node_metrics.text(cfg), end="")
    return 0


METRICS = Command("metrics", "print the Prometheus metrics of this node (root)",
                  configured(metrics), _metrics_arguments)


# -- print-config -----------------------------------------------------------------------------
def print_config(cfg: Config, args: argparse.Namespace) -> int:
    print(json.dumps(asdict(cfg), indent=2, default=str))
    return 0


PRINT_CONFIG = Command("print-config", "print the validated configuration",
                       configured(print_config))
