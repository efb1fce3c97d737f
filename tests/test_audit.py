"""The audit trail's Grid identity: read from the job's proxy by root, on the job's word."""

from __future__ import annotations

import os
import subprocess

from vmimagemanager.audit import proxy_identity


def make_cert(path, subject: str) -> None:
    key = path.with_suffix(".key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", subject, "-keyout", str(key), "-out", str(path)],
                   check=True, capture_output=True)
    path.write_text(path.read_text() + key.read_text())  # a proxy file holds its key too


def test_an_unverified_claim_is_the_proxys_subject_without_the_proxy_parts(tmp_path):
    # self-signed: only claims (verified ones: tests/test_proxy_identity.py)
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
    from ce_jobs import gram_sge_script

    from vmimagemanager.batch.sge import script_proxy_path

    proxy = '/home/atlas001/.globus/job/ce/1.2 "x"/$x509_`up`'
    script = tmp_path / "scheduler_sge_job_script"
    script.write_text(gram_sge_script(
        queue="vm.q", directory="/home/atlas001", executable="/bin/true", arguments=[],
        stdin="/dev/null", stdout="/dev/null", stderr="/dev/null",
        environment={"HOME": "/home/atlas001", "X509_USER_PROXY": proxy},
        sge_root="/var/lib/gridengine", sge_cell="default", wall_minutes=1, cpu_minutes=1,
        memory_mb=100))
    assert script_proxy_path(str(script)) == proxy
    script.write_text("#!/bin/sh\nexport X509_USER_PROXY=$(cat /etc/shadow)\n")
    assert script_proxy_path(str(script)) == ""  # only GRAM's literal form is read
    assert script_proxy_path(None) == "" and script_proxy_path("relative") == ""
    assert script_proxy_path(str(tmp_path / "missing")) == ""
