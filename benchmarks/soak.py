"""Soak run through the real gridengine cell: two VOs' jobs for a while, the agent running, and
random faults, the node's own health included (issue 31).

Jobs of atlas and cms (a few seconds to half a minute each in their VMs) are kept queued for
--minutes while, every 20-60 s (seeded), one fault hits: a VM destroyed, a job deleted, a prolog
SIGKILLed while its VM boots, libvirtd restarted (the chaos list), libvirtd down for 60 s,
overlay_dir full for 60 s, the leases database corrupted (once), the agent SIGKILLed and
started again, an epilog SIGKILLed. The agent runs throughout (harness/agent.sh, `health:
{back_after: 30}`, one warm spare of atlas), as on a node; nothing else cleans up.

Reports: jobs submitted, finished, ended failed (with their reason), deleted, lost (must be 0);
for each node-wide fault (libvirtd down, overlay_dir full) its length and how long the node was
out of service for it (sampled every 2 s: this host's VM queue instance disabled); samples with
the queue instance in E (must be 0); leftovers 120 s after the last job (must be 0).
Usage: python -m benchmarks.soak [--minutes 30] [--slots 2] [--seed 7]   (from the tree's top)
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import subprocess
import time
from pathlib import Path

from benchmarks.chaos import PAYLOAD, inject, queue_in_error, reason, states, virsh
from benchmarks.common import REPO, report
from benchmarks.sge_stress import QUEUE, setup, teardown
from tests.support import THIS_HOST
from tests.support.sgecell import final_records, pids_matching, sge

TIMED = ("libvirtd-down", "overlay-full")  # node-wide, FAULT_SECONDS long
FAULTS = ("destroy", "qdel", "prolog-kill", "libvirtd-restart", *TIMED, "db-corrupt",
          "agent-kill", "epilog-kill")
FAULT_SECONDS = 60
USERS = ("atlas001", "atlas002", "atlas003", "cms001", "cms002", "cms003")


def instance() -> str:
    return f"{QUEUE}@{socket.gethostname().split('.')[0]}"


def out_of_service() -> bool:
    out = sge("qselect", "-q", instance(), "-qs", "d", check=False)
    return instance() in out.split()


class Soak:
    def __init__(self, args, cfg, path: Path, cli: str, base: Path) -> None:
        self.args, self.cfg, self.path, self.cli, self.base = args, cfg, path, cli, base
        self.rnd = random.Random(args.seed)
        self.jobs: dict[str, Path] = {}
        self.deleted: set[str] = set()
        self.injected: list[dict] = []
        self.open_fault: dict | None = None  # a timed fault under way: its end and undo
        self.filler: int | None = None
        self.corrupted = False
        self.agent = ["bash", str(REPO / "harness/agent.sh")]

    def submit(self, script: Path) -> None:
        user = USERS[len(self.jobs) % len(USERS)]
        out = Path(f"/home/{user}/vmim-soak-{len(self.jobs)}.out")
        out.unlink(missing_ok=True)
        job = sge("qsub", "-terse", "-q", QUEUE, "-o", str(out), "-j", "y", "-v",
                  f"SLEEP={self.rnd.randint(3, 30)}", str(script), user=user).strip()
        self.jobs[job] = out

    def fault(self, now: float) -> str:
        kinds = [k for k in FAULTS if not (k == "db-corrupt" and self.corrupted)]
        kind = self.rnd.choice(kinds)
        if kind in TIMED:
            what = self._start_timed(kind)
        elif kind == "db-corrupt":
            db = self.cfg.leases_db
            for suffix in ("-wal", "-shm"):
                Path(f"{db}{suffix}").unlink(missing_ok=True)
            db.write_bytes(b"this is not an SQLite database\n" * 100)
            self.corrupted, what = True, "corrupted the leases database"
        elif kind == "agent-kill":
            subprocess.run(["pkill", "-9", "-f", "--", f"--config {self.path} agent"],
                           check=False)
            time.sleep(1)
            self._agent("start")
            what = "SIGKILLed the agent and started it again"
        elif kind == "epilog-kill":
            what = self._kill_epilog()
        else:
            what = inject(kind, self.rnd, self.cfg, self.jobs, self.deleted)
        if what:
            self.injected.append({"at s": round(now - self.started, 1), "kind": kind,
                                  "what": what, "seconds": FAULT_SECONDS if kind in TIMED
                                  else 0, "out of service s": 0.0})
            print(f"{now - self.started:7.1f}s {what}", flush=True)
        return what

    def _start_timed(self, kind: str) -> str:
        if kind == "libvirtd-down":
            subprocess.run(["pkill", *THIS_HOST, "-x", "libvirtd"], check=False)
            undo, what = self._libvirtd_up, f"libvirtd down for {FAULT_SECONDS} s"
        else:
            free = os.statvfs(self.cfg.overlay_dir)
            self.filler = os.open(self.cfg.overlay_dir, os.O_TMPFILE | os.O_WRONLY, 0o600)
            os.write(self.filler, b"\0" * max(0, free.f_bavail * free.f_frsize - (8 << 20)))
            undo, what = self._free_overlay, f"overlay_dir full for {FAULT_SECONDS} s"
        self.open_fault = {"until": time.time() + FAULT_SECONDS, "undo": undo}
        return what

    def _libvirtd_up(self) -> None:
        subprocess.run(["bash", str(REPO / "harness/libvirt-up.sh")], check=True,
                       capture_output=True)

    def _free_overlay(self) -> None:
        if self.filler is not None:
            os.close(self.filler)
            self.filler = None

    def _kill_epilog(self) -> str:
        epilogs = set(pids_matching(b"vmim-sge-epilog")) & set(
            pids_matching(str(self.path).encode()))
        for pid in sorted(epilogs)[:1]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                return ""  # it ended meanwhile
            return f"SIGKILLed epilog process {pid}"
        return ""

    def _agent(self, action: str) -> None:
        subprocess.run([*self.agent, action, str(self.path)], check=True, capture_output=True,
                       env={**os.environ, "VMIM_VENV": str(Path(self.cli).parent.parent)})

    def run(self, script: Path) -> dict:
        self.started = time.time()
        self._agent("start")
        samples = e_samples = 0
        next_fault = self.started + self.rnd.uniform(20, 60)
        end_submit = self.started + 60 * self.args.minutes
        try:
            while True:
                now = time.time()
                current = states()
                if now < end_submit and sum(1 for j in self.jobs if j in current) < 4:
                    self.submit(script)
                if self.open_fault and now >= self.open_fault["until"]:
                    self.open_fault["undo"]()
                    self.open_fault = None
                if now < end_submit and not self.open_fault and now >= next_fault:
                    self.fault(now)
                    next_fault = now + self.rnd.uniform(20, 60)
                samples += 1
                e_samples += queue_in_error()
                if out_of_service():
                    timed = [f for f in self.injected if f["seconds"]]
                    if timed:
                        timed[-1]["out of service s"] += 2.0
                for job in [j for j in self.jobs if "E" in current.get(j, "")]:
                    print(f"job {job} held: {reason(self.jobs[job])}", flush=True)
                    sge("qdel", job, check=False)
                    self.deleted.add(job)
                if now >= end_submit and not any(j in current for j in self.jobs):
                    break
                time.sleep(2)
        finally:
            if self.open_fault:
                self.open_fault["undo"]()
        elapsed = time.time() - self.started
        left = self._leftovers_after(120)
        self._agent("stop")
        return {"elapsed s": elapsed, "samples": samples, "E samples": e_samples, **left}

    def _leftovers_after(self, seconds: float) -> dict:
        from vmimagemanager.leases import LeaseStore

        deadline = time.time() + seconds
        while True:
            leases = LeaseStore(self.cfg.leases_db).all()
            spares = {lease.job_label for lease in leases if lease.is_spare}
            left = {"leftover leases": len(leases) - len(spares),
                    "leftover domains without a lease": len(
                        [d for d in virsh("list", "--name").split()
                         if d in [s.domain_name for s in self.cfg.slots]]) - len(leases),
                    # an idle spare's directory (the agent's kept login to it) is not left over
                    "leftover contexts": len([p for p in (self.cfg.run_dir / "jobs").iterdir()
                                              if p.name not in spares])}
            if not any(left.values()) or time.time() > deadline:
                return left
            time.sleep(2)

    def outcomes(self) -> dict:
        finished, failed, lost = 0, [], []
        for job, out in self.jobs.items():
            records = final_records(job)
            if records and records[-1].get("exit_status") == "0" and job not in self.deleted:
                finished += 1
            elif records or job in self.deleted:
                if job not in self.deleted:
                    failed.append({"job": job, "exit_status": records[-1].get("exit_status"),
                                   "reason": reason(out)})
            else:
                lost.append(job)
            out.unlink(missing_ok=True)
        return {"finished": finished, "failed": failed, "lost": lost}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    base, path, cfg, cli, _ = setup(args.slots, extra={
        "health": {"back_after": 30, "min_free_mib": 64}, "spares": {"vos": {"atlas": 1}}},
        overlay_tmpfs_mib=512)
    script = base / "soak.sh"
    script.write_text(PAYLOAD)
    os.chmod(script, 0o755)
    soak = Soak(args, cfg, path, cli, base)
    try:
        run = soak.run(script)
        outcome = soak.outcomes()
    finally:
        teardown(base, path, cli)
    timed = [f for f in soak.injected if f["seconds"]]
    row = {"minutes": args.minutes, "seed": args.seed, "jobs submitted": len(soak.jobs),
           "finished ok": outcome["finished"], "ended failed": len(outcome["failed"]),
           "deleted (qdel, held)": len(soak.deleted), "lost": len(outcome["lost"]),
           "faults": len(soak.injected), "node-wide faults": len(timed),
           "out of service s (all)": sum(f["out of service s"] for f in timed), **run}
    report("soak", [row], list(row), {"faults": soak.injected, "failed": outcome["failed"],
                                      "lost": outcome["lost"]})


if __name__ == "__main__":
    main()
