"""The guest as an attacker (docs/security.md): root inside a job's VM, standing for a VO's root,
against the owner's shared home and the node; and QEMU itself, never root.

Through the real cell: a job of atlas001 runs in its VM (cold, and bound from a warm spare);
`vmimagemanager exec` runs the attack as root in that VM, as a VO's root (its init, a setuid
file of its image, a kernel exploit) could. On the host, nothing but what the owner could make:
no device node, no file of root's or of another uid, no setuid-root file.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests.support.sgecell import close_vm_cell, home, open_vm_cell, sge, wait_done, wait_for
from vmimagemanager.accounts import account
from vmimagemanager.audit import vm_starts

QUEUE = "vmguard.q"
OWNER = "atlas001"
# Each step on its own: one refused step must not stop the others being tried.
ATTACK = r"""
cd /home/atlas001 || exit 9
t=vmim-attack
for step in "mknod $t-blk b 8 0" "mknod $t-chr c 1 3" "mkfifo $t-fifo" \
            "cp /bin/busybox $t-sh" "chown 0:0 $t-sh" "chmod 4755 $t-sh" \
            "touch $t-root" "touch $t-other" "chown 12345:12345 $t-other" \
            "mkdir $t-dir" "ln -s /etc/shadow $t-link" "chmod 0777 /home/atlas001"; do
  if sh -c "$step" 2>/dev/null; then echo "ok: $step"; else echo "refused: $step"; fi
done
echo attack-done
"""


@pytest.fixture(scope="module")
def guard_cell(libvirt_system, guest_images):
    cell = open_vm_cell(QUEUE, "vmim-guard-", guest_images, slots=2, queue_slots=2)
    yield cell
    close_vm_cell(cell)


def qemu_processes(cell) -> dict[str, dict[str, str]]:
    """domain name -> /proc status (Uid, Gid, CapEff, ...) of the QEMU that runs it."""
    found = {}
    for slot in cell.cfg.slots:
        pid_file = Path(f"/run/libvirt/qemu/{slot.domain_name}.pid")
        if not pid_file.exists():
            continue
        with open(f"/proc/{int(pid_file.read_text())}/status", encoding="ascii") as fh:
            found[slot.domain_name] = dict(line.rstrip("\n").split(":\t", 1)
                                           for line in fh if ":\t" in line)
    return found


def assert_unprivileged(status: dict[str, str]) -> None:
    assert "0" not in status["Uid"].split(), status["Uid"]
    assert "0" not in status["Gid"].split(), status["Gid"]
    assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0, status


def what_the_owner_could_not_make(paths: list[Path]) -> list[str]:
    """Every one of `paths` the owner could not have made: another owner's, a device node."""
    owner = account(OWNER)
    bad = []
    for entry in paths:
        st = os.lstat(entry)
        if st.st_uid != owner.uid:
            bad.append(f"{entry} owned by {st.st_uid}")
        if stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode):
            bad.append(f"{entry} is a device node")
    return bad


def run_attack(cell, slot: str) -> str:
    r = cell.cli("exec", slot, "--", "sh", "-c", ATTACK, timeout=180)
    assert "attack-done" in r.stdout, r.stdout + r.stderr
    return r.stdout


def running_slot(cell, job_id: str) -> str:
    return cell.wait_lease_state(job_id, "running", timeout=240).slot


def test_root_in_a_jobs_vm_gets_only_the_owners_rights_on_the_shared_home(guard_cell):
    cell = guard_cell
    owner_home = home(OWNER)
    before = {p.name for p in owner_home.iterdir()}
    mode = stat.S_IMODE(owner_home.stat().st_mode)
    job = cell.run_job("guard-cold", OWNER, sleep=90)
    try:
        slot = running_slot(cell, job)
        out = run_attack(cell, slot)
        statuses = qemu_processes(cell)
        assert statuses, "no QEMU process found for the job's VM"
        for status in statuses.values():
            assert_unprivileged(status)
    finally:
        sge("qdel", job, check=False)
    # what appeared in the home besides the job's own .o/.e files (execd's, as the owner)
    made = sorted(p for p in owner_home.iterdir()
                  if p.name not in before and not p.name.startswith("vmim-guard-cold."))
    try:
        # root in the guest is no uid of the server's user namespace: it makes nothing at all
        assert made == [], made
        assert [line for line in out.splitlines() if line.startswith("ok:")] == [
            "ok: chmod 0777 /home/atlas001"], out  # the owner's right on the host too
        assert not what_the_owner_could_not_make([owner_home]), owner_home
    finally:
        for path in made:
            if path.is_dir() and not path.is_symlink():
                os.rmdir(path)
            else:
                path.unlink()
        os.chmod(owner_home, mode)  # a chmod of the home is the owner's right: put it back


def test_the_owners_own_job_still_writes_its_files_as_the_owner(guard_cell):
    cell = guard_cell
    marker = home(OWNER) / "vmim-guard-written"
    marker.unlink(missing_ok=True)
    job = cell.submit("guard-write", OWNER, "-b", "y", "/bin/sh", "-c",
                      f"echo mine > {marker}; stat -c %U {marker}")
    wait_done(job)
    out, err = cell.output("guard-write", OWNER)
    try:
        assert out.strip().endswith(OWNER), out + err
        assert marker.read_text() == "mine\n"
        assert marker.stat().st_uid == account(OWNER).uid
    finally:
        marker.unlink(missing_ok=True)


def test_qemu_of_an_admin_vm_is_unprivileged_too(guard_cell):
    cell = guard_cell
    slot = cell.cfg.slots[-1].name
    r = cell.cli("up", slot, "--image", "atlas", timeout=240)
    assert r.returncode == 0, r.stderr
    try:
        status = qemu_processes(cell)[cell.cfg.slot(slot).domain_name]
        assert_unprivileged(status)
    finally:
        r = cell.cli("down", slot, timeout=240)
        assert r.returncode == 0, r.stderr


def test_a_spares_guest_root_cannot_steer_where_the_owners_home_is_served(
        libvirt_system, guest_images):
    """Before the bind, root in the spare replaces the home's mount point with links to host-
    looking paths: nothing on the host is mounted over, created or removed (no host path the
    guest prepared is looked up), the bind sees that the home is not where it mounted it and
    gives up, and the job boots a VM of its own and runs."""
    cell = open_vm_cell("vmgspare.q", "vmim-gspare-", guest_images, slots=2, queue_slots=1,
                        extra={"spares": {"vos": {"atlas": 1}}})
    try:
        r = cell.cli("agent", "--once", timeout=300)
        assert r.returncode == 0, r.stderr
        (spare,) = [lease for lease in cell.all_leases() if str(lease.state) == "spare"]
        prepare = ("rm -rf /home/atlas001; ln -s /etc /home/atlas001; mkdir -p /run/x; "
                   "ln -s /tmp /run/x/home; echo prepared")
        r = cell.cli("exec", spare.slot, "--", "sh", "-c", prepare, timeout=120)
        assert "prepared" in r.stdout, r.stdout + r.stderr
        assert_unprivileged(qemu_processes(cell)[cell.cfg.slot(spare.slot).domain_name])
        mounts_before = Path("/proc/self/mountinfo").read_text()
        etc_before = sorted(os.listdir("/etc"))
        canary = Path("/tmp") / f"vmim-gspare-canary-{os.getpid()}"
        canary.write_text("host's\n")
        marker = home(OWNER) / "vmim-gspare-written"
        marker.unlink(missing_ok=True)
        job = cell.submit("gspare", OWNER, "-b", "y", "/bin/sh", "-c",
                          f"echo bound > {marker}; echo done")
        wait_done(job)
        start = vm_starts(cell.cfg)[f"{job}.0"]
        assert not start.get("spare"), start  # the sabotaged spare was not used
        assert "done" in cell.output("gspare", OWNER)[0]
        assert Path("/proc/self/mountinfo").read_text() == mounts_before
        assert sorted(os.listdir("/etc")) == etc_before
        assert canary.read_text() == "host's\n"
        canary.unlink()
        assert marker.read_text() == "bound\n" and marker.stat().st_uid == account(OWNER).uid
        marker.unlink()
        wait_for(lambda: len(cell.domains()) <= 1, "the job's VM to be destroyed")
    finally:
        close_vm_cell(cell)
