"""Helpers for tests (and benchmarks) that drive the real gridengine cell as pool accounts."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tests.support import (
    HARNESS,
    THIS_HOST,
    import_test_images,
    make_base_dir,
    require,
    run_script,
    write_config,
)
from vmimagemanager.leases import LeaseStore

SGE_ENV = {"SGE_ROOT": "/var/lib/gridengine", "SGE_CELL": "default"}
TIMEOUT = 900
CLI = str(Path(sys.executable).parent / "vmimagemanager")
JOB = "/tmp/vmim-test-sleep-job.sh"  # prints "started", sleeps $SLEEP s, prints "finished"
JOB_SCRIPT = """#!/bin/bash
echo "started on $(hostname)"
sleep ${SLEEP:-0}
echo "finished"
"""


def sge(*args: str, user: str | None = None, check: bool = True) -> str:
    env = {**os.environ, **SGE_ENV}
    cmd = list(args)
    if user:
        cmd = ["su", user, "-s", "/bin/sh", "-c", f"cd ~{user} && {shlex.join(args)}"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} failed: {r.stderr}")
    return r.stdout


def home(user: str) -> Path:
    return Path(f"/home/{user}")


def grid_client(user: str, *argv: str, cwd: Path | None = None,
                timeout: float = 600) -> subprocess.CompletedProcess:
    """A Grid client command (globus-*, arc*) as `user`, in their home or `cwd`, with the proxy
    where grid-proxy-init puts it and nothing else of root's environment (as the user runs it)."""
    import pwd

    entry = pwd.getpwnam(user)
    return subprocess.run(["runuser", "-u", user, "--", "env", "-i", "PATH=/usr/bin:/bin",
                           f"HOME={entry.pw_dir}", f"USER={user}", f"LOGNAME={user}",
                           f"X509_USER_PROXY=/tmp/x509up_u{entry.pw_uid}", *argv],
                          capture_output=True, text=True, timeout=timeout,
                          cwd=cwd or entry.pw_dir)


class Cell:
    """One test module's VM queue on the cell: its configuration and the jobs it submitted."""

    def __init__(self, cfg, config_path: Path, base: Path, queue: str):
        self.cfg = cfg
        self.config_path = config_path
        self.base = base
        self.queue = queue
        self.jobs: dict[str, str] = {}

    def submit(self, name: str, user: str, *qsub_args: str) -> str:
        for suffix in ("out", "err"):
            for old in home(user).glob(f"vmim-{name}*.{suffix}"):
                old.unlink()
        out = sge("qsub", "-terse", "-q", self.queue, "-N", name,
                  "-o", f"{home(user)}/vmim-{name}.$TASK_ID.out",
                  "-e", f"{home(user)}/vmim-{name}.$TASK_ID.err", *qsub_args, user=user)
        job_id = out.strip().split(".")[0]
        assert job_id.isdigit(), out
        self.jobs[name] = job_id
        return job_id

    def output(self, name: str, user: str, task: str = "0") -> tuple[str, str]:
        base = home(user) / f"vmim-{name}.{task}"  # $TASK_ID is 0 outside array jobs
        out = Path(f"{base}.out")
        err = Path(f"{base}.err")
        return (out.read_text() if out.exists() else "", err.read_text() if err.exists() else "")


def qacct(job_id: str) -> list[dict[str, str]]:
    """The job's finished records (none yet: qacct says "error: job id N not found", or that
    the accounting file does not exist before the first flush on a new cell)."""
    out = sge("qacct", "-j", job_id, check=False)
    records: list[dict[str, str]] = []
    for line in out.splitlines():
        if line.startswith("====="):
            records.append({})
            continue
        parts = line.split(None, 1)
        if records and len(parts) == 2:
            records[-1][parts[0]] = parts[1].strip()
    return [r for r in records if "exit_status" in r]


def wait_for(predicate, what: str, timeout: float = TIMEOUT, interval: float = 2.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n"
                         f"{sge('qstat', '-u', '*', check=False)}")


def job_state(job_id: str) -> str:
    for line in sge("qstat", "-u", "*", check=False).splitlines():
        fields = line.split()
        if fields and fields[0] == job_id:
            return fields[4]
    return ""


def final_records(job_id: str) -> list[dict[str, str]]:
    """qacct records of attempts that ended the job. A prolog that rescheduled the job (exit 99:
    failed "25 : rescheduling") or held it (exit 100: failed "30 : application error
    returned", the job waits in Eqw) leaves a record too, and the job lives on."""
    return [r for r in qacct(job_id) if r.get("failed", "").split()[:1] not in (["25"], ["30"])]


def release_held(job_id: str) -> None:
    """qmod -cj: gridengine 8.1.9 exits 1 even when it cleared the error state."""
    out = subprocess.run(["qmod", "-cj", job_id], capture_output=True, text=True,
                         env={**os.environ, **SGE_ENV})
    assert f"cleared error state of job {job_id}" in out.stdout + out.stderr, out


def wait_done(job_id: str, tasks: int = 1, timeout: float = TIMEOUT) -> list[dict[str, str]]:
    return wait_for(lambda: (r := final_records(job_id)) and len(r) >= tasks and r,
                    f"job {job_id} in qacct", timeout=timeout)


def virsh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True,
                          text=True)


class VmCell(Cell):
    """A VM queue of a test module, with what tests look at: leases, domains, files."""

    def run_job(self, name: str, user: str = "atlas001", sleep: int = 0) -> str:
        return self.submit(name, user, "-v", f"SLEEP={sleep}", JOB)

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([CLI, "--config", str(self.config_path), *args],
                              capture_output=True, text=True, timeout=timeout)

    def lease(self, job_id: str):
        return LeaseStore(self.cfg.leases_db).find_job(job_id, "0")

    def all_leases(self):
        return LeaseStore(self.cfg.leases_db).all()

    def wait_lease_state(self, job_id: str, state: str, timeout: float = 120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lease = self.lease(job_id)
            if lease is not None and str(lease.state) == state:
                return lease
            time.sleep(0.02)
        raise AssertionError(f"job {job_id} never had a lease in state {state}")

    def wait_started(self, name: str, user: str = "atlas001") -> None:
        wait_for(lambda: "started on" in self.output(name, user)[0], f"job {name} to start",
                 timeout=240, interval=0.5)

    def domains(self) -> list[str]:
        ours = {s.domain_name for s in self.cfg.slots}
        return [d for d in virsh("list", "--name").stdout.split() if d in ours]

    def queue_states(self) -> list[str]:
        out = sge("qstat", "-f", "-q", self.queue, check=False)
        return [line.split()[5] if len(line.split()) > 5 else ""
                for line in out.splitlines() if line.startswith(f"{self.queue}@")]

    def assert_queue_usable(self) -> None:
        states = self.queue_states()
        assert states and not any("E" in s for s in states), \
            sge("qstat", "-f", "-explain", "E", "-q", self.queue, check=False)

    def leftovers(self, keep: tuple[str, ...] = ()) -> list[str]:
        found = [f"lease {lease.slot} ({lease.job_label}, {lease.state})"
                 for lease in LeaseStore(self.cfg.leases_db).all()]
        found += [f"domain {d}" for d in self.domains()]
        found += [f"file {p.name}" for p in self.cfg.overlay_dir.iterdir() if p.name not in keep]
        for kind in ("jobs", "contexts"):  # the starter's copy and root's
            where = self.cfg.run_dir / kind
            found += [f"context {p.name}" for p in where.iterdir()] if where.is_dir() else []
        return found

    def assert_clean(self, within: float = 60, keep: tuple[str, ...] = ()) -> None:
        """Nothing of ended jobs left within `within` seconds, with no admin command run."""
        deadline = time.monotonic() + within
        while (found := self.leftovers(keep)) and time.monotonic() < deadline:
            time.sleep(1)
        assert not found, f"left behind after {within:.0f} s: {found}"
        self.assert_queue_usable()


def pids_matching(pattern: bytes) -> list[int]:
    """The processes (other than this one) whose command line holds `pattern`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and int(proc.name) != os.getpid() and \
                    pattern in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def stop_libvirtd(timeout: float = 60) -> None:
    """Kill libvirtd as a fault would, and wait until it is gone (harness/libvirt-up.sh starts
    it again)."""
    subprocess.run(["pkill", *THIS_HOST, "-x", "libvirtd"], check=False)
    wait_for(lambda: subprocess.run(["pgrep", *THIS_HOST, "-x", "libvirtd"]).returncode != 0,
             "libvirtd to stop", timeout=timeout, interval=0.2)


def agent_once(cell: VmCell, config: Path | None = None) -> list[str]:
    """One real agent round (the CLI, as cron would run it); its action lines."""
    r = subprocess.run([CLI, "--config", str(config or cell.config_path), "agent", "--once"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return [line for line in r.stderr.splitlines() if "agent:" in line]


def open_vm_cell(queue: str, prefix: str, guest_images: dict, extra: dict | None = None,
                 small_overlay_fs: bool = False, slots: int = 2,
                 queue_slots: int | None = None, hosts: tuple[str, ...] = ()) -> VmCell:
    """A configuration with `slots` VM slots (2) and a VM queue with `queue_slots` job slots
    (as many) on the running cell, installed as a site would."""
    from vmimagemanager.config import load_config

    up = run_script(str(HARNESS / "sge-cell.sh"), "up")
    require(up.returncode == 0, f"gridengine cell did not come up: {up.stderr.strip()}")
    base = make_base_dir(prefix)
    overlays = base / "overlays"
    overlays.mkdir()
    if small_overlay_fs:  # a file system of its own, small enough to fill
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0711", "vmim-test",
                        overlays], check=True)
    path = write_config(base, slots=slots, prefix=f"{queue[:4]}{os.getpid()}s", extra={
        "boot_timeout": 60, "max_boot_attempts": 2,
        "shared_paths": [{"path": "/home", "mode": "hypervisor"}], **(extra or {})})
    cfg = load_config(str(path))
    import_test_images(cfg, guest_images, names=("atlas", "cms"))
    Path(JOB).write_text(JOB_SCRIPT)
    os.chmod(JOB, 0o755)
    sized = ["--slots", str(queue_slots)] if queue_slots else []
    sized += ["--hosts", *hosts] if hosts else []
    r = subprocess.run([CLI, "--config", str(path), "sge", "install-queue", "--queue", queue,
                        "--wrapper-dir", str(base / "libexec"), *sized],
                       capture_output=True, text=True, env={**os.environ, **SGE_ENV})
    assert r.returncode == 0, r.stderr
    return VmCell(cfg, path, base, queue)


# A VO whose image cannot boot (a blank disk: the initramfs finds no root file system and powers
# off), for the failed-boot cases; atlas002 is its only member.
BROKEN_VOS = {"broken": {"image": "broken", "users": ["atlas002"]},
              "atlas": {"image": "atlas", "groups": ["atlas"]},
              "cms": {"image": "cms", "groups": ["cms"]}}


def import_broken_image(cell: VmCell, guest_images: dict) -> None:
    blank = cell.base / "blank.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(blank), "64M"], check=True)
    d = guest_images["dir"]
    r = cell.cli("images", "import", "broken", str(blank), "--kernel",
                 str(d / guest_images["kernel"]), "--initrd", str(d / guest_images["initrd"]),
                 "--cmdline", guest_images["cmdline"])
    assert r.returncode == 0, r.stderr


def close_vm_cell(cell: VmCell) -> None:
    run_script(str(HARNESS / "libvirt-up.sh"))  # in case a test stopped it and failed
    for job_id in cell.jobs.values():
        sge("qdel", "-f", job_id, check=False)
    wait_for(lambda: not any(job_state(j) for j in cell.jobs.values()), "jobs to go",
             timeout=120)
    sge("qconf", "-dq", cell.queue, check=False)
    cell.cli("reconcile")
    subprocess.run(["umount", "-l", str(cell.cfg.overlay_dir)], capture_output=True)
    shutil.rmtree(cell.base, ignore_errors=True)
