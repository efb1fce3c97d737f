"""Prometheus metrics (vmimagemanager/metrics.py): the fold of audit events, the text format,
concurrent writers. Real jobs through the cell scraped from a real node_exporter:
tests/cell/test_metrics.py."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from tests.support import REPO, testdriver
from tests.support.prometheus import parse, value
from vmimagemanager import metrics
from vmimagemanager.audit import read_history, record
from vmimagemanager.images import ImageStore
from vmimagemanager.shape import Shape


def test_each_audit_event_moves_its_counters_once():
    totals: dict = {}
    boot = {"define+start": 0.5, "guest boot (to host key on console)": 2.0,
            "wait for ssh": 0.5}
    events = [
        {"event": "start", "outcome": "ready", "mode": "vm", "vo": "atlas", "image": "sl5",
         "phases": {"lease": 0.01, **boot}, "prolog_seconds": 4.0},
        {"event": "start", "outcome": "ready", "mode": "vm", "vo": "atlas", "image": "sl5",
         "spare": "spare.ab12", "phases": {"lease": 0.01, "bind": 0.3}, "prolog_seconds": 0.6},
        {"event": "start", "outcome": "ready", "mode": "reject", "prolog_seconds": 0.2},
        {"event": "start", "outcome": "retry", "vo": "cms", "image": "sl6",
         "cause": "no_free_slot", "prolog_seconds": 0.3},
        {"event": "start", "outcome": "retry", "vo": "cms", "image": "sl6",
         "cause": "boot_failed", "prolog_seconds": 60.0},
        {"event": "start", "outcome": "ready", "mode": "reject", "vo": "cms", "image": "sl6",
         "failed": "the VM failed to start 2 times", "cause": "boot_failed",
         "prolog_seconds": 61.0},
        {"event": "end", "vo": "atlas", "exit_status": "0", "signal": "0"},
        {"event": "end", "vo": "atlas", "exit_status": "3"},
        {"event": "end", "vo": "cms", "exit_status": "137", "signal": "9"},
        {"event": "spare", "outcome": "ready", "image": "sl5", "phases": boot},
        {"event": "spare", "outcome": "failed", "image": "sl6", "cause": "boot_failed"},
        {"event": "reconcile", "action": "release slot s1 (job 7.0): its process is gone"},
        {"event": "reconcile", "action": "destroy domain vmim-s2: no lease holds it"},
        {"event": "reconcile", "action": "remove orphan file /o/s2.7.0.qcow2"},
        {"event": "reconcile", "action": "remove orphan job context /r/jobs/7.0"},
    ]
    for event in events:
        metrics.fold(totals, event)
    s = parse(metrics.render(totals, {}))
    started, failures = "vmimagemanager_jobs_started_total", \
        "vmimagemanager_job_start_failures_total"
    assert value(s, started, vo="atlas", mode="vm") == 2
    assert value(s, started, vo="", mode="reject") == 1
    assert value(s, started, vo="cms", mode="reject") == 0  # a failed job is not a start
    assert value(s, failures, vo="cms", outcome="retry", cause="no_free_slot") == 1
    assert value(s, failures, vo="cms", outcome="retry", cause="boot_failed") == 1
    assert value(s, failures, vo="cms", outcome="fail", cause="boot_failed") == 1
    assert value(s, "vmimagemanager_boot_failures_total", image="sl6") == 3  # 2 jobs, 1 spare
    finished = "vmimagemanager_jobs_finished_total"
    assert value(s, finished, vo="atlas", status="success") == 1
    assert value(s, finished, vo="atlas", status="failure") == 1
    assert value(s, finished, vo="cms", status="signal") == 1
    assert value(s, "vmimagemanager_vm_starts_total", image="sl5", path="boot") == 1
    assert value(s, "vmimagemanager_vm_starts_total", image="sl5", path="spare") == 1
    # two boots of sl5 (a job's, a spare's), 3 s each; the bound spare's start is no boot
    assert value(s, "vmimagemanager_boot_seconds_count", image="sl5") == 2
    assert value(s, "vmimagemanager_boot_seconds_sum", image="sl5") == 6.0
    assert value(s, "vmimagemanager_boot_seconds_bucket", image="sl5", le="2") == 0
    assert value(s, "vmimagemanager_boot_seconds_bucket", image="sl5", le="5") == 2
    assert value(s, "vmimagemanager_boot_seconds_bucket", image="sl5", le="+Inf") == 2
    prolog = "vmimagemanager_prolog_seconds"
    assert value(s, f"{prolog}_count", path="boot") == 1
    assert value(s, f"{prolog}_count", path="spare") == 1
    assert value(s, f"{prolog}_bucket", path="spare", le="1") == 1
    assert value(s, f"{prolog}_count", path="none") == 4
    assert value(s, f"{prolog}_sum", path="none") == pytest.approx(121.5)
    for kind in ("release_lease", "destroy_domain", "remove_file", "remove_context"):
        assert value(s, "vmimagemanager_reconcile_actions_total", action=kind) == 1


def test_histogram_buckets_are_cumulative_and_end_at_the_count():
    totals: dict = {}
    for seconds in (0.05, 0.3, 0.3, 7.0, 400.0):
        metrics.fold(totals, {"event": "start", "outcome": "retry", "prolog_seconds": seconds})
    s = parse(metrics.render(totals, {}))
    name = "vmimagemanager_prolog_seconds_bucket"
    counts = [value(s, name, path="none", le=metrics._number(b))
              for b in metrics.PROLOG_BUCKETS] + [value(s, name, path="none", le="+Inf")]
    assert counts == sorted(counts) and counts[0] == 1 and counts[-1] == 5
    assert counts[-2] == 4  # 400 s is above the last bound


def test_label_values_are_escaped_as_the_text_format_requires():
    totals: dict = {}
    metrics.fold(totals, {"event": "end", "vo": 'we"ird\\vo\nx', "exit_status": "0"})
    text = metrics.render(totals, {})
    assert 'vo="we\\"ird\\\\vo\\nx"' in text
    assert all(line.count("\n") == 0 for line in text.splitlines())


def test_every_metric_is_documented_with_its_type_and_labels():
    doc = (REPO / "docs" / "metrics.md").read_text()
    for family in metrics.FAMILIES:
        row = next((line for line in doc.splitlines()
                    if line.startswith(f"| `{family.name}` |")), "")
        assert f"| {family.kind} |" in row, family.name
        assert all(f"`{label}`" in row for label in family.labels), family.name


def _config(tmp_path: Path, metrics_dir: Path | None):
    settings = {} if metrics_dir is None else {"metrics_dir": str(metrics_dir)}
    cfg = testdriver.node_config(tmp_path, slots=3, first_port=31001,
                                 vos={"atlas": {"image": "sl5", "groups": ["atlas"]}},
                                 spares={"images": {"sl5": 1}}, **settings)
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    return cfg


def test_gauges_come_from_the_leases_and_the_image_store(tmp_path):
    from vmimagemanager.leases import SPARE_JOB_ID, LeaseStore
    from vmimagemanager.states import LeaseState

    out = tmp_path / "textfile"
    out.mkdir()
    cfg = _config(tmp_path, out)
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "1M"], check=True)
    image = ImageStore(cfg.image_dir).import_image("sl5", disk)
    store = LeaseStore(cfg.leases_db)
    job, _ = store.allocate(["s1", "s2", "s3"], "7", "0", "atlas001", "sl5", "atlas",
                            shape=Shape(2, 1000))
    spare, _ = store.allocate(["s1", "s2", "s3"], SPARE_JOB_ID, "ab12", "", "sl5", "atlas")
    for state in (LeaseState.BOOTING, LeaseState.SPARE):
        store.transition(spare.slot, state, spare.job_label)
    store.close()
    path = metrics.update(cfg)
    assert path == out / "vmimagemanager.prom" and oct(path.stat().st_mode & 0o777) == "0o644"
    s = parse(path.read_text())
    assert value(s, "vmimagemanager_slots", state="preparing") == 1
    assert value(s, "vmimagemanager_slots", state="spare") == 1
    assert value(s, "vmimagemanager_slots", state="free") == 1
    assert ("vmimagemanager_slots", frozenset({("state", "running")})) in s  # zeros shown
    assert value(s, "vmimagemanager_spares_ready", image="sl5") == 1
    assert value(s, "vmimagemanager_image_info", image="sl5",
                 sha256=image.sha256[image.disk]) == 1
    # the node's budget: the job's 2 cores and the spare's one, each with QEMU's overhead
    used = cfg.budget.used([Shape(2, 1000), Shape(1, 512)])
    assert value(s, "vmimagemanager_vm_cores", state="used") == 3 == used[0]
    assert value(s, "vmimagemanager_vm_cores", state="total") == cfg.budget.cores
    assert value(s, "vmimagemanager_vm_memory_bytes", state="used") == used[1] << 20
    assert value(s, "vmimagemanager_node_in_service") == 1  # no health marker: in service
    assert not (cfg.state_dir / "metrics.json").exists()  # no event yet: no totals
    record(cfg, "end", "7.0", vo="atlas", exit_status="0", cores=2, wall_seconds=10.5)
    assert oct((cfg.state_dir / "metrics.json").stat().st_mode & 0o777) == "0o600"
    s = parse(path.read_text())
    assert value(s, "vmimagemanager_jobs_finished_total", vo="atlas", status="success") == 1
    assert value(s, "vmimagemanager_job_core_seconds_total", vo="atlas") == 21.0
    assert value(s, "vmimagemanager_slots", state="preparing") == 1  # gauges written too


def test_without_metrics_dir_nothing_is_written_and_a_missing_dir_is_named(tmp_path, caplog):
    cfg = _config(tmp_path, None)
    record(cfg, "end", "1.0", exit_status="0")
    assert metrics.update(cfg) is None and not (cfg.state_dir / "metrics.json").exists()
    cfg = replace(cfg, metrics_dir=tmp_path / "absent")
    record(cfg, "end", "1.0", exit_status="0")  # the event is kept, the job goes on
    assert "metrics_dir" in caplog.text and "prometheus-node-exporter" in caplog.text
    assert len(read_history(cfg)) == 2


def _write_events(cfg_dir: str, count: int) -> None:
    cfg = _config(Path(cfg_dir), Path(cfg_dir) / "textfile")
    for i in range(count):
        record(cfg, "end", f"{os.getpid()}.{i}", vo="atlas", exit_status="0")


def test_concurrent_writers_lose_no_event_and_the_file_is_never_seen_half_written(tmp_path):
    (tmp_path / "textfile").mkdir()
    cfg = _config(tmp_path, tmp_path / "textfile")
    target = cfg.metrics_dir / metrics.METRICS_FILE
    writers, each = 6, 30
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=_write_events, args=(str(tmp_path), each))
             for _ in range(writers)]
    for proc in procs:
        proc.start()
    reads, last = 0, 0.0
    while any(p.is_alive() for p in procs) or reads == 0:
        try:
            text = target.read_text()
        except FileNotFoundError:
            continue
        reads += 1
        s = parse(text)  # whole: every line a sample of a declared family
        assert text.endswith("\n") and "# TYPE vmimagemanager_image_info gauge" in text
        now = value(s, "vmimagemanager_jobs_finished_total", vo="atlas", status="success")
        assert now >= last, "a writer put an older total over a newer one"
        last = now
    for proc in procs:
        proc.join()
        assert proc.exitcode == 0
    final = parse(target.read_text())
    assert value(final, "vmimagemanager_jobs_finished_total", vo="atlas",
                 status="success") == writers * each
    assert reads > 1
    assert not [p for p in cfg.metrics_dir.iterdir() if p.name != metrics.METRICS_FILE]
