"""The real Globus GRAM5 CE in the loop: gatekeeper + jobmanager-sge, unchanged, in front of the
cell's VM queue (harness/ce-gram.sh). Jobs are submitted as the Grid user does, with the real
clients and a proxy of the user's certificate from the test CA, to this host's name (127.0.0.1).

What the user submits is what any lcg-CE user submitted; each job runs in the VM of the VO its
Grid identity is mapped to.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support import HARNESS, require, run_script
from tests.support.sgecell import (
    BROKEN_VOS,
    SGE_ENV,
    close_vm_cell,
    home,
    import_broken_image,
    open_vm_cell,
    wait_done,
    wait_for,
)
from tests.support.sgecell import grid_client as grid
from vmimagemanager.audit import vm_starts

pytestmark = [pytest.mark.integration, pytest.mark.sge, pytest.mark.ce]

QUEUE = "vmgram.q"
USERS = ("atlas001", "cms001", "atlas002")  # atlas002's VO image cannot boot
CONTACT = f"{os.uname().nodename}/jobmanager-sge"
HOSTILE = ["two words", "it's", 'say "hi"', "$HOME", "*", "a;b|c"]
# globus-job-run itself (a /bin/sh script: dash's `echo` turns "a\b" into a backspace, and an
# empty argument gives an empty line it drops) loses these two; globusrun with RSL keeps them
RSL_ONLY = ["a\\b", ""]
SHOW_ARGS = 'for a in "$@"; do printf "<%s>\\n" "$a"; done'


@pytest.fixture(scope="module")
def gram(libvirt_system, guest_images):
    common = f"{SGE_ENV['SGE_ROOT']}/{SGE_ENV['SGE_CELL']}/common"
    cell = open_vm_cell(QUEUE, "vmim-gram-", guest_images, extra={
        "max_boot_attempts": 2, "on_boot_failure": "fail",
        "shared_paths": [{"path": "/home", "mode": "hypervisor"},
                         {"path": common, "mode": "hypervisor", "scope": "tree",
                          "readonly": True}],
        "vos": BROKEN_VOS})
    import_broken_image(cell, guest_images)
    up = run_script(str(HARNESS / "ce-gram.sh"), "up", QUEUE, *USERS)
    require(up.returncode == 0, f"the GRAM CE did not come up: {up.stderr.strip()}")
    for user in USERS:
        r = subprocess.run(["bash", str(HARNESS / "ce-gram.sh"), "proxy", user],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    yield cell
    close_vm_cell(cell)
    run_script(str(HARNESS / "ce-gram.sh"), "down")


def test_each_grid_identity_runs_in_its_own_vos_image_with_its_arguments(gram):
    script = f"id -un; cat /etc/grid-middleware-release; {SHOW_ARGS}"
    with ThreadPoolExecutor(2) as pool:  # both VOs' jobs at once
        runs = {user: pool.submit(grid, user, "globus-job-run", CONTACT, "/bin/sh", "-c",
                                  script, "sh", *HOSTILE) for user in ("atlas001", "cms001")}
    for user, run in runs.items():
        r = run.result()
        out, err = r.stdout, r.stderr
        assert r.returncode == 0, (out, err)
        lines = out.splitlines()
        assert lines[0] == user, out
        assert lines[1].startswith(f"VO={user[:-3]} "), out  # the VO's own image
        assert lines[2:] == [f"<{a}>" for a in HOSTILE], out
    gram.assert_clean(within=120)


def test_globusrun_with_rsl_stages_files_passes_environment_and_returns_output(gram):
    user = "atlas001"
    tag = f"vmim-rsl-{os.getpid()}"
    local = home(user) / tag
    subprocess.run(["runuser", "-u", user, "--", "mkdir", "-p", str(local)], check=True)
    for name, text in (("in.txt", "line from the client's stdin\n"),
                       ("data.in", "staged in from the client\n")):
        subprocess.run(["runuser", "-u", user, "--", "sh", "-c", f"cat > {local / name}"],
                       input=text, text=True, check=True)
    payload = ("cat; printf '<%s>\\n' \"$@\"; echo \"env=<$GRID_TEST>\"; "
               "tr a-z A-Z < staged.in > staged.out; "
               "echo 'to stderr' >&2; "
               "sed -n 1p \"$X509_USER_PROXY\"; stat -c 'proxy %U %a' \"$X509_USER_PROXY\"; "
               "exit 3")
    args = " ".join('"' + a.replace('"', '""') + '"' for a in ["sh", *HOSTILE, *RSL_ONLY])
    rsl = (f'&(executable=/bin/sh)(arguments="-c" "{payload.replace(chr(34), chr(34) * 2)}" '
           f'{args})'
           f'(environment=(GRID_TEST "value with spaces and \'quotes\'"))'
           f'(stdin=$(GLOBUSRUN_GASS_URL)#"{local}/in.txt")'
           f'(file_stage_in=($(GLOBUSRUN_GASS_URL)#"{local}/data.in" staged.in))'
           f'(file_stage_out=(staged.out $(GLOBUSRUN_GASS_URL)#"{local}/data.out"))')
    r = grid(user, "globusrun", "-s", "-r", CONTACT, rsl)
    out, err = r.stdout, r.stderr
    assert "line from the client's stdin" in out, (out, err)
    assert "env=<value with spaces and 'quotes'>" in out, (out, err)
    shown = [line for line in out.splitlines() if line.startswith("<")]
    assert shown == [f"<{a}>" for a in [*HOSTILE, *RSL_ONLY]], out
    assert "to stderr" in err, err
    assert "-----BEGIN CERTIFICATE-----" in out and f"proxy {user} 600" in out, out
    assert (local / "data.out").read_text() == "STAGED IN FROM THE CLIENT\n"
    # GRAM's clients report DONE whatever the exit code (globusrun exits 0, as it does for a
    # job on the CE's fork job manager); the payload's code is the batch system's exit status
    assert r.returncode == 0, (out, err)
    job_id = [e["job"] for e in vm_starts(gram.cfg).values()
              if e["owner"] == user][-1].split(".")[0]
    assert wait_done(job_id)[0]["exit_status"] == "3"
    # the audit trail: the Grid identity of the delegated proxy, the image and how it ended
    subject = subprocess.run(["openssl", "x509", "-noout", "-subject", "-nameopt", "compat",
                              "-in", str(home(user) / ".globus/usercert.pem")],
                             capture_output=True, text=True, check=True).stdout
    events = wait_for(lambda: (e := json.loads(gram.cli("history", "--job", job_id,
                                                        "--json").stdout))
                      and e[-1]["event"] == "end" and e, "the job's end in the audit trail",
                      timeout=60, interval=1)
    start = [e for e in events if e["event"] == "start" and e["outcome"] == "ready"][-1]
    image = gram.cli("images", "list", "--json").stdout
    assert start["identity"] == subject.strip().removeprefix("subject=").strip()
    assert (start["owner"], start["vo"], start["image"]) == (user, "atlas", "atlas")
    assert start["image_sha256"][:16] in image and start["domain"].startswith("vmim-")
    assert events[-1]["exit_status"] == "3"
    gram.assert_clean(within=120)


def test_submit_status_get_output_and_exit_code(gram):
    user = "cms001"
    r = grid(user, "globus-job-submit", CONTACT, "/bin/sh", "-c",
             "echo from the batch job; exit 0")
    assert r.returncode == 0, r.stderr
    contact = r.stdout.strip().splitlines()[-1]
    assert contact.startswith("https://"), r.stdout
    wait_for(lambda: grid(user, "globus-job-status", contact).stdout.strip() == "DONE",
             f"{contact} DONE", timeout=600, interval=3)
    r = grid(user, "globus-job-get-output", contact)
    assert r.stdout.strip() == "from the batch job", (r.stdout, r.stderr)
    grid(user, "globus-job-clean", "-f", contact)
    gram.assert_clean(within=120)


def test_cancelling_a_running_job_leaves_no_vm(gram):
    user = "atlas001"
    r = grid(user, "globus-job-submit", CONTACT, "/bin/sleep", "600")
    assert r.returncode == 0, r.stderr
    contact = r.stdout.strip().splitlines()[-1]
    wait_for(lambda: grid(user, "globus-job-status", contact).stdout.strip() == "ACTIVE",
             f"{contact} ACTIVE", timeout=600, interval=2)
    assert gram.domains(), "an active job without a VM"
    r = grid(user, "globus-job-cancel", "-f", contact)
    assert r.returncode == 0, (r.stdout, r.stderr)
    wait_for(lambda: not gram.domains(), "the VM to go", timeout=120, interval=1)
    gram.assert_clean(within=120)


def test_a_job_whose_image_cannot_boot_comes_back_failed_with_the_reason(gram):
    user = "atlas002"
    started = time.monotonic()
    r = grid(user, "globus-job-run", CONTACT, "/bin/echo", "never printed")
    assert "never printed" not in r.stdout
    assert "the VM failed to start 2 times (VO broken, image broken)" in r.stderr, \
        (r.returncode, r.stdout, r.stderr, time.monotonic() - started)
    assert re.search(r"the job did not run", r.stderr)
    gram.assert_clean(within=120)
