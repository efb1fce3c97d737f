"""Prometheus metrics (vmimagemanager/metrics.py): the fold of audit events, the text format,
concurrent writers, and (integration) real jobs through the cell scraped from a real
node_exporter on loopback."""

from __future__ import annotations

import multiprocessing
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import free_port, require
from sgecell import BROKEN_VOS, close_vm_cell, import_broken_image, open_vm_cell, wait_done

from vmimagemanager import metrics
from vmimagemanager.audit import read_history, record
from vmimagemanager.config import parse_config
from vmimagemanager.images import ImageStore

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    """The samples of a text exposition, checked as Prometheus reads it: every sample belongs
    to a family declared by HELP and TYPE lines before it, names follow the conventions."""
    declared: dict[str, str] = {}
    samples = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            declared[name] = kind
            continue
        match = SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name, _, labels, value = match.groups()
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in declared or declared.get(family) == "histogram", f"undeclared: {line}"
        samples[(name, frozenset(LABEL.findall(labels or "")))] = float(value)
    for name, kind in declared.items():
        if name.startswith("vmimagemanager_"):
            assert (kind == "counter") == name.endswith("_total"), name
    return samples


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


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
    doc = (Path(__file__).resolve().parent.parent / "docs" / "metrics.md").read_text()
    for family in metrics.FAMILIES:
        row = next((line for line in doc.splitlines()
                    if line.startswith(f"| `{family.name}` |")), "")
        assert f"| {family.kind} |" in row, family.name
        assert all(f"`{label}`" in row for label in family.labels), family.name


def _config(tmp_path: Path, metrics_dir: Path | None):
    data = {"libvirt_uri": "test:///default", "image_dir": str(tmp_path / "images"),
            "overlay_dir": str(tmp_path / "o"), "state_dir": str(tmp_path / "state"),
            "run_dir": str(tmp_path / "run"),
            "slots": [{"name": f"s{i}", "network": {"type": "user", "ssh_port": 31000 + i}}
                      for i in range(1, 4)],
            "vos": {"atlas": {"image": "sl5", "groups": ["atlas"]}},
            "spares": {"images": {"sl5": 1}}}
    if metrics_dir is not None:
        data["metrics_dir"] = str(metrics_dir)
    cfg = parse_config(data, str(tmp_path / "c.yaml"))
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
    job, _ = store.allocate(["s1", "s2", "s3"], "7", "0", "atlas001", "sl5", "atlas")
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
    assert not (cfg.state_dir / "metrics.json").exists()  # no event yet: no totals
    record(cfg, "end", "7.0", vo="atlas", exit_status="0")
    assert oct((cfg.state_dir / "metrics.json").stat().st_mode & 0o777) == "0o600"
    s = parse(path.read_text())
    assert value(s, "vmimagemanager_jobs_finished_total", vo="atlas", status="success") == 1
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


# -- integration: jobs through the real cell, scraped from the real node_exporter --------------
QUEUE = "vmmet.q"
EXPORTER = "prometheus-node-exporter"


@pytest.fixture(scope="module")
def scraped(libvirt_system, guest_images):
    require(shutil.which(EXPORTER) is not None, f"{EXPORTER} is not installed; run "
            "harness/install-deps.sh")
    textfile = Path(tempfile.mkdtemp(prefix="vmim-met-textfile-"))
    cell = open_vm_cell(QUEUE, "vmim-met-", guest_images, extra={
        "max_boot_attempts": 1, "on_boot_failure": "fail", "metrics_dir": str(textfile),
        "vos": BROKEN_VOS})
    import_broken_image(cell, guest_images)
    port = free_port()
    exporter = subprocess.Popen(
        [EXPORTER, f"--web.listen-address=127.0.0.1:{port}", "--collector.disable-defaults",
         "--collector.textfile", f"--collector.textfile.directory={textfile}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        yield cell, lambda: parse_exporter(url, exporter)
    finally:
        exporter.terminate()
        exporter.wait(10)
        close_vm_cell(cell)
        shutil.rmtree(textfile, ignore_errors=True)


def parse_exporter(url: str, exporter: subprocess.Popen) -> dict:
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                text = response.read().decode()
            break
        except OSError:
            assert exporter.poll() is None, f"node_exporter exited: {exporter.stderr.read()}"
            assert time.monotonic() < deadline, f"node_exporter does not answer on {url}"
            time.sleep(0.2)
    samples = {}
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match and not line.startswith("#"):
            name, _, labels, val = match.groups()
            samples[(name, frozenset(LABEL.findall(labels or "")))] = float(val)
    return samples


def delta(before, after, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@pytest.mark.integration
@pytest.mark.sge
def test_real_jobs_move_the_scraped_counters_by_exactly_themselves(scraped):
    cell, scrape = scraped
    before = scrape()
    assert value(before, "node_textfile_scrape_error") == 0
    exit3 = cell.base / "exit3.sh"
    exit3.write_text("#!/bin/sh\necho in the VM\nexit 3\n")
    exit3.chmod(0o755)
    jobs = {"ok": cell.run_job("met-ok", "atlas001"),
            "three": cell.submit("met-three", "cms001", str(exit3)),
            "rejected": cell.run_job("met-rejected", "dteam001"),
            "broken": cell.run_job("met-broken", "atlas002")}
    records = {name: wait_done(job)[0] for name, job in jobs.items()}
    assert records["ok"]["exit_status"] == "0" and records["three"]["exit_status"] == "3"
    assert records["rejected"]["exit_status"] != "0"
    assert records["broken"]["exit_status"] != "0"
    cell.assert_clean()
    r = cell.cli("reconcile")  # the reconcile timer's round: the gauges are fresh again
    assert r.returncode == 0, r.stderr
    after = scrape()
    assert value(after, "node_textfile_scrape_error") == 0
    started, failed = "vmimagemanager_jobs_started_total", \
        "vmimagemanager_job_start_failures_total"
    assert delta(before, after, started, vo="atlas", mode="vm") == 1
    assert delta(before, after, started, vo="cms", mode="vm") == 1
    assert delta(before, after, started, vo="", mode="reject") == 1
    assert delta(before, after, failed, vo="broken", outcome="fail", cause="boot_failed") == 1
    assert delta(before, after, "vmimagemanager_boot_failures_total", image="broken") == 1
    finished = "vmimagemanager_jobs_finished_total"
    assert delta(before, after, finished, vo="atlas", status="success") == 1
    assert delta(before, after, finished, vo="cms", status="failure") == 1
    assert delta(before, after, finished, vo="", status="failure") == 2  # rejected, broken
    for image in ("atlas", "cms"):
        assert delta(before, after, "vmimagemanager_vm_starts_total", image=image,
                     path="boot") == 1
        assert delta(before, after, "vmimagemanager_boot_seconds_count", image=image) == 1
        assert delta(before, after, "vmimagemanager_boot_seconds_bucket", image=image,
                     le="+Inf") == 1
        assert 0.5 < delta(before, after, "vmimagemanager_boot_seconds_sum", image=image) < 150
    prolog = "vmimagemanager_prolog_seconds_count"
    assert delta(before, after, prolog, path="boot") == 2
    assert delta(before, after, prolog, path="none") == 2
    assert value(after, "vmimagemanager_slots", state="free") == 2
    assert value(after, "vmimagemanager_slots", state="running") == 0
    atlas = ImageStore(cell.cfg.image_dir).get("atlas")
    assert value(after, "vmimagemanager_image_info", image="atlas",
                 sha256=atlas.sha256[atlas.disk]) == 1
    ends = [e for e in read_history(cell.cfg) if e["event"] == "end"]
    assert len(ends) == 4  # the counters are the trail's events, one each
