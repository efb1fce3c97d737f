"""Faults on a real node: the queue never goes to E because of us, no job is lost, and the node
heals itself. Real cell, real libvirtd and QEMU guests; each fault is injected as it happens at a
site (a VM destroyed, libvirtd or execd restarted, a hook killed by the OOM killer, a full disk, a
locked or corrupt leases database, an image changed after import, interactive jobs, qdel at any
moment).

Every test checks the same three things: the job ran to its end, or ended with a non-zero status
and a one-line reason in its .e file, or waits held with the reason; the queue instance is not in
E; and within 60 s, with no admin command, no lease, domain, overlay, seed or job context of an
ended job is left.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import HARNESS, THIS_HOST, run_script
from tests.support.sgecell import (
    JOB,
    SGE_ENV,
    VmCell,
    close_vm_cell,
    job_state,
    open_vm_cell,
    pids_matching,
    qacct,
    sge,
    stop_libvirtd,
    virsh,
    wait_done,
    wait_for,
)
from vmimagemanager.audit import read_history
from vmimagemanager.batch.sge_queue import DEFAULT_EXECD_SPOOL

pytestmark = [pytest.mark.integration, pytest.mark.sge]

QUEUE = "vmfault.q"


@pytest.fixture(scope="module")
def faults(libvirt_system, guest_images):
    cell = open_vm_cell(QUEUE, "vmim-fault-", guest_images, small_overlay_fs=True, extra={
        # its overlay_dir is a 64 MiB tmpfs (to be filled by one test): the agent's round must
        # not take the node out for it being small
        "health": {"min_free_mib": 8},
        "vos": {"changed": {"image": "atlas-changed", "users": ["atlas003"]},
                "atlas": {"image": "atlas", "groups": ["atlas"]},
                "cms": {"image": "cms", "groups": ["cms"]}}})
    from vmimagemanager.images import ImageStore

    d = guest_images["dir"]
    ImageStore(cell.cfg.image_dir).import_image(
        "atlas-changed", d / guest_images["images"]["atlas"]["disk"],
        kernel=d / guest_images["kernel"], initrd=d / guest_images["initrd"],
        cmdline=guest_images["cmdline"])
    yield cell
    close_vm_cell(cell)


def ended_with_reason(cell: VmCell, name: str, user: str = "atlas001") -> tuple[dict, str]:
    record = wait_done(cell.jobs[name])[0]
    _, err = cell.output(name, user)
    return record, err


def ran_to_the_end(cell: VmCell, name: str, user: str = "atlas001") -> str:
    record = wait_done(cell.jobs[name])[0]
    out, err = cell.output(name, user)
    assert record["exit_status"] == "0" and "finished" in out, (record, out, err)
    return err


# -- the guest goes away under a running job -------------------------------------------------
def _destroy(cell: VmCell, slot: str) -> None:
    assert virsh("destroy", f"vmim-{slot}").returncode == 0


def _poweroff(cell: VmCell, slot: str) -> None:
    cell.cli("exec", slot, "--", "poweroff", "-f", timeout=60)


def _panic(cell: VmCell, slot: str) -> None:
    cell.cli("exec", slot, "--", "sh", "-c", "echo c > /proc/sysrq-trigger", timeout=60)


@pytest.mark.parametrize("fault", [_destroy, _poweroff, _panic],
                         ids=["virsh-destroy", "guest-poweroff", "guest-kernel-panic"])
def test_a_vm_that_dies_mid_job_ends_the_job_visibly_and_frees_its_slot(faults, fault):
    name = f"vmdies-{fault.__name__.strip('_')}"
    job_id = faults.run_job(name, sleep=300)
    faults.wait_started(name)
    slot = faults.lease(job_id).slot
    fault(faults, slot)
    record, err = ended_with_reason(faults, name)
    assert record["exit_status"] != "0", record
    lines = [line for line in err.splitlines() if line.startswith("vmimagemanager")]
    assert lines, err  # one line that says what happened
    assert "VM" in lines[0], lines
    faults.assert_clean()


# -- a hook is killed (the OOM killer, an admin) --------------------------------------------
def test_a_prolog_killed_during_boot_reschedules_the_job_which_then_runs(faults):
    job_id = faults.run_job("prologkill")
    lease = faults.wait_lease_state(job_id, "booting")
    os.kill(lease.pid, signal.SIGKILL)
    err = ran_to_the_end(faults, "prologkill")
    assert ("vmimagemanager prolog: the prolog hook failed (killed by signal 9); the job is "
            "rescheduled") in err, err
    faults.assert_clean()


def _signal_libvirtd(sig: str) -> None:
    subprocess.run(["pkill", *THIS_HOST, f"-{sig}", "-x", "libvirtd"], check=True)


def test_an_epilog_killed_during_teardown_is_finished_by_its_wrapper(faults):
    # The epilog's own part of the teardown is short (it hands the destroy to a detached
    # process); libvirtd hanging holds it there, after it marked the slot tearing-down.
    job_id = faults.run_job("epilogkill", sleep=3)
    faults.wait_started("epilogkill")
    _signal_libvirtd("STOP")
    try:
        lease = faults.wait_lease_state(job_id, "tearing-down")
        cmdline = Path(f"/proc/{lease.pid}/cmdline").read_bytes()
        assert b"vmim-sge-epilog" in cmdline, cmdline
        os.kill(lease.pid, signal.SIGKILL)
    finally:
        _signal_libvirtd("CONT")
    err = ran_to_the_end(faults, "epilogkill")
    assert ("the epilog hook failed (killed by signal 9); running it once more to finish the "
            "teardown") in err, err
    faults.assert_clean()


def _teardown_pid(label: str, timeout: float = 120) -> int:
    """The epilog's detached teardown process for job `label`, as soon as it exists (it needs
    ~0.1 s to import before it touches the VM)."""
    needle = b"vmimagemanager.teardown\0"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if needle in cmdline and cmdline.endswith(f"\0{label}\0".encode()):
                return int(proc.name)
        time.sleep(0.005)
    raise AssertionError(f"no teardown process for job {label}")


def test_a_killed_teardown_process_is_finished_by_the_agents_next_round(faults):
    job_id = faults.run_job("teardownkill", sleep=3)
    faults.wait_started("teardownkill")
    pid = _teardown_pid(f"{job_id}.0")
    os.kill(pid, signal.SIGKILL)
    ran_to_the_end(faults, "teardownkill")  # the epilog had returned: the job is not affected
    lease = faults.lease(job_id)
    assert lease is not None and str(lease.state) == "tearing-down", lease  # the slot waits
    assert faults.domains(), "the VM went although its teardown was killed"
    r = faults.cli("agent", "--once")
    assert r.returncode == 0, r.stderr
    assert f"job {job_id}.0" in r.stdout + r.stderr, (r.stdout, r.stderr)
    faults.assert_clean(within=5)


def _starter_pid(job_id: str) -> int | None:
    for proc in Path("/proc").iterdir():
        try:
            if (b"vmim-sge-starter" in (proc / "cmdline").read_bytes()
                    and f"\0JOB_ID={job_id}\0".encode() in b"\0" + (proc / "environ").read_bytes()):
                return int(proc.name)
        except OSError:
            continue
    return None


def test_a_starter_killed_mid_job_fails_the_job_with_a_reason(faults):
    job_id = faults.run_job("starterkill", sleep=300)
    faults.wait_started("starterkill")
    pid = _starter_pid(job_id)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    record, err = ended_with_reason(faults, "starterkill")
    assert record["exit_status"].split()[0] == "137", record  # "137 (Killed)"
    assert f"job {job_id}.0 was ended by signal 9 on the node" in err, err
    faults.assert_clean()


# -- daemons stop and restart ----------------------------------------------------------------

def _start_libvirtd() -> None:
    r = run_script(str(HARNESS / "libvirt-up.sh"))
    assert r.returncode == 0, r.stderr


def test_libvirtd_down_at_prolog_time_reschedules_until_it_is_back(faults):
    stop_libvirtd(timeout=30)
    try:
        faults.run_job("nolibvirt")
        wait_for(lambda: "libvirtd is not answering" in faults.output("nolibvirt", "atlas001")[1],
                 "the prolog to report libvirtd", timeout=120, interval=1)
        faults.assert_queue_usable()
    finally:
        _start_libvirtd()
    err = ran_to_the_end(faults, "nolibvirt")
    assert "; the job is rescheduled" in err, err
    assert "not destroyed" not in err  # no slot was taken while libvirtd was away
    faults.assert_clean()


def test_libvirtd_restarted_mid_job(faults):
    faults.run_job("libvirtrestart", sleep=20)
    faults.wait_started("libvirtrestart")
    stop_libvirtd(timeout=30)
    _start_libvirtd()
    ran_to_the_end(faults, "libvirtrestart")
    faults.assert_clean()


def test_sge_execd_restarted_mid_job(faults):
    faults.run_job("execdrestart", sleep=20)
    faults.wait_started("execdrestart")
    sge("qconf", "-ke", os.uname().nodename)
    wait_for(lambda: subprocess.run(["pgrep", *THIS_HOST, "-x", "sge_execd"]).returncode != 0,
             "sge_execd to stop", timeout=60, interval=0.5)
    up = run_script(str(HARNESS / "sge-cell.sh"), "up")
    assert up.returncode == 0, up.stderr
    ran_to_the_end(faults, "execdrestart")
    faults.assert_clean()


# -- resources: disk, leases database, images ------------------------------------------------
def test_a_full_overlay_directory_reschedules_with_the_reason_and_leaves_no_partial_file(faults):
    filler = faults.cfg.overlay_dir / "filler"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M"], capture_output=True)
    try:
        faults.run_job("diskfull")
        wait_for(lambda: "no space left in" in faults.output("diskfull", "atlas001")[1],
                 "the prolog to report the full disk", timeout=120, interval=1)
        assert faults.leftovers(keep=("filler",)) == []  # no partial overlay or seed, no lease
        faults.assert_queue_usable()
    finally:
        filler.unlink()
    err = ran_to_the_end(faults, "diskfull")
    line = next(x for x in err.splitlines() if "no space left" in x)
    assert str(faults.cfg.overlay_dir) in line and line.endswith("; the job is rescheduled")
    faults.assert_clean()


def test_a_leases_database_locked_for_30_s_delays_the_job_but_loses_nothing(faults):
    locker = subprocess.Popen([sys.executable, "-c", (
        "import sqlite3, sys, time\n"
        f"db = sqlite3.connect({str(faults.cfg.leases_db)!r}, isolation_level=None)\n"
        "db.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(30)\n"
        "db.execute('COMMIT')\n")], stdout=subprocess.PIPE, text=True)
    assert locker.stdout.readline().strip() == "locked"
    faults.run_job("dblocked")
    err = ran_to_the_end(faults, "dblocked")
    assert locker.wait(timeout=60) == 0
    assert "stayed locked by another process for 20 s; the job is rescheduled" in err, err
    faults.assert_clean()


def test_a_corrupt_leases_database_is_rebuilt_and_jobs_go_on_without_an_admin(faults):
    """A job runs when the database is destroyed: it finishes, the next job runs, no admin
    command; the broken files are kept aside for the admin (node/rebuild.py)."""
    db = faults.cfg.leases_db
    running = faults.run_job("dbrunning", sleep=15)
    faults.wait_started("dbrunning")
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    db.write_bytes(b"this is not an SQLite database\n" * 100)
    faults.run_job("dbcorrupt")
    ran_to_the_end(faults, "dbrunning")
    ran_to_the_end(faults, "dbcorrupt")
    assert not job_state(running)
    (kept,) = db.parent.glob("leases.broken-*")
    assert (kept / db.name).read_bytes().startswith(b"this is not an SQLite database")
    history = "\n".join(e.get("action", "") for e in read_history(faults.cfg)
                        if e["event"] == "reconcile")
    assert "rebuilt the leases database from libvirt" in history, history
    faults.assert_queue_usable()
    faults.assert_clean()
    shutil.rmtree(kept)


def test_an_image_changed_after_import_holds_its_jobs_with_the_reason(faults):
    disk = faults.cfg.image_dir / "atlas-changed.qcow2"
    os.utime(disk)  # as a copy over it or an edit in place would
    job_id = faults.submit("imagechanged", "atlas003", "-v", "SLEEP=0", JOB)
    wait_for(lambda: "E" in job_state(job_id), "the job to be held (Eqw)", timeout=120)
    _, err = faults.output("imagechanged", "atlas003")
    assert f"image 'atlas-changed': {disk} changed after import" in err, err
    assert "the job is held (Eqw)" in err
    faults.assert_queue_usable()
    sge("qdel", job_id)
    wait_for(lambda: not job_state(job_id), "the held job to go", timeout=60)
    faults.assert_clean()


# -- users doing unexpected things -----------------------------------------------------------
@pytest.mark.parametrize("client", [["qrsh", "-now", "yes", "hostname"], ["qlogin", "-now", "yes"]])
def test_interactive_jobs_are_refused_and_the_queue_stays_usable(faults, client):
    r = subprocess.run(["su", "atlas001", "-s", "/bin/sh", "-c",
                        f"cd && {' '.join(client[:1])} -q {QUEUE} {' '.join(client[1:])}"],
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                       env={**os.environ, **SGE_ENV})
    assert r.returncode != 0
    # The queue is batch-only (install-queue): SGE itself refuses at once, no hook runs.
    assert "request could not be scheduled" in r.stdout + r.stderr, (r.stdout, r.stderr)
    assert re.search(r"^qtype\s+BATCH$", sge("qconf", "-sq", QUEUE), re.M)
    faults.assert_queue_usable()


def test_the_prolog_itself_refuses_an_interactive_job_without_disabling_the_queue(faults):
    """A queue an admin made interactive anyway: the hook holds such a job (exit 100)."""
    host = f"vmimtest{os.getpid()}"  # a host of execd's spool no execd uses
    execd = Path(DEFAULT_EXECD_SPOOL)  # this cell's execd_spool_dir (install-queue wrote it)
    spool = execd / host / "active_jobs" / "777.1"  # as execd lays it out (root-owned)
    spool.mkdir(parents=True)
    try:
        (spool / "config").write_text("script_file=QRSH\nqrsh_control_port=host:1234\n")
        prolog = faults.base / "libexec" / "prolog"
        r = subprocess.run([str(prolog), "777", "0", "atlas001", QUEUE, host],
                           capture_output=True, text=True, timeout=60,
                           env={"PATH": "/usr/bin:/bin", "SGE_JOB_SPOOL_DIR": str(spool)})
    finally:
        shutil.rmtree(execd / host)
    assert r.returncode == 100, r.stderr
    assert r.stderr.startswith("vmimagemanager prolog: job 777.0: interactive jobs (qrsh, "
                               "qlogin, srun --pty) cannot run in a VM queue"), r.stderr
    assert faults.leftovers() == []


def test_twenty_jobs_deleted_at_random_moments_leave_nothing_behind(faults):
    rnd = random.Random(20261126)
    users = ["atlas001", "atlas002", "cms001", "cms002"]
    jobs = [faults.submit(f"qdel{i}", users[i % 4], "-v", f"SLEEP={rnd.randint(3, 20)}", JOB)
            for i in range(20)]
    for job_id in rnd.sample(jobs, len(jobs)):  # some queued, some in prolog, boot, run, epilog
        time.sleep(rnd.uniform(0, 6))
        sge("qdel", job_id, check=False)
    wait_for(lambda: not any(job_state(j) for j in jobs), "the deleted jobs to go", timeout=300)
    for job_id in jobs:  # a job that had started is accounted; none is stuck anywhere
        assert not job_state(job_id)
    assert any(qacct(j) for j in jobs)
    faults.assert_clean()


def _kill_every(pattern: bytes) -> list[int]:
    """SIGKILL every process whose command line holds `pattern`."""
    killed = []
    for pid in pids_matching(pattern):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    return killed


def test_after_a_simulated_reboot_the_agents_first_round_leaves_the_node_clean(faults):
    """A node restarts with a job in its VM: every process of ours, gridengine's execd and
    shepherds and the job's QEMU die at once (SIGKILL), libvirtd goes; then libvirtd and execd
    start again and the agent runs its first round (systemd: ordered after libvirtd) before
    any job arrives. The lease, the overlay, the seed and the job's context are left from
    before: the round removes them all, and the next job runs."""
    job_id = faults.run_job("rebooted", sleep=600)
    faults.wait_started("rebooted")
    slot = faults.lease(job_id).slot
    qemu = _kill_every(f"guest=vmim-{slot},".encode())
    assert qemu, f"no QEMU for slot {slot}"
    for name in (b"sge_execd", b"sge_shepherd", str(faults.config_path).encode(),
                 b"vmim-sge-"):
        _kill_every(name)
    stop_libvirtd()
    assert faults.lease(job_id) is not None  # what a reboot leaves behind
    # gridengine's view of the job is its own: forgotten here, so execd does not start it
    # again beside the round
    sge("qdel", "-f", job_id, check=False)
    wait_for(lambda: not job_state(job_id), "the job from before the reboot to go",
             timeout=120)
    assert run_script(str(HARNESS / "libvirt-up.sh")).returncode == 0
    assert run_script(str(HARNESS / "sge-cell.sh"), "up").returncode == 0
    r = faults.cli("agent", "--once")
    assert r.returncode == 0, r.stderr
    assert faults.leftovers() == [], (faults.leftovers(), r.stderr)
    faults.run_job("afterreboot")
    ran_to_the_end(faults, "afterreboot")
    faults.assert_clean()


def test_reconcile_agrees_after_all_faults(faults):
    r = faults.cli("reconcile", "--dry-run")
    assert r.stdout.strip() == "nothing to do: leases, domains and files agree", r.stdout
    assert sqlite3.connect(faults.cfg.leases_db).execute("PRAGMA integrity_check").fetchone() \
        == ("ok",)
