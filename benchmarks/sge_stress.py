"""Start latency and a stress run through the real gridengine cell.

latency: one job at a time, cold boot: qsub -> the payload's first output line in the job's .o
file (polled from the host every 50 ms), and prolog start (qacct start_time) -> that line.
stress: N jobs submitted at once by two VOs (atlas001..3, cms001..3) to a node with S VM slots:
every job must finish with the right VO's image and its own exit status; reports double leases
(slots held by two jobs at once, sampled), leftovers, throughput next to the bound set by boot +
teardown time per slot, and the largest starter RSS seen.
Usage: python -m benchmarks.sge_stress latency [--jobs 3] | stress [--jobs 100] [--slots 2]
       (from the tree's top)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import REPO, report, scratch_config
from benchmarks.timeline import LeaseSampler, write_png
from tests.support.sgecell import SGE_ENV, final_records, job_state, sge

QUEUE = "vmbench.q"
PAYLOAD = """#!/bin/sh
echo "first $(cat /etc/grid-middleware-release)"
sleep "${SLEEP:-0}"
exit $((JOB_ID % 7))
"""


def finished(job_id: str) -> dict[str, str]:
    """The job's qacct record once it has one (empty before)."""
    records = final_records(job_id)
    return records[-1] if records else {}


def submit(user: str, script: Path, tag: str, sleep: float = 0) -> tuple[str, Path]:
    """Submit the payload as `user`; it sleeps `sleep` seconds after its first line (a job
    waiting on I/O: its slot is taken, the node's CPU is not)."""
    out = Path(f"/home/{user}/vmim-bench-{tag}.out")
    out.unlink(missing_ok=True)
    job = sge("qsub", "-terse", "-q", QUEUE, "-o", str(out), "-j", "y", "-v", f"SLEEP={sleep}",
              str(script), user=user).strip()
    return job, out


def setup(slots: int, extra: dict | None = None, overlay_tmpfs_mib: int = 0):
    for script in ("libvirt-up.sh", "pool-accounts.sh"):
        subprocess.run(["bash", str(REPO / "harness" / script)], check=True)
    subprocess.run(["bash", str(REPO / "harness/sge-cell.sh"), "up"], check=True)
    base, path, cfg = scratch_config(slots, prefix=f"bn{os.getpid()}s", extra=extra,
                                     overlay_tmpfs_mib=overlay_tmpfs_mib)
    cli = str(Path(sys.executable).parent / "vmimagemanager")
    subprocess.run([cli, "--config", str(path), "sge", "install-queue", "--queue", QUEUE,
                    "--wrapper-dir", str(base / "libexec")], check=True,
                   env={**os.environ, **SGE_ENV})
    script = base / "payload.sh"
    script.write_text(PAYLOAD)
    os.chmod(script, 0o755)
    return base, path, cfg, cli, script


def teardown(base: Path, path: Path, cli: str) -> None:
    sge("qconf", "-dq", QUEUE, check=False)
    subprocess.run([cli, "--config", str(path), "reconcile"], capture_output=True)
    subprocess.run(["umount", "-l", str(base / "overlays")], capture_output=True)
    shutil.rmtree(base, ignore_errors=True)


def latency(args) -> None:
    base, path, cfg, cli, script = setup(1)
    rows = []
    try:
        for n in range(args.jobs):
            submitted = time.time()
            job, out = submit("atlas001", script, f"lat{n}")
            dispatched = None  # first time qstat shows the job transferring/running: prolog
            while not (out.exists() and out.read_text().startswith("first")):
                if dispatched is None and job_state(job) in ("t", "r"):
                    dispatched = time.time()
                time.sleep(0.05)
            first_line = time.time()
            while not finished(job).get("exit_status"):
                time.sleep(0.5)
            out.unlink(missing_ok=True)  # nothing left in the pool account's home
            rows.append({"job": job, "qsub -> first output s": first_line - submitted,
                         "dispatch (prolog start) -> first output s":
                         first_line - (dispatched or submitted)})
    finally:
        teardown(base, path, cli)
    report("start_latency", rows, ["job", "qsub -> first output s",
                                   "dispatch (prolog start) -> first output s"])


def run_jobs(cfg, script: Path, count: int, timeout: float, tag: str = "st",
             sleep: float = 0) -> dict:
    """Submit `count` jobs at once (atlas001-3, cms001-3 in turn), wait for all; what happened:
    elapsed time, wrong results, double-lease samples, the largest starter RSS, how busy the
    node's CPUs were, and the slots' lease states sampled every 0.2 s ("segments", for the
    timeline)."""
    before = cpu_ticks()
    with LeaseSampler(cfg.leases_db) as sampler:
        result = _run_jobs(cfg, script, count, timeout, tag, sleep)
    busy, total = (after - first for after, first in zip(cpu_ticks(), before, strict=True))
    result["node CPU busy %"] = 100 * busy / total
    result["segments"] = sampler.segments()
    return result


def listed_jobs() -> set[str]:
    """Ids of the jobs qstat lists (pending, running, held): not finished."""
    return {fields[0] for line in sge("qstat", "-u", "*").splitlines()
            if (fields := line.split()) and fields[0].isdigit()}


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole node since boot (/proc/stat; idle and iowait are
    not busy)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields) - fields[3] - fields[4], sum(fields)


def _run_jobs(cfg, script: Path, count: int, timeout: float, tag: str, sleep: float) -> dict:
    from vmimagemanager.leases import LeaseStore

    users = ["atlas001", "atlas002", "atlas003", "cms001", "cms002", "cms003"]
    jobs = {}
    max_rss_kib, double, samples = 0, 0, 0
    started = time.time()
    for n in range(count):
        user = users[n % len(users)]
        job, out = submit(user, script, f"{tag}{n}", sleep)
        jobs[job] = (user, out)
    pending = set(jobs)
    while pending:
        # qacct parses the whole accounting file: only for jobs qstat no longer lists (one
        # qacct per pending job every round cost the node a core, more the longer the run)
        listed = listed_jobs()
        for job in [job for job in pending if job not in listed]:
            if finished(job).get("exit_status") is not None:
                pending.discard(job)
        for pid in subprocess.run(["pgrep", "-f", "vmim-sge-starter"], capture_output=True,
                                  text=True).stdout.split():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    max_rss_kib = max(max_rss_kib, int(line.split()[1]))
        leases = [lease for lease in LeaseStore(cfg.leases_db).all() if not lease.is_spare]
        samples += 1
        if len({lease.slot for lease in leases}) != len(leases) or \
                len({lease.job_label for lease in leases}) != len(leases):
            double += 1
        if time.time() - started > timeout:
            sys.exit(f"timeout: {len(pending)} jobs unfinished")
        time.sleep(2)
    elapsed = time.time() - started
    wrong = []
    for job, (user, out) in jobs.items():
        rec = finished(job)
        vo = "atlas" if user.startswith("atlas") else "cms"
        text = out.read_text() if out.exists() else ""
        if not text.startswith(f"first VO={vo} ") or rec["exit_status"] != str(int(job) % 7):
            wrong.append((job, user, rec.get("exit_status"), text[:80]))
        out.unlink(missing_ok=True)
    return {"jobs": count, "elapsed s": elapsed, "jobs/min": 60 * count / elapsed,
            "wrong": wrong, "double-lease samples": double, "samples": samples,
            "max starter RSS MiB": max_rss_kib / 1024}


def leftovers(cfg) -> dict[str, int]:
    from vmimagemanager.leases import LeaseStore

    jobs = cfg.run_dir / "jobs"
    return {
        "leases": len(LeaseStore(cfg.leases_db).all()),
        "overlays": len(list(cfg.overlay_dir.iterdir())),
        "contexts": len(list(jobs.iterdir())) if jobs.is_dir() else 0,
        "domains": len([d for d in sge("virsh", "list", "--name").split()
                        if d in [s.domain_name for s in cfg.slots]]),
    }


def stress(args) -> None:
    base, path, cfg, cli, script = setup(args.slots)
    try:
        result = run_jobs(cfg, script, args.jobs, args.timeout)
        left = leftovers(cfg)
    finally:
        teardown(base, path, cli)
    segments = result.pop("segments")
    boot, destroy = per_job_seconds(segments)
    per_job_vm = args.vm_seconds or (boot + destroy)
    bound = 60 * args.slots / per_job_vm
    wrong = result.pop("wrong")
    row = {**result, "slots": args.slots, "median boot s": boot, "median teardown s": destroy,
           "bound jobs/min": bound, "of bound": result["jobs/min"] / bound, "wrong": len(wrong),
           **{f"leftover {k}": v for k, v in left.items()}}
    report("stress", [row], list(row), {"wrong_jobs": wrong, "segments": segments})
    png = REPO / "benchmarks" / "results" / "stress-timeline.png"
    write_png(png, segments)
    print(f"(timeline: {png.relative_to(REPO)})")


def per_job_seconds(segments: list[dict]) -> tuple[float, float]:
    """Median seconds per job a slot spends booting (preparing + booting) and tearing down,
    from the sampled lease states: the per-slot cost that bounds the throughput."""
    import statistics

    boot: dict[str, float] = {}
    teardown: dict[str, float] = {}
    for seg in segments:
        into = boot if seg["state"] in ("preparing", "booting") else \
            teardown if seg["state"] == "tearing-down" else None
        if into is not None:
            into[seg["job"]] = into.get(seg["job"], 0.0) + seg["end"] - seg["start"]
    return (statistics.median(boot.values()) if boot else 0.0,
            statistics.median(teardown.values()) if teardown else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("latency")
    p.add_argument("--jobs", type=int, default=3)
    p = sub.add_parser("stress")
    p.add_argument("--jobs", type=int, default=100)
    p.add_argument("--slots", type=int, default=2)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--vm-seconds", type=float, default=None,
                   help="boot + teardown seconds per job for the bound (default: the medians "
                        "sampled in this run)")
    args = parser.parse_args()
    (latency if args.mode == "latency" else stress)(args)


if __name__ == "__main__":
    main()
