"""Prometheus metrics through node_exporter's textfile collector.

Sites already run node_exporter on every node; its textfile collector serves every `*.prom` file
of one directory (Debian: /var/lib/prometheus/node-exporter). `metrics_dir` in the configuration
names it; without it nothing is written.

The counters and histograms are a fold of the audit trail (audit.record calls `observe` with
each event it writes): a job's start, its end, a spare's boot and a reconcile action each move
them once. Their running totals are kept in `state_dir/metrics.json` (root-only), so they
survive restarts and log rotation, as Prometheus counters must. The gauges (slots by state,
idle spares, images present) are read from the leases database and the image store each time
the file is written: after every event, every reconcile and every agent round.

Each writer holds `state_dir/metrics.lock` while it reads, updates and writes the totals and
the file, so hooks running at once never lose an increment or write an older total over a newer
one; the file is written beside its final name and renamed over it, so node_exporter never reads
half of it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import VmimError
from .files import write_private_file
from .images import ImageStore
from .leases import LeaseStore
from .states import LeaseState

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger("vmimagemanager.metrics")

METRICS_FILE = "vmimagemanager.prom"
TOTALS_FILE = "metrics.json"
LOCK_WAIT = 10.0  # seconds a writer waits for another's lock (writes take milliseconds)
# The life-cycle phases (node.coldboot launch) from starting the domain to ssh answering.
BOOT_PHASES = ("define+start", "guest boot (to host key on console)", "wait for ssh")
BOOT_BUCKETS = (1, 2, 5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300)
PROLOG_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300)
# Reconcile action lines (node.reconcile) by their first words: the `action` label.
RECONCILE_KINDS = (("release slot", "release_lease"), ("destroy domain", "destroy_domain"),
                   ("remove orphan file", "remove_file"),
                   ("remove orphan job context", "remove_context"),
                   ("stop the orphan file server", "stop_file_server"))


@dataclass(frozen=True)
class Family:
    name: str
    kind: str  # counter, histogram or gauge
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()


FAMILIES = (
    Family("vmimagemanager_jobs_started_total", "counter",
           "Jobs the prolog let run: mode vm (in a VM), native (no VO matched, run on the "
           "node) or reject (no VO matched, ended with the reason).", ("vo", "mode")),
    Family("vmimagemanager_job_start_failures_total", "counter",
           "Prologs that did not start the job: outcome retry (back to the queue), hold (waits "
           "for an admin) or fail (ended with the reason); cause is the kind of error.",
           ("vo", "outcome", "cause")),
    Family("vmimagemanager_jobs_finished_total", "counter",
           "Jobs whose epilog ran: status success (exit 0), failure (other exit status), "
           "signal (ended by a signal on the node).", ("vo", "status")),
    Family("vmimagemanager_vm_starts_total", "counter",
           "VMs a job started in: path boot (booted for it), spare (a warm spare bound "
           "to it) or snapshot (restored from its image's memory snapshot).",
           ("image", "path")),
    Family("vmimagemanager_snapshot_fallbacks_total", "counter",
           "Jobs whose start from a memory snapshot failed and whose VM was booted instead "
           "(the reason is in the audit trail, snapshot_failed).", ("image",)),
    Family("vmimagemanager_boot_failures_total", "counter",
           "VM boots that failed, for jobs and for warm spares.", ("image",)),
    Family("vmimagemanager_reconcile_actions_total", "counter",
           "What reconcile cleaned up: leases released, domains destroyed, files and job "
           "contexts removed.", ("action",)),
    Family("vmimagemanager_prolog_seconds", "histogram",
           "Wall time of the prolog, by path: boot, spare, snapshot (a VM started) or none (no VM "
           "started: native, reject, retry, hold).", ("path",), PROLOG_BUCKETS),
    Family("vmimagemanager_boot_seconds", "histogram",
           "Seconds from starting a domain to its ssh answering, for jobs and warm spares.",
           ("image",), BOOT_BUCKETS),
    Family("vmimagemanager_slots", "gauge",
           "This node's VM slots by lease state (free: no lease).", ("state",)),
    Family("vmimagemanager_spares_ready", "gauge",
           "Idle warm spares per image, ready for a job.", ("image",)),
    Family("vmimagemanager_job_core_seconds_total", "counter",
           "Cores times wall seconds of the VMs of the jobs that ended (a job's VM has the "
           "job's cores).", ("vo",)),
    Family("vmimagemanager_vm_cores", "gauge",
           "Cores of this node's VM budget: held by leases (used) and in all (total).",
           ("state",)),
    Family("vmimagemanager_vm_memory_bytes", "gauge",
           "Memory of this node's VM budget, QEMU's per-VM overhead included: held by leases "
           "(used) and in all (total).", ("state",)),
    Family("vmimagemanager_node_healthy", "gauge",
           "Each health check's last state (1 passed, 0 failed), as the agent's round or "
           "'vmimagemanager health' found it.", ("check",)),
    Family("vmimagemanager_node_in_service", "gauge",
           "0 while the node has taken itself out of scheduling for VM jobs (a node check "
           "failed), else 1.", ()),
    Family("vmimagemanager_image_info", "gauge",
           "Images present on this node, with the sha256 of their disk.", ("image", "sha256")),
)
BY_NAME = {f.name: f for f in FAMILIES}


# -- the fold: audit events -> totals ------------------------------------------------------------
def _key(family: Family, labels: Mapping[str, object]) -> str:
    """A series' key in the totals: its label values in the family's order, as JSON."""
    return json.dumps([str(labels.get(n) or "") for n in family.labels])


def _inc(totals: dict, name: str, labels: Mapping[str, object], by: float = 1) -> None:
    key = _key(BY_NAME[name], labels)
    series = totals.setdefault(name, {})
    series[key] = series.get(key, 0) + by


def _observe(totals: dict, name: str, labels: Mapping[str, object], value: float) -> None:
    family = BY_NAME[name]
    key = _key(family, labels)
    h = totals.setdefault(name, {}).setdefault(
        key, {"buckets": [0] * len(family.buckets), "sum": 0.0, "count": 0})
    for i, bound in enumerate(family.buckets):
        if value <= bound:
            h["buckets"][i] += 1
    h["sum"] += value
    h["count"] += 1


def boot_seconds(phases: Mapping[str, float]) -> float | None:
    """Domain start to ssh answering; None if the VM was not booted (a bound spare)."""
    if not all(p in phases for p in BOOT_PHASES):
        return None
    return sum(float(phases[p]) for p in BOOT_PHASES)


def fold(totals: dict, event: Mapping) -> None:
    """Move the totals by one audit event (audit.record's entry)."""
    kind, vo, image = event.get("event"), event.get("vo", ""), event.get("image", "")
    if kind == "start":
        mode, outcome = event.get("mode", ""), event.get("outcome")
        failed = outcome != "ready" or "failed" in event
        if failed:
            _inc(totals, "vmimagemanager_job_start_failures_total", {
                "vo": vo, "outcome": outcome if outcome != "ready" else "fail",
                "cause": event.get("cause", "")})
        else:
            _inc(totals, "vmimagemanager_jobs_started_total", {"vo": vo, "mode": mode})
        if event.get("cause") == "boot_failed":
            _inc(totals, "vmimagemanager_boot_failures_total", {"image": image})
        path = "none"
        if mode == "vm" and not failed:
            path = ("spare" if event.get("spare") else
                    "snapshot" if event.get("snapshot") else "boot")
            if event.get("snapshot_failed"):
                _inc(totals, "vmimagemanager_snapshot_fallbacks_total", {"image": image})
            _inc(totals, "vmimagemanager_vm_starts_total", {"image": image, "path": path})
            booted = boot_seconds(event.get("phases", {}))
            if booted is not None:
                _observe(totals, "vmimagemanager_boot_seconds", {"image": image}, booted)
        if "prolog_seconds" in event:
            _observe(totals, "vmimagemanager_prolog_seconds", {"path": path},
                     float(event["prolog_seconds"]))
    elif kind == "end":
        signal, status = str(event.get("signal") or "0"), str(event.get("exit_status", ""))
        result = "signal" if signal != "0" else "success" if status == "0" else "failure"
        _inc(totals, "vmimagemanager_jobs_finished_total", {"vo": vo, "status": result})
        if event.get("cores") and event.get("wall_seconds"):
            _inc(totals, "vmimagemanager_job_core_seconds_total", {"vo": vo},
                 float(event["cores"]) * float(event["wall_seconds"]))
    elif kind == "spare":
        if event.get("outcome") == "ready":
            booted = boot_seconds(event.get("phases", {}))
            if booted is not None:
                _observe(totals, "vmimagemanager_boot_seconds", {"image": image}, booted)
        else:
            _inc(totals, "vmimagemanager_boot_failures_total", {"image": image})
    elif kind == "reconcile":
        action = str(event.get("action", ""))
        label = next((k for prefix, k in RECONCILE_KINDS if action.startswith(prefix)), "other")
        _inc(totals, "vmimagemanager_reconcile_actions_total", {"action": label})


# -- the gauges: read from the node now -----------------------------------------------------------
def node_gauges(cfg: Config) -> dict:
    """Slots by state, idle spares per image, images present; a part that cannot be read is
    left out (and logged), never in the way of the counters."""
    gauges: dict = {}
    try:
        store = LeaseStore(cfg.leases_db, wait=2.0)
        try:
            leases = store.all()
        finally:
            store.close()
    except VmimError as exc:
        log.warning("metrics: slot gauges left out: %s", exc)
    else:
        states = {str(s): 0 for s in LeaseState}
        states["free"] = len(cfg.slots) - len(leases)
        spares = {image: 0 for image, _, _ in cfg.spares.counts}
        for lease in leases:
            states[str(lease.state)] += 1
            if lease.is_spare and lease.state is LeaseState.SPARE:
                spares[lease.image] = spares.get(lease.image, 0) + 1
        gauges["vmimagemanager_slots"] = {json.dumps([s]): n for s, n in states.items()}
        gauges["vmimagemanager_spares_ready"] = {json.dumps([i]): n for i, n in spares.items()}
        budget = cfg.budget
        cores, memory = budget.used(lease.shape for lease in leases)
        gauges["vmimagemanager_vm_cores"] = {'["used"]': cores, '["total"]': budget.cores}
        gauges["vmimagemanager_vm_memory_bytes"] = {'["used"]': memory << 20,
                                                    '["total"]': budget.memory_mib << 20}
    try:
        images = ImageStore(cfg.image_dir).list()
    except (OSError, ValueError, TypeError, VmimError) as exc:
        log.warning("metrics: image gauges left out: %s", exc)
    else:
        gauges["vmimagemanager_image_info"] = {
            json.dumps([i.name, i.sha256.get(i.disk, "")]): 1 for i in images}
    gauges.update(_health_gauges(cfg))
    return gauges


def _health_gauges(cfg: Config) -> dict:
    """Each health check's last state (health.py writes it) and whether the node took itself
    out of scheduling (batch/service.py's marker): files of root's, read, never run."""
    gauges: dict = {}
    try:
        checks = json.loads((cfg.state_dir / "health.json").read_text())
        gauges["vmimagemanager_node_healthy"] = {
            json.dumps([str(name)]): int(bool(c.get("ok"))) for name, c in checks.items()}
    except (OSError, ValueError, AttributeError):
        pass  # no check has run yet: no series
    gauges["vmimagemanager_node_in_service"] = {
        "[]": int(not (cfg.state_dir / "out-of-service.json").exists())}
    return gauges


# -- the text format ------------------------------------------------------------------------------
INF = 'le="+Inf"'


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: list[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def render(totals: Mapping, gauges: Mapping) -> str:
    """The Prometheus text exposition format (version 0.0.4) of every family."""
    lines = []
    for family in FAMILIES:
        series = (gauges if family.kind == "gauge" else totals).get(family.name, {})
        lines += [f"# HELP {family.name} {family.help}", f"# TYPE {family.name} {family.kind}"]
        for key in sorted(series):
            values, value = json.loads(key), series[key]
            if family.kind != "histogram":
                lines.append(f"{family.name}{_labels(family.labels, values)} {_number(value)}")
                continue
            for bound, count in zip(family.buckets, value["buckets"], strict=True):
                le = f'le="{_number(bound)}"'
                lines.append(f"{family.name}_bucket{_labels(family.labels, values, le)} {count}")
            lines.append(f"{family.name}_bucket{_labels(family.labels, values, INF)} "
                         f"{value['count']}")
            lines.append(f"{family.name}_sum{_labels(family.labels, values)} "
                         f"{_number(round(value['sum'], 6))}")
            lines.append(f"{family.name}_count{_labels(family.labels, values)} {value['count']}")
    return "\n".join(lines) + "\n"


# -- writing ---------------------------------------------------------------------------------------
@contextmanager
def _locked(cfg: Config) -> Iterator[None]:
    deadline = time.monotonic() + LOCK_WAIT
    with open(cfg.state_dir / "metrics.lock", "a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise OSError(errno.EWOULDBLOCK, f"{cfg.state_dir / 'metrics.lock'} held by "
                                  f"another process for {LOCK_WAIT:.0f} s") from None
                time.sleep(0.01)
        yield


def _replace(path: Path, data: bytes, mode: int) -> None:
    """Write `data` beside `path` (a name node_exporter does not read) and rename it over."""
    temp = path.with_name(f".{path.name}.{os.getpid()}")
    temp.unlink(missing_ok=True)
    write_private_file(temp, data, mode=mode)
    os.replace(temp, path)


def read_totals(cfg: Config) -> dict:
    try:
        return json.loads((cfg.state_dir / TOTALS_FILE).read_text())
    except FileNotFoundError:
        return {}
    except (ValueError, OSError) as exc:  # a damaged file: start again from zero (a reset)
        log.warning("metrics: %s unreadable (%s); counters start again from 0",
                    cfg.state_dir / TOTALS_FILE, exc)
        return {}


def text(cfg: Config) -> str:
    """What the metrics file holds now (`vmimagemanager metrics`)."""
    return render(read_totals(cfg), node_gauges(cfg))


def update(cfg: Config, event: Mapping | None = None) -> Path | None:
    """Fold `event` into the totals (if given) and write the metrics file; its path, or None
    when no `metrics_dir` is configured. Raises OSError if the file cannot be written."""
    if cfg.metrics_dir is None:
        return None
    if not cfg.metrics_dir.is_dir():
        raise OSError(errno.ENOENT, f"metrics_dir {cfg.metrics_dir} is not a directory: install "
                      "prometheus-node-exporter (it makes /var/lib/prometheus/node-exporter) or "
                      "point metrics_dir at its --collector.textfile.directory")
    with _locked(cfg):
        totals = read_totals(cfg)
        if event is not None:
            fold(totals, event)
            _replace(cfg.state_dir / TOTALS_FILE, json.dumps(totals).encode(), 0o600)
        target = cfg.metrics_dir / METRICS_FILE
        _replace(target, render(totals, node_gauges(cfg)).encode(), 0o644)
    return target


def observe(cfg: Config, event: Mapping | None = None) -> None:
    """Fold an event (audit.record) or only refresh the gauges (agent rounds, reconcile):
    metrics never stand in a job's way, a failure is logged."""
    try:
        update(cfg, event)
    except OSError as exc:
        log.warning("metrics file not written: %s", exc)


CAUSE_WORDS = re.compile(r"(?<!^)(?=[A-Z])")


def cause_of(exc: BaseException) -> str:
    """The `cause` label of a failed start: the error's kind (NoFreeSlot -> no_free_slot)."""
    return CAUSE_WORDS.sub("_", type(exc).__name__).lower()
