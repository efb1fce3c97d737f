"""The audit trail's Grid identity: read from the job's proxy by root, on the job's word."""

from __future__ import annotations

import os
import subprocess

from tests.support.ce_jobs import gram_sge_script
from vmimagemanager.audit import proxy_identity


def make_cert(path, subject: str) -> None:
    key = path.with_suffix(".key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", subject, "-keyout", str(key), "-out", str(path)],
                   check=True, capture_output=True)
    path.write_text(path.read_text() + key.read_text())  # a proxy file holds its key too


def test_an_unverified_claim_is_the_proxys_subject_without_the_proxy_parts(tmp_path):
    # self-signed: only claims (verified ones: tests/unit/test_proxy_identity.py)
    proxy = tmp_path / "x509up_u5001"
    make_cert(proxy, "/O=Grid/OU=GlobusTest/CN=Alice Example/CN=1031991551")
    claim = proxy_identity(str(proxy), os.getuid())
    assert (claim.subject, claim.verified) == ("/O=Grid/OU=GlobusTest/CN=Alice Example", False)
    legacy = tmp_path / "legacy"
    make_cert(legacy, "/O=Grid/CN=Bob/CN=proxy/CN=limited proxy")
    assert proxy_identity(str(legacy), os.getuid()).subject == "/O=Grid/CN=Bob"


def test_root_reads_no_proxy_the_job_does_not_own_nor_follows_a_link(tmp_path):
    proxy = tmp_path / "x509up"
    make_cert(proxy, "/O=Grid/CN=Alice/CN=1")
    assert proxy_identity(str(proxy), os.getuid() + 1).subject == ""  # somebody else's file
    link = tmp_path / "link"
    link.symlink_to(proxy)
    assert proxy_identity(str(link), os.getuid()).subject == ""
    assert proxy_identity("/etc/shadow", os.getuid() + 1).subject == ""
    assert proxy_identity(str(tmp_path), os.getuid()).subject == ""  # a directory
    text = tmp_path / "notes"
    text.write_text("no certificate here")
    assert proxy_identity(str(text), os.getuid()).subject == ""
    assert not proxy_identity(None, os.getuid()).subject and not proxy_identity("", 0).subject


def test_the_proxy_a_gram_script_sets_is_found_in_the_script_never_run(tmp_path):
    from vmimagemanager.batch.sge_spool import script_proxy_path

    proxy = '/home/atlas001/.globus/job/ce/1.2 "x"/$x509_`up`'
    spool_dir = tmp_path / "execd" / "active_jobs" / "7.1"
    spool_dir.mkdir(parents=True)
    (tmp_path / "execd" / "job_scripts").mkdir()
    script = tmp_path / "execd" / "job_scripts" / "7"
    spool = {"script_file": str(script), "handle_as_binary": "0"}
    script.write_text(gram_sge_script(
        queue="vm.q", directory="/home/atlas001", executable="/bin/true", arguments=[],
        stdin="/dev/null", stdout="/dev/null", stderr="/dev/null",
        environment={"HOME": "/home/atlas001", "X509_USER_PROXY": proxy},
        sge_root="/var/lib/gridengine", sge_cell="default", wall_minutes=1, cpu_minutes=1,
        memory_mb=100))
    assert script_proxy_path(str(spool_dir), spool, "7") == proxy
    # only execd's spooled copy of a script job: never a binary job's PATH, never elsewhere
    assert script_proxy_path(str(spool_dir), {**spool, "handle_as_binary": "1"}, "7") == ""
    other = tmp_path / "scheduler_sge_job_script"
    other.write_text(script.read_text())
    assert script_proxy_path(str(spool_dir), {**spool, "script_file": str(other)}, "7") == ""
    assert script_proxy_path(str(spool_dir), spool, "8") == ""
    assert script_proxy_path(None, spool, "7") == ""
    script.write_text("#!/bin/sh\nexport X509_USER_PROXY=$(cat /etc/shadow)\n")
    assert script_proxy_path(str(spool_dir), spool, "7") == ""  # only GRAM's literal form
    script.unlink()
    assert script_proxy_path(str(spool_dir), spool, "7") == ""


def test_the_sge_prolog_never_opens_a_binary_jobs_path_a_fifo_or_a_device(tmp_path):
    """`qsub -b y PATH`: SGE's spool names the user's PATH as script_file. A FIFO there would
    hang the root prolog; a device would be opened as root."""
    from vmimagemanager.batch.sge_spool import script_proxy_path

    spool_dir = tmp_path / "execd" / "active_jobs" / "7.1"
    spool_dir.mkdir(parents=True)
    (tmp_path / "execd" / "job_scripts").mkdir()
    fifo = tmp_path / "execd" / "job_scripts" / "7"
    os.mkfifo(fifo)
    for spool in ({"script_file": str(fifo), "handle_as_binary": "0"},
                  {"script_file": str(fifo), "handle_as_binary": "1"},
                  {"script_file": "/dev/zero", "handle_as_binary": "1"}):
        assert script_proxy_path(str(spool_dir), spool, "7") == ""  # returns: no hang
    fifo.unlink()
    fifo.symlink_to("/dev/zero")  # the spooled name itself a link: not followed
    assert script_proxy_path(str(spool_dir), {"script_file": str(fifo)}, "7") == ""
