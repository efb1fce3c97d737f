"""Chaos run through the real gridengine cell: jobs while faults are injected at random.

N jobs (atlas001..3, cms001..3, each sleeping a few seconds in its VM) go to a node with S VM
slots while, at a fixed seed, every few seconds one fault hits: a running job's VM is destroyed
(virsh destroy), a job is deleted (qdel), a prolog is SIGKILLed while its VM boots, or libvirtd is
restarted. `vmimagemanager reconcile` runs every 30 s, as its systemd timer does on a node.
Reports: jobs lost (neither finished, nor deleted, nor held with a reason: must be 0), samples
with the queue instance in E (must be 0), leftovers 60 s after the last job (must be 0), and the
jobs that ended with a failure status, with the reason from their .e file.
Usage: python -m benchmarks.chaos [--jobs 100] [--slots 2] [--seed 11]    (from the tree's top)
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import REPO, report
from benchmarks.sge_stress import setup, teardown
from tests.support import THIS_HOST
from tests.support.sgecell import final_records, job_state, sge

QUEUE = "vmbench.q"
PAYLOAD = """#!/bin/sh
echo "first $(cat /etc/grid-middleware-release)"
sleep ${SLEEP:-0}
echo done
"""
FAULTS = ("destroy", "qdel", "prolog-kill", "libvirtd-restart")


def virsh(*args: str) -> str:
    return subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True,
                          text=True).stdout


def inject(kind: str, rnd: random.Random, cfg, jobs: dict, deleted: set) -> str:
    from vmimagemanager.leases import LeaseStore

    leases = LeaseStore(cfg.leases_db).all()
    if kind == "destroy":
        running = [lease for lease in leases if str(lease.state) == "running"]
        if not running:
            return ""
        lease = rnd.choice(running)
        virsh("destroy", f"vmim-{lease.slot}")
        return f"destroyed the VM of job {lease.job_label}"
    if kind == "qdel":
        alive = [j for j in jobs if j not in deleted and job_state(j)]
        if not alive:
            return ""
        job = rnd.choice(alive)
        sge("qdel", job, check=False)
        deleted.add(job)
        return f"qdel {job} ({job_state(job) or 'gone'})"
    if kind == "prolog-kill":
        booting = [lease for lease in leases if str(lease.state) in ("preparing", "booting")]
        if not booting:
            return ""
        lease = rnd.choice(booting)
        try:
            os.kill(lease.pid, signal.SIGKILL)
        except ProcessLookupError:
            return ""
        return f"SIGKILLed the prolog of job {lease.job_label}"
    subprocess.run(["pkill", *THIS_HOST, "-x", "libvirtd"], check=False)
    while subprocess.run(["pgrep", *THIS_HOST, "-x", "libvirtd"],
                         capture_output=True).returncode == 0:
        time.sleep(0.2)
    subprocess.run(["bash", str(REPO / "harness/libvirt-up.sh")], check=True,
                   capture_output=True)
    return "restarted libvirtd"


def reason(out: Path) -> str:
    """The job's last vmimagemanager line (earlier ones may be of attempts rescheduled)."""
    text = out.read_text(errors="replace") if out.exists() else ""
    return ([line for line in text.splitlines() if line.startswith("vmimagemanager")]
            or [""])[-1]


def states() -> dict[str, str]:
    """job id -> qstat state, for every job in the cell (one qstat a round)."""
    out = sge("qstat", "-u", "*", check=False)
    return {f[0]: f[4] for line in out.splitlines()[2:] if len(f := line.split()) > 4}


def queue_in_error() -> bool:
    out = sge("qstat", "-f", "-q", QUEUE, check=False)
    return any(len(f := line.split()) > 5 and "E" in f[5]
               for line in out.splitlines() if line.startswith(f"{QUEUE}@"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--timeout", type=float, default=5400)
    args = parser.parse_args()
    rnd = random.Random(args.seed)
    base, path, cfg, cli, _ = setup(args.slots)
    script = base / "chaos.sh"
    script.write_text(PAYLOAD)
    os.chmod(script, 0o755)
    users = ["atlas001", "atlas002", "atlas003", "cms001", "cms002", "cms003"]
    jobs: dict[str, tuple[str, Path]] = {}
    deleted: set[str] = set()
    injected: list[tuple[float, str, str]] = []
    e_samples = samples = 0
    from vmimagemanager.leases import LeaseStore

    try:
        started = time.time()
        for n in range(args.jobs):
            user = users[n % len(users)]
            out = Path(f"/home/{user}/vmim-chaos-{n}.out")
            out.unlink(missing_ok=True)
            job = sge("qsub", "-terse", "-q", QUEUE, "-o", str(out), "-j", "y", "-v",
                      f"SLEEP={rnd.randint(0, 10)}", str(script), user=user).strip()
            jobs[job] = (user, out)
        next_fault = time.time() + rnd.uniform(5, 15)
        next_reconcile = time.time() + 30
        while any(j in (current := states()) for j in jobs):
            now = time.time()
            if now >= next_fault:
                kind = rnd.choice(FAULTS)
                what = inject(kind, rnd, cfg, jobs, deleted)
                if what:
                    injected.append((round(now - started, 1), kind, what))
                    print(f"{now - started:7.1f}s {what}", flush=True)
                next_fault = now + rnd.uniform(5, 15)
            if now >= next_reconcile:  # what vmimagemanager-reconcile.timer does on a node
                subprocess.run([cli, "--config", str(path), "reconcile"], capture_output=True)
                next_reconcile = now + 30
            samples += 1
            e_samples += queue_in_error()
            held = [j for j in jobs if "E" in current.get(j, "")]
            for job in held:  # held with a reason (visible): count it, then let it go
                print(f"job {job} held: {reason(jobs[job][1])}", flush=True)
                sge("qdel", job, check=False)
                deleted.add(job)
            if now - started > args.timeout:
                sys.exit("timeout")
            time.sleep(2)
        elapsed = time.time() - started
        finished, failed, lost = 0, [], []
        for job, (_user, out) in jobs.items():
            records = final_records(job)
            if records and records[-1].get("exit_status") == "0" and job not in deleted:
                finished += 1
            elif records or job in deleted:
                if job not in deleted:
                    failed.append({"job": job, "exit_status": records[-1].get("exit_status"),
                                   "reason": reason(out)})
            else:
                lost.append(job)
        deadline = time.time() + 60
        while time.time() < deadline:
            left = {"leases": len(LeaseStore(cfg.leases_db).all()),
                    "domains": len([d for d in virsh("list", "--name").split()
                                    if d in [s.domain_name for s in cfg.slots]]),
                    "overlay files": len(list(cfg.overlay_dir.iterdir())),
                    "contexts": len(list((cfg.run_dir / "jobs").iterdir()))}
            if not any(left.values()):
                break
            time.sleep(2)
        for _, out in jobs.values():
            out.unlink(missing_ok=True)
    finally:
        teardown(base, path, cli)
    kinds = {k: sum(1 for _, kind, _ in injected if kind == k) for k in FAULTS}
    row = {"jobs": args.jobs, "seed": args.seed, "elapsed s": elapsed,
           "faults injected": len(injected), "finished ok": finished,
           "deleted (qdel)": len(deleted), "ended failed": len(failed), "lost": len(lost),
           "E samples": e_samples, "samples": samples,
           **{f"leftover {k}": v for k, v in left.items()}}
    report("chaos", [row], list(row), {"faults": injected, "fault kinds": kinds,
                                       "failed": failed, "lost": lost})


if __name__ == "__main__":
    main()
