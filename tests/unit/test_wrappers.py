"""The hook wrappers SGE calls: however the Python hook ends, SGE gets a code that never puts the
queue instance into E (prolog: 0, 99, 100; epilog: 0). Run with the real /bin/sh."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import REPO
from vmimagemanager.batch.sge_queue import hook_script, wrapper_script
from vmimagemanager.batch.wrappers import DEFAULT_STATIC_SHELL, static_shell
from vmimagemanager.errors import VmimError


def wrapper(tmp_path: Path, hook: str, body: str | None) -> Path:
    """The generated wrapper around a stand-in hook: a Python console script running `body`."""
    target = tmp_path / f"vmim-sge-{hook}"
    if body is not None:
        target.write_text(f"#!{sys.executable}\nimport os, signal, sys, time\n{body}")
        target.chmod(0o755)
    path = tmp_path / hook
    path.write_text(wrapper_script(hook, str(target), str(tmp_path / "my config.yaml"),
                                   sys.executable))
    path.chmod(0o755)
    return path


def run(path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(path), *args], capture_output=True, text=True, timeout=30,
                          env=env)


@pytest.mark.parametrize("code", [0, 99, 100])
def test_prolog_codes_sge_handles_pass_through(tmp_path, code):
    r = run(wrapper(tmp_path, "prolog", f"sys.exit({code})\n"), "7", "0", "atlas001")
    assert r.returncode == code and r.stderr == ""


@pytest.mark.parametrize(("body", "why"), [
    ("sys.exit(1)\n", "exit status 1"),
    ("os.kill(os.getpid(), signal.SIGKILL)\n", "killed by signal 9"),  # the OOM killer's way
    ("os.kill(os.getpid(), signal.SIGSEGV)\n", "killed by signal 11"),
])
def test_a_prolog_that_crashes_or_is_killed_reschedules_the_job(tmp_path, body, why):
    r = run(wrapper(tmp_path, "prolog", body), "7", "0", "atlas001")
    assert r.returncode == 99
    assert r.stderr.strip() == (f"vmimagemanager prolog: the prolog hook failed ({why}); "
                                "the job is rescheduled")


def test_a_missing_hook_reschedules_the_job(tmp_path):
    r = run(wrapper(tmp_path, "prolog", None), "7")
    assert r.returncode == 99 and "is not installed on" in r.stderr


def test_the_hook_gets_the_config_and_arguments_unchanged(tmp_path):
    out = tmp_path / "argv"
    r = run(wrapper(tmp_path, "prolog", f"open({str(out)!r}, 'w').write(''.join("
                                        "f'<{a}>' for a in sys.argv[1:]))\n"), "7", "it's a b")
    assert r.returncode == 0
    assert out.read_text() == (f"<--config><{tmp_path}/my config.yaml>"
                               "<--execd-spool></var/spool/gridengine/execd><7><it's a b>")


def test_sigterm_to_the_wrapper_reaches_the_hook_and_maps_its_status(tmp_path):
    started = tmp_path / "started"
    path = wrapper(tmp_path, "prolog",
                   "signal.signal(signal.SIGTERM, lambda *_: sys.exit(99))\n"
                   f"open({str(started)!r}, 'w').close()\nwhile True: time.sleep(0.1)\n")
    proc = subprocess.Popen([str(path), "7"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 99  # not 143: a signal death would put the queue in E


def test_an_epilog_killed_mid_teardown_runs_once_more_and_exits_0(tmp_path):
    runs = tmp_path / "runs"
    body = (f"open({str(runs)!r}, 'a').write('run\\n')\n"
            f"if open({str(runs)!r}).read().count('run') < 2: os.kill(os.getpid(), 9)\n")
    r = run(wrapper(tmp_path, "epilog", body), "7", "0", "atlas001")
    assert r.returncode == 0
    assert runs.read_text() == "run\nrun\n"
    assert "the epilog hook failed (killed by signal 9); running it once more" in r.stderr


def test_an_epilog_that_keeps_failing_still_exits_0(tmp_path):
    r = run(wrapper(tmp_path, "epilog", "sys.exit(3)\n"), "7")
    assert r.returncode == 0
    assert run(wrapper(tmp_path / ".." / tmp_path.name, "epilog", None), "7").returncode == 0


@pytest.mark.parametrize("hook", ["prolog", "epilog"])
def test_a_jobs_pythonpath_never_runs_code_in_the_root_hooks(tmp_path, hook):
    """SGE gives root's prolog and epilog the job's environment (`qsub -v` included): with a
    plain interpreter a sitecustomize.py on the job's PYTHONPATH would run as root."""
    evil = tmp_path / "evil"
    evil.mkdir()
    marker = tmp_path / "ran"
    (evil / "sitecustomize.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    seen = tmp_path / "flags"
    r = run(wrapper(tmp_path, hook, f"open({str(seen)!r}, 'w').write(str(sys.flags.isolated))"
                                    "\n"), "7", "0", "atlas001",
            env={**os.environ, "PYTHONPATH": str(evil), "PYTHONSTARTUP": str(evil / "x.py")})
    assert r.returncode == 0, r.stderr
    assert seen.read_text() == "1" and not marker.exists()


@pytest.mark.parametrize("hook", ["prolog", "starter", "epilog"])
def test_the_shipped_sge_files_are_the_generated_wrappers(hook):
    expected = hook_script(hook, f"/opt/vmimagemanager/bin/vmim-sge-{hook}",
                           "/etc/vmimagemanager/vmimagemanager.yaml",
                           "/opt/vmimagemanager/bin/python")
    assert (REPO / "sge" / hook).read_text() == expected


HOSTILE_ENV = {"OPENSSL_CONF": "/home/u/o.cnf", "OPENSSL_MODULES": "/home/u", "GCONV_PATH": "/x",
               "LOCPATH": "/x", "TMP": "/tmp/1.1.q", "TMPDIR": "/tmp/1.1.q", "HOME": "/home/u",
               "SSH_AUTH_SOCK": "/tmp/agent", "LD_AUDIT": "/x.so", "VMIM_CONFIG": "/x.yaml",
               "MALLOC_CHECK_": "3", "SGE_TASK_ID": "undefined", "X509_USER_PROXY": "/p q",
               "SGE_JOB_SPOOL_DIR": "/var/spool/x"}


@pytest.mark.parametrize("hook", ["prolog", "epilog"])
def test_the_hook_gets_the_allow_list_and_the_variables_it_reads_only(tmp_path, hook):
    """SGE hands root's hooks the job's environment: OPENSSL_CONF, GCONV_PATH, TMP and the
    like must never reach the hook (nor what it starts); SGE's own variables it reads do,
    unchanged (a space in a value included)."""
    seen = tmp_path / "env"
    r = run(wrapper(tmp_path, hook, f"import json; open({str(seen)!r}, 'w').write("
                                    "json.dumps(dict(os.environ)))\n"), "7", "0", "atlas001",
            env={"PATH": "/usr/bin:/bin", **HOSTILE_ENV})
    assert r.returncode == 0, r.stderr
    import json

    env = json.loads(seen.read_text())
    env.pop("LC_CTYPE", None)  # the interpreter's own (PEP 538 locale coercion)
    assert env == {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                   "LANG": "C.UTF-8", "SGE_TASK_ID": "undefined", "X509_USER_PROXY": "/p q",
                   "SGE_JOB_SPOOL_DIR": "/var/spool/x"}


def test_root_hook_setup_leaves_the_allow_list_and_returns_what_the_hook_reads(monkeypatch):
    from vmimagemanager.batch.base import root_hook_setup
    from vmimagemanager.rootenv import BASE_ENVIRONMENT

    for key, value in HOSTILE_ENV.items():
        monkeypatch.setenv(key, value)
    before = dict(os.environ)
    try:
        taken = root_hook_setup("vmim-test", ("X509_USER_PROXY", "SGE_TASK_ID", "UNSET_ONE"))
        assert taken == {"X509_USER_PROXY": "/p q", "SGE_TASK_ID": "undefined"}
        assert dict(os.environ) == dict(BASE_ENVIRONMENT)
        child = subprocess.run(["env"], capture_output=True, text=True, check=True).stdout
        assert not {line.partition("=")[0] for line in child.splitlines()} & set(HOSTILE_ENV)
    finally:
        os.environ.clear()
        os.environ.update(before)
        os.umask(0o022)


def test_a_function_the_job_exports_replaces_no_command_of_the_wrapper(tmp_path):
    """Where /bin/sh is bash (EL nodes), bash imports `BASH_FUNC_name%%` variables as functions
    even as sh, and SGE passes them from `qsub -v` to root's wrapper: a `wait` of the job's
    ran as root there (found in review). The wrapper's BusyBox sh imports none."""
    sh = tmp_path / "sh"
    sh.symlink_to(shutil.which("bash"))
    path = wrapper(tmp_path, "prolog", "sys.exit(0)\n")
    first, rest = path.read_text().split("\n", 1)
    assert first == f"#!{DEFAULT_STATIC_SHELL} sh"
    marker = tmp_path / "ran-as-root"
    env = {"PATH": "/usr/bin:/bin",
           "BASH_FUNC_wait%%": f'() {{ id -u > {marker}; builtin wait "$@"; }}'}
    path.write_text(f"#!{sh}\n{rest}")  # bash as sh: the attack works (the test can fail)
    run(path, "7", "0", "atlas001", env=env)
    assert marker.read_text().strip() == str(os.getuid())
    marker.unlink()
    path.write_text(f"{first}\n{rest}")
    r = run(path, "7", "0", "atlas001", env=env)
    assert r.returncode == 0 and not marker.exists(), r.stderr


@pytest.mark.parametrize("hook", ["prolog", "epilog"])
def test_no_program_of_the_wrapper_loads_a_library_the_jobs_environment_names(tmp_path, hook):
    """Root's prolog gets the job's environment. Debian's gridengine strips LD_* first, a
    gridengine whose shepherd does not would hand root's /bin/sh (dash, dynamically linked)
    the owner's ~/lib/libc.so.6. Here that libc is junk: a program that loads it cannot
    start."""
    libs = tmp_path / "lib"
    libs.mkdir()
    for name in ("libc.so.6", "libm.so.6", "libz.so.1", "libexpat.so.1"):
        (libs / name).write_bytes(b"\x7fELF junk: the job's own library")
    ran = tmp_path / "ran"
    path = wrapper(tmp_path, hook, f"open({str(ran)!r}, 'w').write(os.environ.get("
                                   "'LD_LIBRARY_PATH', 'unset'))\n")
    hostile = {"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": str(libs),
               "LD_AUDIT": str(libs / "libc.so.6"), "LD_PRELOAD": str(libs / "libm.so.6")}
    dash = tmp_path / "dash-wrapper"  # the wrapper as it was: the test can fail
    dash.write_text("#!/bin/sh -p\n" + path.read_text().split("\n", 1)[1])
    dash.chmod(0o755)
    assert "libc.so.6" in run(dash, "7", "0", "atlas001", env=hostile).stderr
    assert not ran.exists()
    r = run(path, "7", "0", "atlas001", env=hostile)
    assert r.returncode == 0 and ran.read_text() == "unset", r.stderr


def test_the_wrappers_shell_is_a_static_program_only_root_changes(tmp_path):
    assert static_shell() == DEFAULT_STATIC_SHELL  # install-deps installs busybox-static
    writable = tmp_path / "busybox"
    shutil.copy(DEFAULT_STATIC_SHELL, writable)
    writable.chmod(0o777)
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\n")
    cases = {"/bin/dash": "is dynamically linked", str(writable): "only root can change",
             str(script): "is not an ELF program", str(tmp_path): "not a regular file"}
    with pytest.raises(VmimError) as caught:
        static_shell((*cases, str(tmp_path / "absent")))
    message = str(caught.value)
    assert message.startswith("no statically linked BusyBox found (")
    assert "install busybox-static (Debian)" in message and "absent" not in message
    for path, why in cases.items():
        assert f"{path} " in message and why in message
    assert static_shell((str(tmp_path / "absent"), str(script), DEFAULT_STATIC_SHELL)) \
        == DEFAULT_STATIC_SHELL
    # a static program that is no BusyBox with sh and env: ldconfig (static in glibc's Debian
    # packaging) answers `--list` with no applet
    ldconfig = "/sbin/ldconfig"
    with pytest.raises(VmimError, match=f"{ldconfig} has no sh and no env applet"):
        static_shell((ldconfig,))
