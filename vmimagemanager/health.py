"""The node's health checks (`vmimagemanager health`): what a node needs to run any VM job, and
what one VO needs to run its jobs.

A failed **node** check (libvirtd, the free space of overlay_dir and state_dir, the leases
database) means no VM job can start here: the agent takes the node out of scheduling for VM
jobs (batch/service.py) and puts it back once every node check has passed for
`health.back_after` seconds. Leases and domains disagreeing is reported (the agent's own
reconcile mends it each round) but takes nothing out. A failed **vo** check (one image missing
or changed) concerns that VO's jobs only, which are held per job with the reason as before.
Each check's state is kept with the time it last changed (`state_dir/health.json`,
root-only), so the report says since when.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from .errors import VmimError
from .files import replace_private_file

if TYPE_CHECKING:
    from .node import Node

HEALTHY, DEGRADED, OUT_OF_SERVICE = 0, 1, 2  # the command's exit status


@dataclass(frozen=True)
class CheckResult:
    check: str
    scope: str  # "node": every VM job depends on it; "vo": one VO's jobs do
    ok: bool
    detail: str
    since: float = 0.0
    acts: bool = True  # a failed node check takes the node out (leases_agree: reported only)


def _free_space(name: str, path, floor: int) -> CheckResult:
    """At least `floor` MiB free (health.min_free_mib): below, no VM can be started safely."""
    try:
        st = os.statvfs(path)
    except OSError as exc:
        return CheckResult(name, "node", False, f"{path}: {exc.strerror}")
    free = st.f_bavail * st.f_frsize >> 20
    ok = free >= floor
    return CheckResult(name, "node", ok, f"{free} MiB free in {path}"
                       + ("" if ok else f" (less than {floor} MiB: free space)"))


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
    except VmimError as exc:
        return [CheckResult("leases_db", "node", False, str(exc))]
    cores, memory = life.cfg.budget.used(lease.shape for lease in leases)
    held = CheckResult("leases_db", "node", True, f"{len(leases)} leases, {cores} of "
                       f"{life.cfg.budget.cores} cores and {memory} of "
                       f"{life.cfg.budget.memory_mib} MiB held")
    try:
        disagree = life.reconcile(dry_run=True)
    except VmimError as exc:  # libvirtd: its own check says so
        return [held, CheckResult("leases_agree", "node", False, f"cannot be compared: {exc}",
                                  acts=False)]
    return [held, CheckResult(
        "leases_agree", "node", not disagree, "leases, domains and files agree" if not disagree
        else f"{len(disagree)} to reconcile, e.g. {disagree[0]} ('vmimagemanager reconcile' or "
        "the agent's next round)", acts=False)]


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
    floor = life.cfg.health.min_free_mib
    results = [_libvirt(life), _free_space("overlay_dir", life.cfg.overlay_dir, floor),
               _free_space("state_dir", life.cfg.state_dir, floor), *_leases(life),
               *_images(life)]
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
        dated.append(CheckResult(r.check, r.scope, r.ok, r.detail, float(since), r.acts))
    replace_private_file(path, json.dumps({r.check: {"ok": r.ok, "since": r.since}
                                           for r in dated}).encode())
    return dated


def failing(results: list[CheckResult]) -> list[CheckResult]:
    """The failed node checks that take the node out of scheduling."""
    return [r for r in results if not r.ok and r.scope == "node" and r.acts]


def back_in_service(results: list[CheckResult], back_after: float, now: float) -> bool:
    """Every node check has passed for `back_after` seconds."""
    return not failing(results) and all(now - r.since >= back_after for r in results
                                        if r.scope == "node" and r.acts)


def reason(results: list[CheckResult]) -> str:
    return "; ".join(f"{r.check}: {r.detail}" for r in failing(results))


def status(results: list[CheckResult], out: bool = False) -> int:
    """0 healthy; 1 degraded (a VO's check failed: its jobs are held, the others run; or
    leases and domains disagree); 2 out of service: a node check failed (no VM job can start
    here) or the node took itself out and is not back yet (`out`)."""
    if failing(results) or out:
        return OUT_OF_SERVICE
    return DEGRADED if any(not r.ok for r in results) else HEALTHY


def as_json(results: list[CheckResult], out_of_service: dict) -> str:
    return json.dumps({"status": ["healthy", "degraded", "out of service"][
        status(results, bool(out_of_service))], "out_of_service": out_of_service or None,
        "checks": [asdict(r) for r in results]}, indent=2)
