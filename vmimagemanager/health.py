"""The node's health checks (`vmimagemanager health`): what a node needs to run any VM job, and
what one VO needs to run its jobs.

A failed **node** check (libvirtd, the free space of overlay_dir and state_dir, the leases
database, leases and domains agreeing) means no VM job can start here; a failed **vo** check
(one image missing or changed) concerns that VO's jobs only, which are held per job with the
reason as before. Each check's state is kept with the time it last changed
(`state_dir/health.json`, root-only), so the report says since when. This module checks and
reports; taking the node out of scheduling on a failed node check is the next step (issue 31).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from .errors import VmimError
from .files import write_private_file

if TYPE_CHECKING:
    from .node import Node

MIN_FREE_MIB = 1024  # below this in overlay_dir or state_dir, no job's VM can be started safely
HEALTHY, DEGRADED, OUT_OF_SERVICE = 0, 1, 2  # the command's exit status


@dataclass(frozen=True)
class CheckResult:
    check: str
    scope: str  # "node": every VM job depends on it; "vo": one VO's jobs do
    ok: bool
    detail: str
    since: float = 0.0


def _free_space(name: str, path) -> CheckResult:
    try:
        st = os.statvfs(path)
    except OSError as exc:
        return CheckResult(name, "node", False, f"{path}: {exc.strerror}")
    free = st.f_bavail * st.f_frsize >> 20
    ok = free >= MIN_FREE_MIB
    return CheckResult(name, "node", ok, f"{free} MiB free in {path}"
                       + ("" if ok else f" (less than {MIN_FREE_MIB} MiB: free space)"))


def _libvirt(life: Node) -> CheckResult:
    try:
        life.hv.connect()
        count = len(life.hv.domain_names())
    except VmimError as exc:
        return CheckResult("libvirtd", "node", False, str(exc))
    return CheckResult("libvirtd", "node", True, f"{life.cfg.libvirt_uri} answers "
                       f"({count} domains)")


def _leases(life: Node) -> list[CheckResult]:
    """The database (opening the node rebuilt it if it could not be used) and its agreement
    with libvirt: what reconcile would do is what is leaked or left over."""
    try:
        leases = life.leases.all()
        disagree = life.reconcile(dry_run=True)
    except VmimError as exc:
        return [CheckResult("leases_db", "node", False, str(exc))]
    cores, memory = life.cfg.budget.used(lease.shape for lease in leases)
    return [
        CheckResult("leases_db", "node", True, f"{len(leases)} leases, {cores} of "
                    f"{life.cfg.budget.cores} cores and {memory} of {life.cfg.budget.memory_mib} "
                    "MiB held"),
        CheckResult("leases_agree", "node", not disagree,
                    "leases, domains and files agree" if not disagree else
                    f"{len(disagree)} to reconcile, e.g. {disagree[0]} ('vmimagemanager "
                    "reconcile' or the agent's next round)")]


def _images(life: Node) -> list[CheckResult]:
    results = []
    for image_name in sorted({rule.image for rule in life.cfg.vos}):
        vos = ", ".join(rule.name for rule in life.cfg.vos if rule.image == image_name)
        try:
            life.images.check_unchanged(life.images.get(image_name))
        except VmimError as exc:
            results.append(CheckResult(f"image:{image_name}", "vo", False,
                                       f"VO {vos}: {exc}"))
        else:
            results.append(CheckResult(f"image:{image_name}", "vo", True, f"VO {vos}"))
    return results


def run_checks(life: Node) -> list[CheckResult]:
    """Every check, now; each with the time its state last changed (kept in state_dir)."""
    results = [_libvirt(life), _free_space("overlay_dir", life.cfg.overlay_dir),
               _free_space("state_dir", life.cfg.state_dir), *_leases(life), *_images(life)]
    return _with_since(life, results)


def _with_since(life: Node, results: list[CheckResult]) -> list[CheckResult]:
    path = life.cfg.state_dir / "health.json"
    try:
        before = json.loads(path.read_text())
    except (OSError, ValueError):
        before = {}
    now = time.time()
    dated = []
    for r in results:
        seen = before.get(r.check, {})
        since = seen.get("since", now) if seen.get("ok") == r.ok else now
        dated.append(CheckResult(r.check, r.scope, r.ok, r.detail, float(since)))
    fresh = path.with_name(f".{path.name}.{os.getpid()}")
    fresh.unlink(missing_ok=True)
    write_private_file(fresh, json.dumps({r.check: {"ok": r.ok, "since": r.since}
                                          for r in dated}).encode())
    os.replace(fresh, path)
    return dated


def status(results: list[CheckResult]) -> int:
    """0 healthy; 1 degraded (a VO's check failed: its jobs are held, the others run); 2 a
    node check failed (no VM job can start here)."""
    if any(not r.ok and r.scope == "node" for r in results):
        return OUT_OF_SERVICE
    return DEGRADED if any(not r.ok for r in results) else HEALTHY


def as_json(results: list[CheckResult]) -> str:
    return json.dumps({"status": ["healthy", "degraded", "out of service"][status(results)],
                       "checks": [asdict(r) for r in results]}, indent=2)
