"""Warm spares on real parts: the agent boots them, jobs of the real cell start on them.

The security invariants each have a test here: a spare holds no job key and no home before bind;
a bound VM sees its owner's home and no other; every VM serves one job and is destroyed after it
(a later job gets a freshly booted spare, never a used one); the starter pins the host key the
spare printed at its boot. Plus the fallbacks: a broken spare or one of another image never
fails a job, it only makes it boot cold. The configuration, the lease store and the bind without
a VM: tests/unit/test_spares.py.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.support import HARNESS, import_test_images, run_script
from tests.support.sgecell import (
    CLI,
    agent_once,
    close_vm_cell,
    open_vm_cell,
    pids_matching,
    stop_libvirtd,
    virsh,
    wait_done,
    wait_for,
)
from vmimagemanager.audit import read_history, vm_starts
from vmimagemanager.config import load_config
from vmimagemanager.leases import SPARE_JOB_ID
from vmimagemanager.metrics import boot_seconds
from vmimagemanager.states import LeaseState

QUEUE = "vmspare.q"
SECRET = Path("/home/cms001/vmim-spare-secret")
PROBE = "/tmp/vmim-test-spare-probe.sh"
PROBE_SCRIPT = """#!/bin/sh
# What a job sees of its VM: which boot it is, whether another job ran here, other homes.
echo "boot $(cat /proc/sys/kernel/random/boot_id)"
test -e /tmp/vmim-payload-marker && echo "marker found" || echo "marker absent"
echo ran > /tmp/vmim-payload-marker
cat /home/cms001/vmim-spare-secret 2>/dev/null && echo "secret visible" || echo "secret hidden"
grep -c virtiofs /proc/mounts
echo "written by the job" > "$HOME/vmim-spare-from-job"
sleep ${SLEEP:-0}
echo done
"""


# -- on real VMs and the real cell ----------------------------------------------------------------
@pytest.fixture(scope="module")
def spares_cell(libvirt_system, guest_images):
    Path(PROBE).write_text(PROBE_SCRIPT)
    os.chmod(PROBE, 0o755)
    SECRET.write_text("cms001's secret\n")
    os.chmod(SECRET, 0o644)  # world-readable on the host: only the VM boundary hides it
    os.chown(SECRET, pwd.getpwnam("cms001").pw_uid, pwd.getpwnam("cms001").pw_gid)
    cell = open_vm_cell(QUEUE, "vmim-spare-", guest_images, slots=3, queue_slots=2,
                        extra={"spares": {"vos": {"atlas": 1}}, "health": {"back_after": 0}})
    yield cell
    close_vm_cell(cell)
    SECRET.unlink(missing_ok=True)


def assert_only_spares(cell, idle: int) -> None:
    """Nothing but `idle` idle spares (lease, domain, overlay and seed each) is left."""
    leases = cell.all_leases()
    assert [str(lease.state) for lease in leases] == ["spare"] * idle, leases
    assert len(cell.domains()) == idle
    files = [p.name for p in cell.cfg.overlay_dir.iterdir()]
    assert len(files) == 2 * idle and all(SPARE_JOB_ID in f for f in files), files


def spares(cell) -> list[dict]:
    r = cell.cli("spares", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["spares"]


ROOT_LOGINS = "grep -c 'Accepted publickey for root' /var/log/sshd.log"  # this one's included


def in_guest(cell, slot: str, command: str) -> str:
    r = cell.cli("exec", slot, "--", "sh", "-c", command)
    assert r.returncode == 0, (r.stdout, r.stderr)
    return r.stdout


def cpu_weight(slot: str) -> int:
    """The domain's CPU weight as libvirt reports it (virsh schedinfo's cpu_shares)."""
    out = virsh("schedinfo", f"vmim-{slot}").stdout
    return int(next(line.split(":")[1] for line in out.splitlines()
                    if line.startswith("cpu_shares")))


def spare_facts(cell) -> dict:
    """The one idle spare: its slot, boot id, domain UUID, the host key on its console."""
    (row,) = [r for r in spares(cell) if r["state"] == "spare"]
    slot = row["slot"]
    console = (cell.cfg.state_dir / "console" / f"{slot}.log").read_text()
    from vmimagemanager.guest import parse_console_host_keys

    boot, root_logins = in_guest(cell, slot, f"cat /proc/sys/kernel/random/boot_id; "
                                 f"{ROOT_LOGINS}").split()
    return {"slot": slot, "label": row["job"], "boot": boot, "root_logins": int(root_logins),
            "uuid": virsh("domuuid", f"vmim-{slot}").stdout.strip(),
            "host_key": parse_console_host_keys(console)[0]}


def agent_sh(cell, action: str) -> None:
    """The long-running agent as the harness (and, in its place, systemd) runs it."""
    r = subprocess.run(["bash", str(HARNESS / "agent.sh"), action, str(cell.config_path)],
                       capture_output=True, text=True,
                       env={**os.environ, "VMIM_VENV": str(Path(CLI).parent.parent)})
    assert r.returncode == 0, r.stderr


def kept_login_dir(cell, label: str) -> Path:
    return cell.cfg.run_dir / "jobs" / label


@pytest.mark.integration
def test_the_agent_boots_a_spare_that_holds_no_job_key_and_no_home(spares_cell):
    lines = agent_once(spares_cell)
    assert any("ready in slot" in line for line in lines), lines
    rows = spares(spares_cell)
    assert [(r["state"], r["image"], r["vo"]) for r in rows] == [("spare", "atlas", "atlas")]
    slot = rows[0]["slot"]
    (booted,) = [e for e in read_history(spares_cell.cfg) if e["event"] == "spare"]
    assert (booted["outcome"], booted["image"], booted["slot"]) == ("ready", "atlas", slot)
    assert booted["job"] == rows[0]["job"] and boot_seconds(booted["phases"]) > 0
    seen = in_guest(spares_cell, slot, "ls /etc/ssh/authorized_keys; echo ---; "
                    "grep -c virtiofs /proc/mounts; ls /sys/bus/virtio/drivers/virtiofs | "
                    "grep -c virtio; echo ---; "
                    "[ $(stat -c %d /home/atlas001) = $(stat -c %d /) ] && echo home-not-mounted;"
                    "test -e /tmp/vmim-payload-marker && echo marker || echo no-marker")
    keys, exported, rest = seen.split("---\n")
    assert keys.split() == ["root"]  # the admin key only: no pool account can log in
    # no home file system, not even its device: the owner's home is plugged in at bind
    assert exported.split() == ["0", "0"]
    assert rest.split() == ["home-not-mounted", "no-marker"]
    assert cpu_weight(slot) == 1024 // 16  # it never takes CPU a job's VM wants
    # the agent's root login is kept for the bind, where only root may reach it
    kept = kept_login_dir(spares_cell, rows[0]["job"])
    st = kept.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700) and (kept / "control").is_socket()
    assert subprocess.run(["ssh", "-F", "/dev/null", "-S", str(kept / "control"), "-O", "check",
                           "vmim-guest"], capture_output=True).returncode == 0
    # a second round changes nothing: the count is met, the spare stays
    assert not any("ready in slot" in line or "retired" in line
                   for line in agent_once(spares_cell))
    assert [r["job"] for r in spares(spares_cell)] == [rows[0]["job"]]


def _run_probe(cell, name: str, user: str = "atlas001", sleep: int = 0,
               during=None) -> tuple[str, str]:
    job = cell.submit(name, user, "-v", f"SLEEP={sleep}", PROBE)
    if during is not None:
        during(job)
    wait_done(job)
    return job, cell.output(name, user)[0]


@pytest.mark.integration
def test_a_job_starts_on_the_spare_and_sees_only_its_owners_home(spares_cell):
    cell = spares_cell
    if not spares(cell):
        agent_once(cell)
    spare = spare_facts(cell)
    seen = {}

    def while_running(job: str) -> None:
        lease = cell.wait_lease_state(job, "running", timeout=120)
        seen["slot"] = lease.slot
        ctx = json.loads((cell.cfg.run_dir / "jobs" / f"{job}.0" / "context.json").read_text())
        seen["host_key"] = ctx["host_key"]
        seen["uuid"] = virsh("domuuid", f"vmim-{lease.slot}").stdout.strip()
        keys = in_guest(cell, lease.slot, f"ls /etc/ssh/authorized_keys; {ROOT_LOGINS}").split()
        seen["keys"], seen["root_logins"] = keys[:-1], int(keys[-1])
        seen["kept"] = kept_login_dir(cell, spare["label"]).exists()
        seen["masters"] = subprocess.run(["pgrep", "-f", f"{spare['label']}/control"],
                                         capture_output=True).stdout
        seen["weight"] = cpu_weight(lease.slot)

    job, out = _run_probe(cell, "spare1", sleep=4, during=while_running)
    assert f"boot {spare['boot']}" in out, out  # it ran in the spare, not in a new VM
    assert "marker absent" in out and "secret hidden" in out and "done" in out, out
    assert "vmim-spare-secret" not in out, out
    assert out.splitlines().count("1") == 1, out  # one virtiofs mount: the owner's home
    assert seen["slot"] == spare["slot"] and seen["uuid"] == spare["uuid"]
    assert seen["host_key"] == spare["host_key"]  # the starter pins the key of the spare's boot
    assert sorted(seen["keys"]) == ["atlas001", "root"]
    # the bind used the agent's kept login (no root login of its own), then ended it
    assert seen["root_logins"] == spare["root_logins"] + 1  # + the one that counted
    assert not seen["kept"] and seen["masters"] == b""
    assert seen["weight"] == 1024  # bound: the weight of any job's VM again
    # where the image's sshd reads atlas001's keys was asked once and kept (root's only); the
    # binds of test_every_job_gets_a_freshly_booted_vm use it, and their jobs log in with it
    kept_keys = cell.cfg.state_dir / "authorized-keys-files.json"
    assert stat.S_IMODE(kept_keys.stat().st_mode) == 0o600
    assert [users for users in json.loads(kept_keys.read_text()).values()] == [
        {"atlas001": "/etc/ssh/authorized_keys/atlas001"}]
    written = Path("/home/atlas001/vmim-spare-from-job")
    assert written.read_text() == "written by the job\n"
    assert (written.stat().st_uid, written.stat().st_gid) == (5001, 5000)
    written.unlink()
    # the VM is gone with its job; what it used idle is not the job's
    cell.assert_clean(within=30)
    assert spare["uuid"] not in virsh("list", "--uuid").stdout
    usage = [json.loads(line) for line in
             (cell.cfg.state_dir / "usage.jsonl").read_text().splitlines()]
    (record,) = [u for u in usage if u["job"] == f"{job}.0"]
    assert record["spare_cpu_seconds"] > 0 and record["owner"] == "atlas001"


@pytest.mark.integration
def test_every_job_gets_a_freshly_booted_vm(spares_cell):
    cell = spares_cell
    boots = []
    for n in range(2):
        agent_once(cell)
        spare = spare_facts(cell)
        if n == 1:  # the agent's kept login is gone (its master ended): the bind logs in itself
            control = kept_login_dir(cell, spare["label"]) / "control"
            subprocess.run(["ssh", "-F", "/dev/null", "-S", str(control), "-O", "exit", "x"],
                           check=True, capture_output=True)
        _job, out = _run_probe(cell, f"fresh{n}")
        assert f"boot {spare['boot']}" in out and "marker absent" in out, out
        assert not kept_login_dir(cell, spare["label"]).exists()
        boots.append(spare["boot"])
        cell.assert_clean(within=30)
    assert boots[0] != boots[1]


@pytest.mark.integration
def test_a_job_that_comes_while_its_spare_boots_takes_that_spare(spares_cell):
    cell = spares_cell
    assert cell.cli("spares", "--retire").returncode == 0
    agent = subprocess.Popen([CLI, "--config", str(cell.config_path), "agent", "--once"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (booting := [r for r in spares(cell) if r["state"] == "booting"]):
            assert time.monotonic() < deadline and agent.poll() is None, "no spare booting"
            time.sleep(0.1)
        # The spare's boot is held (its QEMU stopped) until the job's prolog has been waiting
        # for a while: the job must wait for it, not boot a VM of its own meanwhile.
        qemu = int(Path(f"/run/libvirt/qemu/vmim-{booting[0]['slot']}.pid").read_text())
        os.kill(qemu, signal.SIGSTOP)
        try:
            job = cell.submit("booting1", "atlas001", "-v", "SLEEP=0", PROBE)
            time.sleep(5)
            assert cell.all_leases() and not any(
                lease.job_id == job for lease in cell.all_leases()), "the job took a slot"
        finally:
            os.kill(qemu, signal.SIGCONT)
        wait_done(job)
        out = cell.output("booting1", "atlas001")[0]
    finally:
        assert agent.wait(timeout=120) == 0
    record = vm_starts(cell.cfg)[f"{job}.0"]
    assert record["spare"] == booting[0]["job"] and "done" in out, record
    assert record["phases"]["wait for a booting spare"] > 2, record
    assert "guest boot (to host key on console)" not in record["phases"], record
    cell.assert_clean(within=30)


@pytest.mark.integration
def test_a_job_of_another_image_takes_a_spares_slot_and_a_broken_spare_is_no_failure(
        spares_cell):
    from vmimagemanager.node import JobRequest, open_node
    from vmimagemanager.node.spares import bind_spare, provision_spare

    cell = spares_cell
    life = open_node(cell.cfg)
    (_, shape, _), = cell.cfg.spares.counts  # the configured spare's shape
    while len(spares(cell)) < len(cell.cfg.slots):  # every slot holds an idle atlas spare
        provision_spare(life, "atlas", "atlas", shape)
    life.start_vm(JobRequest("7001", "0", "cms001", "cms", "cms"), bind=bind_spare)
    assert "guest boot (to host key on console)" in life.phase.seconds  # booted cold
    assert sum(1 for s in spares(cell) if s["state"] == "spare") == 2
    # spares whose VMs died are no failure: the job boots cold instead
    for row in spares(cell):
        virsh("destroy", f"vmim-{row['slot']}")
    life.phase.seconds.clear()
    started = life.start_vm(JobRequest("7002", "0", "atlas001", "atlas", "atlas"),
                            bind=bind_spare)
    assert started.spare == ""
    assert "guest boot (to host key on console)" in life.phase.seconds
    assert life.leases.find_job("7002", "0").state is LeaseState.RUNNING
    for job in ("7001", "7002"):
        life.end_job(job, "0")
    # the agent's round reclaims the dead spare and boots the one configured
    lines = agent_once(cell)
    assert any("its VM is not running" in line for line in lines), lines
    assert_only_spares(cell, idle=1)


@pytest.mark.integration
def test_outdated_spares_are_replaced_and_a_removed_image_takes_its_spares(spares_cell,
                                                                            guest_images):
    cell = spares_cell
    if not spares(cell):
        agent_once(cell)
    old = spare_facts(cell)
    time.sleep(1.5)
    data = yaml.safe_load(cell.config_path.read_text())
    data["spares"]["max_age"] = 1
    aged = cell.base / "aged.yaml"
    aged.write_text(yaml.safe_dump(data, sort_keys=False))
    lines = agent_once(cell, aged)
    assert any("older than spares.max_age" in line for line in lines), lines
    new = spare_facts(cell)
    assert new["label"] != old["label"] and new["boot"] != old["boot"]
    assert old["uuid"] not in virsh("list", "--uuid").stdout
    # removing the image retires its idle spare first
    r = cell.cli("images", "remove", "atlas")
    assert r.returncode == 0 and f"retired spare {new['label']}" in r.stdout, r.stderr
    assert spares(cell) == []
    import_test_images(load_config(str(cell.config_path)), guest_images, names=("atlas",))
    cell.assert_clean(within=30)
    # an image changed on disk after its spare booted: the spare goes, no new one boots
    agent_once(cell)
    disk = cell.cfg.image_dir / "atlas.qcow2"
    os.utime(disk, ns=(disk.stat().st_atime_ns, disk.stat().st_mtime_ns + 10**9))
    lines = agent_once(cell)
    assert any("its image cannot be used any more" in line and "changed after import" in line
               for line in lines), lines
    assert any("spare of atlas (1 core and 256 MiB) failed, next try in 30 s" in line
               for line in lines), lines
    assert spares(cell) == []
    cell.assert_clean(within=30)
    assert cell.cli("images", "remove", "atlas").returncode == 0
    import_test_images(load_config(str(cell.config_path)), guest_images, names=("atlas",))


@pytest.mark.integration
def test_the_running_agent_keeps_a_spare_ready_for_each_next_job(spares_cell):
    """The long-running agent as the harness (and systemd) runs it: jobs from the cell bind its
    spares one after the other, it boots a replacement after each, and TERM stops it cleanly."""
    cell = spares_cell
    agent_sh(cell, "start")
    try:
        labels = []
        for n in range(2):
            deadline = time.monotonic() + 120
            while not [r for r in spares(cell) if r["state"] == "spare"]:
                assert time.monotonic() < deadline, "the agent booted no spare in 120 s"
                time.sleep(0.5)
            job, out = _run_probe(cell, f"agent{n}")
            record = vm_starts(cell.cfg)[f"{job}.0"]
            assert record["spare"].startswith(f"{SPARE_JOB_ID}.") and "done" in out, record
            assert "guest boot (to host key on console)" not in record["phases"]
            labels.append(record["spare"])
        assert labels[0] != labels[1]
    finally:
        agent_sh(cell, "stop")
    retired = cell.cli("spares", "--retire")
    assert retired.returncode == 0, retired.stderr
    cell.assert_clean(within=30)


def qemu_of(slot: str) -> int | None:
    return next(iter(pids_matching(f"guest=vmim-{slot},".encode())), None)


@pytest.mark.integration
def test_a_spare_whose_start_fails_while_libvirtd_is_down_is_cleaned_once_it_answers(
        spares_cell):
    """Seen on the demo cell (issue 31): libvirtd went while the agent booted a spare, the
    spare's cleanup could not reach it, and its slot stayed tearing-down with the domain
    running for as long as the agent lived (its holder, the agent, was alive). Its QEMU is
    held with SIGSTOP while libvirtd goes, so the boot fails with libvirtd down."""
    cell = spares_cell
    assert cell.cli("spares", "--retire").returncode == 0
    cell.assert_clean(within=30)
    agent_sh(cell, "start")
    try:
        booting = wait_for(lambda: next((lease for lease in cell.all_leases()
                                         if lease.state is LeaseState.BOOTING
                                         and qemu_of(lease.slot)), None),
                           "a spare's QEMU", timeout=120, interval=0.2)
        qemu = qemu_of(booting.slot)
        os.kill(qemu, signal.SIGSTOP)
        try:
            stop_libvirtd()
        finally:
            os.kill(qemu, signal.SIGCONT)
        wait_for(lambda: all(lease.state is not LeaseState.BOOTING
                             or lease.job_label != booting.job_label
                             for lease in cell.all_leases()),
                 "the spare's start to fail", timeout=300, interval=1)
        left = [lease for lease in cell.all_leases() if lease.job_label == booting.job_label]
        assert not left or left[0].state is not LeaseState.SPARE, left
        assert run_script(str(HARNESS / "libvirt-up.sh")).returncode == 0
        answered = time.monotonic()
        # two rounds (5 s apart) after libvirtd answers: the failed spare is gone, and no
        # slot is tearing-down; a domain has a lease (the agent's new spare may be booting)
        wait_for(lambda: not any(lease.job_label == booting.job_label
                                 or lease.state is LeaseState.TEARING_DOWN
                                 for lease in cell.all_leases()),
                 "the failed spare's lease to go", timeout=60, interval=0.5)
        assert time.monotonic() - answered < 30
        slots = {lease.slot for lease in cell.all_leases()}
        assert all(d.removeprefix("vmim-") in slots for d in cell.domains()), cell.domains()
    finally:
        run_script(str(HARNESS / "libvirt-up.sh"))
        agent_sh(cell, "stop")
    assert cell.cli("spares", "--retire").returncode == 0
    cell.assert_clean(within=60)
