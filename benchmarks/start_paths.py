"""The three ways a job's VM starts, side by side in one run through the real gridengine cell:
cold boot, restored from the image's memory snapshot (snapshot_starts), bound warm spare.

One node, one configuration file switched between the paths as an admin would (the hooks read
it at every job): cold (neither), snapshot (snapshot_starts; the snapshots of atlas and cms
made first with `snapshots make`; no VM runs between jobs), spare (one spare each of atlas and
cms, kept by the agent, started and stopped with harness/agent.sh).
  latency: --latency-jobs jobs one at a time on each path. Per job: the prolog's wall time (the
           audit trail's start event: from the hook's process start), qsub -> the payload's
           first output line, the QEMU CPU-seconds the job's VM used in all (its usage record:
           start, the payload's first line, end; a spare's idle seconds are not the job's), and
           the node's CPU-seconds from qsub until the node is as before (job ended, and on the
           spare path the agent's next spare ready: what each job costs the node).
  stress:  --jobs jobs at once (atlas001-3, cms001-3; payload 0 s: all start and end), cold,
           then from snapshots: throughput, wrong results, double leases, leftovers, running
           VMs once done, and a timeline PNG each (restore in its own colour).
Usage: python -m benchmarks.start_paths [--latency-jobs 3] [--jobs 100] [--job-slots 2]
                                       [--stress 'cold boot,snapshot'] [--latency-paths ...]
                                       (from the tree's top)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from benchmarks.common import REPO, report
from benchmarks.sge_stress import QUEUE, cpu_ticks, finished, leftovers, run_jobs, submit
from benchmarks.spares import agent, setup, wait_spares
from benchmarks.timeline import write_png
from tests.support.sgecell import sge

PATHS = {"cold boot": {}, "snapshot": {"snapshot_starts": True},
         "warm spare": {"spares": {"vos": {"atlas": 1, "cms": 1}, "interval": 1}}}


def switch(path: Path, base_data: dict, name: str) -> None:
    path.write_text(yaml.safe_dump({**base_data, **PATHS[name]}, sort_keys=False))


def usage_of(cfg, label: str) -> float:
    for line in (cfg.state_dir / "usage.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("job") == label:
            return float(rec.get("cpu_seconds", "nan"))  # a spare's idle use taken off
    return float("nan")


def latency(cfg, script: Path, path: Path, cli: str, name: str, jobs: int) -> list[dict]:
    from vmimagemanager.audit import vm_starts

    rows, tick = [], os.sysconf("SC_CLK_TCK")
    for n in range(jobs):
        if name == "warm spare":
            wait_spares(cli, path, 1)
        busy0 = cpu_ticks()[0]
        submitted = time.time()
        job, out = submit("atlas001", script, f"lat{name[:4]}{n}")
        while not (out.exists() and out.read_text().startswith("first")):
            time.sleep(0.05)
        first = time.time()
        while not finished(job).get("exit_status"):
            time.sleep(0.5)
        if name == "warm spare":
            wait_spares(cli, path, 1)
        node_cpu = (cpu_ticks()[0] - busy0) / tick
        out.unlink(missing_ok=True)
        rec = vm_starts(cfg).get(f"{job}.0")
        if rec is None:
            from vmimagemanager.audit import read_history

            sys.exit(f"job {job}: no VM start in the audit trail: {read_history(cfg, job)}")
        got = "warm spare" if rec.get("spare") else "snapshot" if rec.get("snapshot") else \
            "cold boot"
        if got != name:
            sys.exit(f"job {job}: expected the {name} path, got {rec}")
        rows.append({"path": name, "job": job, "prolog s": rec["prolog_seconds"],
                     "qsub -> first output s": first - submitted,
                     "VM's QEMU CPU s": usage_of(cfg, f"{job}.0"),
                     "node CPU s per job": node_cpu})
    return rows


def make_snapshots(cli: str, path: Path) -> dict:
    sizes = {}
    for image in ("atlas", "cms"):
        r = subprocess.run([cli, "--config", str(path), "snapshots", "make", image],
                           check=True, capture_output=True, text=True)
        sizes[image] = r.stdout.strip()
    return sizes


def stress(cfg, script: Path, name: str, jobs: int, timeout: float) -> dict:
    from vmimagemanager.audit import vm_starts

    result = run_jobs(cfg, script, jobs, timeout, f"s{name[:4]}-")
    restored = {label for label, rec in vm_starts(cfg).items() if rec.get("snapshot")}
    segments = [{**seg, "state": "restoring"} if seg["job"] in restored and seg["state"] in (
        "preparing", "booting") else seg for seg in result.pop("segments")]
    png = REPO / "benchmarks" / "results" / f"start-paths-{name.replace(' ', '-')}-timeline.png"
    write_png(png, segments)
    left = leftovers(cfg)
    left["overlays"] -= 1 if (cfg.overlay_dir / "snapshots").exists() else 0
    return {"path": name, **result, "wrong": len(result["wrong"]), "wrong jobs": result["wrong"],
            "jobs restored": len(restored & {seg["job"] for seg in segments}),
            **{f"leftover {k}": v for k, v in left.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-jobs", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--job-slots", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--stress", default="cold boot,snapshot",
                        help="the paths of the stress run, comma-separated ('' for none)")
    parser.add_argument("--latency-paths", default=",".join(PATHS))
    args = parser.parse_args()
    base, path, cfg, cli, script = setup(args.job_slots, 1, False)  # spares' places too
    base_data = {k: v for k, v in yaml.safe_load(path.read_text()).items() if k != "spares"}
    lat, runs, made = [], [], {}
    try:
        for name in [p for p in args.latency_paths.split(",") if p]:
            switch(path, base_data, name)
            if name == "snapshot":
                made = make_snapshots(cli, path)
            if name == "warm spare":
                agent("start", path, cli)
            lat += latency(cfg, script, path, cli, name, args.latency_jobs)
            if name == "warm spare":
                agent("stop", path, cli)
        for name in [p for p in args.stress.split(",") if p]:
            switch(path, base_data, name)
            if name == "snapshot" and not made:
                made = make_snapshots(cli, path)
            runs.append(stress(cfg, script, name, args.jobs, args.timeout))
    finally:
        subprocess.run(["bash", str(REPO / "harness/agent.sh"), "stop", str(path)],
                       capture_output=True)
        subprocess.run([cli, "--config", str(path), "spares", "--retire"], capture_output=True)
        sge("qconf", "-dq", QUEUE, check=False)
        subprocess.run([cli, "--config", str(path), "reconcile"], capture_output=True)
        subprocess.run(["rm", "-rf", str(base)])

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in lat if r["path"] == name)

    keys = ["prolog s", "qsub -> first output s", "VM's QEMU CPU s", "node CPU s per job"]
    measured = [name for name in PATHS if any(r["path"] == name for r in lat)]
    summary = {f"{key}, {name} (median)": median(name, key) for name in measured for key in keys}
    if {"snapshot", "cold boot"} <= set(measured):
        summary["node CPU per job, snapshot / cold"] = (
            median("snapshot", "node CPU s per job") / median("cold boot", "node CPU s per job"))
    if len(runs) == 2:
        summary["stress throughput snapshot / cold"] = runs[1]["jobs/min"] / runs[0]["jobs/min"]
    report("start_paths", lat, ["path", "job", *keys],
           {"summary": summary, "snapshots made": made, "stress": runs,
            "machine": os.uname().nodename, "date": time.strftime("%Y-%m-%d")})
    for row in runs:
        print({k: v for k, v in row.items() if k != "samples"})
    for key, value in summary.items():
        print(f"{key}: {value:.2f}")


if __name__ == "__main__":
    main()
