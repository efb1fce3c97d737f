"""What a job's VM used, as libvirt says just before it is destroyed (a warm spare's idle use
taken off), for the accounting record and usage.jsonl."""

from __future__ import annotations

import json
import logging
import time

from ..config import domain_name
from ..files import append_line

log = logging.getLogger("vmimagemanager.node")


IDLE_FIGURES = ("cpu_seconds", "user_seconds", "system_seconds")
BOUND_AT = "bound_at"  # in a bound spare's lease metadata: when the job got it (epoch seconds)



class Usage:
    """VM usage accounting (a part of node.Node)."""

    def _account(self, slot_name: str, label: str,
                 meta: dict[str, str]) -> dict[str, float] | None:
        """What the job's VM used (recorded in usage.jsonl); None if libvirt cannot say."""
        try:  # accounting never stands in the way of a teardown
            lease = self.leases.get(slot_name)
            return self._record_usage(slot_name, label, meta,
                                      self.hv.usage(domain_name(slot_name)), lease)
        except Exception as exc:  # noqa: BLE001 - logged; the VM goes regardless
            log.warning("job %s slot %s: VM usage not recorded: %s", label, slot_name, exc)
            return None

    def _record_usage(self, slot_name: str, label: str, meta: dict[str, str],
                      usage: dict[str, float] | None, lease=None) -> dict[str, float] | None:
        """One JSON line per job in state_dir/usage.jsonl (root-only): what libvirt says the
        VM used, beside what the batch system accounted (README, job path); returns it.

        With the job's lease: its cores and memory, and the wall time over which the CPU time
        was spent (docs/accounting.md): from the lease's start for a VM booted for the job
        (its boot is the job's), from the bind for a warm spare (its idle use is taken off)."""
        if usage is None:
            return None
        if lease is not None and lease.job_label == label:
            since = float(meta.get(BOUND_AT) or lease.created)
            usage = {**usage, "cores": float(lease.vcpus), "memory_mib": float(lease.memory_mib),
                     "wall_seconds": max(0.0, time.time() - since)}
        if "cpu_seconds_at_bind" in meta:  # a warm spare: what it used idle is not the job's
            idle = {k: float(meta.get(f"{k}_at_bind", 0)) for k in IDLE_FIGURES}
            usage = {**usage, **{k: max(0.0, usage.get(k, 0.0) - v) for k, v in idle.items()},
                     "spare_cpu_seconds": idle["cpu_seconds"]}
        record = {"time": time.time(), "job": label, "slot": slot_name,
                  "owner": meta.get("owner", ""), "image": meta.get("image", ""), **usage}
        append_line(self.cfg.state_dir / "usage.jsonl", json.dumps(record, sort_keys=True))
        log.info("job %s slot %s: VM used %.2f s CPU, peak RSS %.0f KiB", label, slot_name,
                 usage["cpu_seconds"], usage.get("peak_rss_kib", usage["rss_kib"]))
        return usage
