"""Prometheus metrics on real jobs: jobs through the real gridengine cell, each counter scraped
from a real node_exporter on loopback moved by exactly them (the rest: tests/unit/test_metrics.py).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support import free_port, require
from tests.support.prometheus import LABEL, SAMPLE, value
from tests.support.sgecell import (
    BROKEN_VOS,
    close_vm_cell,
    import_broken_image,
    open_vm_cell,
    wait_done,
)
from vmimagemanager.audit import read_history
from vmimagemanager.images import ImageStore

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
