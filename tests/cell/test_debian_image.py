"""A real distribution image through the real cell: Debian 12 with systemd, real cloud-init
(NoCloud) and OpenSSH, built by examples/guest/build_debian_image.py (mmdebstrap; cached).

One boot for a GRAM-shaped job through the SGE queue, one for `images check`, side by side, and
one made a snapshot a job is restored from (a real image's boot under TCG is the slow part: it
belongs in these three, not in every test).
"""

from __future__ import annotations

import json
import pwd
import subprocess
import sys

import pytest

from tests.support import REPO, require
from tests.support.ce_submit import CE_ARGS, CE_ENV, parse, remove_ce_files, submit_gram_job
from tests.support.sgecell import SGE_ENV, close_vm_cell, open_vm_cell, wait_done
from vmimagemanager.audit import vm_starts

pytestmark = [pytest.mark.integration, pytest.mark.sge]

QUEUE = "vmdeb.q"
IMAGE = "atlas-debian"


@pytest.fixture(scope="module")
def debian(libvirt_system, guest_images):
    built = subprocess.run([sys.executable, str(REPO / "examples/guest/build_debian_image.py"),
                            "--json"], capture_output=True, text=True)
    require(built.returncode == 0, f"building the Debian image failed: {built.stderr[-2000:]}")
    manifest = json.loads(built.stdout)
    common = f"{SGE_ENV['SGE_ROOT']}/{SGE_ENV['SGE_CELL']}/common"
    cell = open_vm_cell(QUEUE, "vmim-deb-", guest_images, extra={
        "boot_timeout": 300,
        "shared_paths": [{"path": "/home", "mode": "hypervisor"},
                         {"path": common, "mode": "hypervisor", "scope": "tree",
                          "readonly": True}],
        "vos": {"atlas": {"image": IMAGE, "groups": ["atlas"]}}})
    d = manifest["dir"]
    r = cell.cli("images", "import", IMAGE, f"{d}/{manifest['disk']}", "--kernel",
                 f"{d}/{manifest['kernel']}", "--initrd", f"{d}/{manifest['initrd']}",
                 "--cmdline", manifest["cmdline"], timeout=600)
    assert r.returncode == 0, r.stderr
    cell.ce = {"gram": submit_gram_job(cell, "atlas002")}
    yield cell
    close_vm_cell(cell)
    remove_ce_files(cell.ce)


def test_images_check_passes_on_the_real_debian_image(debian):
    r = debian.cli("images", "check", IMAGE, timeout=900)
    assert r.returncode == 0, (r.stdout, r.stderr)
    lines = [line for line in r.stdout.splitlines() if line.strip()]
    assert not [line for line in lines if "FAIL" in line], r.stdout
    assert sum(1 for line in lines if line.lstrip().startswith("ok")) >= 6, r.stdout


def test_a_gram_shaped_job_runs_unchanged_in_the_real_debian_image(debian):
    job = debian.ce["gram"]
    user, jobdir, workdir = job["user"], job["jobdir"], job["workdir"]
    record = wait_done(job["job_id"], timeout=900)[0]
    out = (jobdir / "stdout").read_text()
    err = (jobdir / "stderr").read_text()
    info = parse(out)
    assert record["exit_status"] == "3", (record, out, err)
    assert info["marker"][0].startswith("VO=atlas "), (out, err)
    entry = pwd.getpwnam(user)
    assert info["user"] == [f"{user} uid={entry.pw_uid} gid={entry.pw_gid}"]
    assert info["pwd"] == [str(workdir)]
    assert info["arg"] == [f"<{a}>" for a in CE_ARGS]
    assert info["stdin"] == ["line from stdin"]
    assert info["gridtest"] == [CE_ENV["GRID_TEST"]]
    assert info["proxy"] == [f"GRAM-PROXY-FOR-{user}"]
    assert info["cms001_file"] == ["absent"]
    assert err.strip() == "payload stderr line", err
    started = vm_starts(debian.cfg).get(f"{job['job_id']}.0")
    assert started and started["image"] == IMAGE, started
    debian.assert_clean(within=120)


def test_a_job_restored_from_the_debian_images_snapshot_starts_in_seconds(debian):
    """The real image's snapshot (taken after cloud-init's first boot) restores as a machine
    of its own: systemd, cloud-init and OpenSSH take the renewal (clock, host name,
    machine-id, a new host key reloaded by sshd) and the job runs."""
    r = debian.cli("snapshots", "make", IMAGE, timeout=900)
    assert r.returncode == 0, r.stderr
    original = debian.config_path.read_text()
    debian.config_path.write_text(original + "snapshot_starts: true\n")
    try:
        job = debian.run_job("debsnap", user="atlas001")
        record = wait_done(job, timeout=600)[0]
    finally:
        debian.config_path.write_text(original)
    out, err = debian.output("debsnap", "atlas001")
    assert record["exit_status"] == "0" and "finished" in out, (record, out, err)
    started = vm_starts(debian.cfg)[f"{job}.0"]
    assert started["snapshot"].startswith(f"{IMAGE}.") and not started.get("snapshot_failed")
    assert "guest boot (to host key on console)" not in started["phases"], started
    r = debian.cli("snapshots", "remove")
    assert r.returncode == 0 and "removed the snapshot" in r.stdout, r.stdout
    debian.assert_clean(within=120, keep=("snapshots",))
