"""Warm spares against the cold path, through the real gridengine cell, in one run.

One node: `--job-slots` queue slots, one VM slot more per spare (`--spares` each for atlas and
cms), the agent started and stopped with harness/agent.sh. Both paths run on the same machine in
the same run:
  latency: jobs one at a time (cold: agent stopped, no spare; warm: a spare of the job's image
           ready). Per job: the prolog's wall time (the audit trail's start event: from the hook's
           process start, interpreter included) and qsub -> the payload's first output line.
  stress:  --jobs jobs at once from atlas001-3 and cms001-3, cold then warm, for each payload of
           --payloads (seconds the job sleeps after its first line: 0 is a job that is all
           start and end, so every job is one TCG boot of CPU and the node's 2 cores bound both
           paths; a job that waits on I/O holds its slot, not the CPU): throughput, how busy
           the node's CPUs were, wrong results, double leases (sampled), leftovers after the
           agent stopped and the spares were retired.
  idle:    what an idle spare costs: its QEMU's resident memory and CPU % over --idle-seconds.
Usage: python -m benchmarks.spares [--jobs 100] [--latency-jobs 3] [--job-slots 2] [--spares 2]
                                  [--payloads 0,5] [--idle-seconds 60] [--shared-home]
                                  [--latency-only]    (from the tree's top)
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

from benchmarks.common import REPO, build_images, report
from benchmarks.sge_stress import PAYLOAD, QUEUE, finished, leftovers, run_jobs, submit
from benchmarks.timeline import write_png
from tests.support import import_test_images, make_base_dir, write_config
from tests.support.sgecell import SGE_ENV, sge

AGENT = str(REPO / "harness/agent.sh")


def setup(job_slots: int, spares: int, shared_home: bool):
    from vmimagemanager.config import load_config

    for script in ("libvirt-up.sh", "pool-accounts.sh"):
        subprocess.run(["bash", str(REPO / "harness" / script)], check=True)
    subprocess.run(["bash", str(REPO / "harness/sge-cell.sh"), "up"], check=True)
    base = make_base_dir("vmim-bench-")
    path = write_config(base, job_slots + 2 * spares, prefix=f"bw{os.getpid()}s", extra={
        "boot_timeout": 180, "spares": {"vos": {"atlas": spares, "cms": spares},
                                        "interval": 1},
        # the owners' homes through their own virtiofsd: hot-plugged into a spare at bind
        **({"shared_paths": [{"path": "/home", "mode": "hypervisor"}]} if shared_home else {})})
    cfg = load_config(str(path))
    import_test_images(cfg, build_images(), names=("atlas", "cms"))
    cli = str(Path(sys.executable).parent / "vmimagemanager")
    subprocess.run([cli, "--config", str(path), "sge", "install-queue", "--queue", QUEUE,
                    "--slots", str(job_slots), "--wrapper-dir", str(base / "libexec")],
                   check=True, env={**os.environ, **SGE_ENV})
    script = base / "payload.sh"
    script.write_text(PAYLOAD)
    os.chmod(script, 0o755)
    return base, path, cfg, cli, script


def agent(action: str, path: Path, cli: str) -> None:
    subprocess.run(["bash", AGENT, action, str(path)], check=True,
                   env={**os.environ, "VMIM_VENV": str(Path(cli).parent.parent)})
    if action == "stop":
        subprocess.run([cli, "--config", str(path), "spares", "--retire"], check=True,
                       capture_output=True)


def ready_spares(cli: str, path: Path) -> dict[str, int]:
    out = subprocess.run([cli, "--config", str(path), "spares", "--json"], check=True,
                         capture_output=True, text=True).stdout
    ready: dict[str, int] = {}
    for row in json.loads(out)["spares"]:
        if row["state"] == "spare":
            ready[row["image"]] = ready.get(row["image"], 0) + 1
    return ready


def wait_spares(cli: str, path: Path, count: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while ready_spares(cli, path) != {"atlas": count, "cms": count}:
        if time.monotonic() > deadline:
            sys.exit("no spares ready after 5 minutes; see /var/log/vmimagemanager-agent.*.log")
        time.sleep(0.5)


def starts(cfg) -> dict[str, dict]:
    from vmimagemanager.audit import vm_starts

    return vm_starts(cfg)


def latency(cfg, script: Path, path: Path, cli: str, jobs: int, warm: bool,
            spares: int) -> list[dict]:
    rows = []
    for n in range(jobs):
        if warm:
            wait_spares(cli, path, spares)
        submitted = time.time()
        job, out = submit("atlas001", script, f"lat{'w' if warm else 'c'}{n}")
        while not (out.exists() and out.read_text().startswith("first")):
            time.sleep(0.05)
        first = time.time()
        while not finished(job).get("exit_status"):
            time.sleep(0.5)
        out.unlink(missing_ok=True)
        rec = starts(cfg)[f"{job}.0"]
        if bool(rec.get("spare")) != warm:
            sys.exit(f"job {job}: expected the {'warm' if warm else 'cold'} path, got {rec}")
        rows.append({"path": "warm spare" if warm else "cold boot", "job": job,
                     "prolog s": rec["prolog_seconds"],
                     "qsub -> first output s": first - submitted})
    return rows


def idle_cost(cfg, seconds: float) -> list[dict]:
    """RSS and CPU % of each idle spare's QEMU over `seconds`."""
    ticks = os.sysconf("SC_CLK_TCK")
    pids = {}
    for slot in cfg.slots:
        pidfile = Path(f"/run/libvirt/qemu/{slot.domain_name}.pid")
        if pidfile.exists():
            pids[slot.name] = int(pidfile.read_text())

    def cpu(pid: int) -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / ticks

    before = {slot: cpu(pid) for slot, pid in pids.items()}
    time.sleep(seconds)
    rows = []
    for slot, pid in pids.items():
        rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text()
                   .splitlines() if line.startswith("VmRSS:"))
        rows.append({"slot": slot, "QEMU RSS MiB": rss / 1024,
                     "CPU % (of one core)": 100 * (cpu(pid) - before[slot]) / seconds})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--latency-jobs", type=int, default=3)
    parser.add_argument("--job-slots", type=int, default=2)
    parser.add_argument("--spares", type=int, default=2, help="spares each for atlas and cms")
    parser.add_argument("--payloads", type=lambda v: [float(x) for x in v.split(",")],
                        default=[0.0, 5.0], help="seconds each job sleeps, comma-separated")
    parser.add_argument("--idle-seconds", type=float, default=60)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--shared-home", action="store_true",
                        help="jobs see their owner's home (shared_paths /home, hypervisor)")
    parser.add_argument("--latency-only", action="store_true",
                        help="the latency part alone (spares_latency_home or _nohome.json)")
    args = parser.parse_args()
    base, path, cfg, cli, script = setup(args.job_slots, args.spares, args.shared_home)
    # the full run's latency file stays apart from a quick comparison's
    suffix = "_home" if args.shared_home else ("_nohome" if args.latency_only else "")
    try:
        lat = latency(cfg, script, path, cli, args.latency_jobs, False, args.spares)
        agent("start", path, cli)
        lat += latency(cfg, script, path, cli, args.latency_jobs, True, args.spares)
        if args.latency_only:
            agent("stop", path, cli)
            args.payloads = []
            idle = []
        else:
            wait_spares(cli, path, args.spares)
            idle = idle_cost(cfg, args.idle_seconds)
            agent("stop", path, cli)
        runs = []
        for sleep in args.payloads:
            for warm in (False, True):
                if warm:
                    agent("start", path, cli)
                    wait_spares(cli, path, args.spares)
                on_spare = sum(1 for rec in starts(cfg).values() if rec.get("spare"))
                result = run_jobs(cfg, script, args.jobs, args.timeout,
                                  f"{'w' if warm else 'c'}{sleep:g}-", sleep)
                write_png(REPO / "benchmarks" / "results" / f"spares-{'warm' if warm else 'cold'}"
                          f"-payload{sleep:g}-timeline.png", result.pop("segments"))
                if warm:
                    agent("stop", path, cli)
                on_spare = sum(1 for rec in starts(cfg).values() if rec.get("spare")) - on_spare
                runs.append({"payload s": sleep, "path": "warm spares" if warm else "cold boot",
                             **result, "wrong": len(result["wrong"]), "jobs on a spare": on_spare,
                             **{f"leftover {k}": v for k, v in leftovers(cfg).items()}})
    finally:
        subprocess.run(["bash", AGENT, "stop", str(path)], capture_output=True)
        subprocess.run([cli, "--config", str(path), "spares", "--retire"], capture_output=True)
        sge("qconf", "-dq", QUEUE, check=False)
        subprocess.run([cli, "--config", str(path), "reconcile"], capture_output=True)
        subprocess.run(["rm", "-rf", str(base)])

    def median(p: str, key: str) -> float:
        return statistics.median(r[key] for r in lat if r["path"] == p)

    summary = {
        "prolog s, cold (median)": median("cold boot", "prolog s"),
        "prolog s, warm (median)": median("warm spare", "prolog s"),
        "qsub -> first output s, cold (median)": median("cold boot", "qsub -> first output s"),
        "qsub -> first output s, warm (median)": median("warm spare", "qsub -> first output s"),
        **{f"stress throughput warm / cold, payload {cold['payload s']:g} s":
           warm["jobs/min"] / cold["jobs/min"] for cold, warm in zip(runs[::2], runs[1::2],
                                                                      strict=True)},
    }
    report(f"spares_latency{suffix}", lat, ["path", "job", "prolog s", "qsub -> first output s"],
           {"shared_home": args.shared_home})
    if runs:
        report("spares_idle_cost", idle, ["slot", "QEMU RSS MiB", "CPU % (of one core)"])
        report("spares_stress", runs, [k for k in runs[0] if k != "samples"],
               {"summary": summary})
    for key, value in summary.items():
        print(f"{key}: {value:.2f}")


if __name__ == "__main__":
    main()
