"""Per-job overhead of vmimagemanager's own code, split into phases, guest boot shown apart.

Runs N jobs' life cycles (start VM -> run a trivial payload over ssh -> end VM) through the
library on a real libvirtd + QEMU (the hooks' import times: benchmarks/imports.py).
Target: everything but guest boot and payload <= 0.5 s per job.
Usage: python -m benchmarks.overhead [--jobs 3]    (from the tree's top)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time

from benchmarks.common import report, scratch_config

# ours: everything a job waits for but the guest's boot; the epilog's detached destroy is not
# on the job's path (it delays the slot's next job: "slot turnaround", epilog start -> free)
OWN_PHASES = ["config load", "lease", "overlay", "keys", "seed", "define+start", "run (ssh)",
              "epilog returns"]


def one_job(path: str, n: int) -> dict:
    from vmimagemanager.config import load_config
    from vmimagemanager.context import key_path
    from vmimagemanager.guest import Endpoint, connect
    from vmimagemanager.node import JobRequest, open_node
    from vmimagemanager.teardown import end_job

    t0 = time.perf_counter()
    cfg = load_config(path)
    config_s = time.perf_counter() - t0
    life = open_node(cfg)
    started = life.start_vm(JobRequest(str(80000 + n), "0", "atlas001", "atlas", "atlas"))
    ctx = started.context
    t1 = time.perf_counter()
    session = connect(Endpoint(ctx.host, ctx.port, ctx.user, key_path(cfg.run_dir, ctx.label),
                               ctx.host_key))
    devnull = os.open(os.devnull, os.O_WRONLY)
    rc = session.run(["true"], {"JOB_ID": str(n)}, None, stdin_fd=None, stdout_fd=devnull)
    session.close()
    os.close(devnull)
    assert rc == 0
    run_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    end_job(life, str(80000 + n), "0")  # as the epilog does: the destroy goes to a child
    epilog_s = time.perf_counter() - t2
    while life.leases.get(started.lease.slot) is not None:
        time.sleep(0.01)
    turnaround_s = time.perf_counter() - t2
    p = dict(life.phase.seconds)
    row = {"job": n, "config load": config_s, "run (ssh)": run_s, **p,
           "epilog returns": epilog_s, "slot turnaround": turnaround_s}
    row["to host key"] = p.get("guest boot (to host key on console)", 0)
    row["key -> login"] = p.get("wait for ssh", 0)
    row["guest boot"] = row["to host key"] + row["key -> login"]
    row["ours total"] = sum(row.get(k, 0.0) for k in OWN_PHASES)
    row["ours without run"] = row["ours total"] - run_s
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=3)
    args = parser.parse_args()
    base, path, _cfg = scratch_config(1)
    try:
        rows = [one_job(str(path), n) for n in range(args.jobs)]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    columns = ["job", *OWN_PHASES, "ours without run", "to host key", "key -> login", "guest boot",
               "slot turnaround"]
    print("Per-job phases (seconds); 'guest boot' = QEMU start to ssh answering, not ours")
    med = {c: statistics.median(r[c] for r in rows) for c in columns[1:]}
    report("overhead", [*rows, {"job": "median", **med}], columns)


if __name__ == "__main__":
    main()
