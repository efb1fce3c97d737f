"""Integration: real libvirtd + QEMU guests booted through the library, reached over ssh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import make_base_dir
from vmimagemanager.errors import BootError, GuestError
from vmimagemanager.node import JobRequest
from vmimagemanager.node.model import lease_files

pytestmark = pytest.mark.integration


def test_job_runs_as_pool_user_in_the_vo_image(atlas_session):
    r, w = os.pipe()
    rc = atlas_session.run(["sh", "-c", "id -un; hostname; cat /etc/grid-middleware-release"],
                           {}, None, stdin_fd=None, stdout_fd=w)
    os.close(w)
    out = os.read(r, 65536).decode()
    os.close(r)
    assert rc == 0
    user, host, release = out.splitlines()
    assert user == "atlas001"
    assert host == "t1" != os.uname().nodename
    assert release.startswith("VO=atlas ")


@pytest.mark.parametrize("status", [0, 1, 2, 99, 255])
def test_exit_status_passes_through(atlas_session, status):
    assert atlas_session.run(["sh", "-c", f"exit {status}"], {}, stdin_fd=None) == status


def test_killed_payload_reports_128_plus_signal(atlas_session):
    assert atlas_session.run(["sh", "-c", "kill -KILL $$"], {}, stdin_fd=None) == 137
    assert atlas_session.run(["sh", "-c", "kill -TERM $$"], {}, stdin_fd=None) == 143


def _capture(session, argv, env=None, cwd=None, stdin: bytes | None = None):
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    in_r = None
    if stdin is not None:
        in_r, in_w = os.pipe()
        threading.Thread(target=lambda: (os.write(in_w, stdin), os.close(in_w)),
                         daemon=True).start()
    chunks = {out_r: [], err_r: []}

    def drain(fd):
        while data := os.read(fd, 1 << 16):
            chunks[fd].append(data)

    readers = [threading.Thread(target=drain, args=(fd,)) for fd in (out_r, err_r)]
    for t in readers:
        t.start()
    rc = session.run(argv, env or {}, cwd, stdin_fd=in_r, stdout_fd=out_w, stderr_fd=err_w)
    os.close(out_w)
    os.close(err_w)
    for t in readers:
        t.join()
    if in_r is not None:
        os.close(in_r)
    return rc, b"".join(chunks[out_r]), b"".join(chunks[err_r])


def test_stdin_stdout_stderr_and_cwd(atlas_session):
    rc, out, err = _capture(atlas_session, ["sh", "-c", "pwd; cat; echo oops >&2; exit 4"],
                            cwd="/home/atlas001", stdin=b"line1\nline2\x00\xff")
    assert rc == 4
    assert out == b"/home/atlas001\nline1\nline2\x00\xff"
    assert err == b"oops\n"


def test_100_mb_binary_output_arrives_intact(atlas_session):
    import hashlib

    size = 100 * 1024 * 1024
    script = (f"rm -f /tmp/f; mkfifo /tmp/f; md5sum < /tmp/f >&2 & "
              f"head -c {size} /dev/urandom | tee /tmp/f; wait; rm -f /tmp/f")
    rc, out, err = _capture(atlas_session, ["sh", "-c", script])
    assert rc == 0
    assert len(out) == size
    assert err.decode().split()[0] == hashlib.md5(out).hexdigest()


def test_output_written_after_the_payload_exits_is_still_delivered(atlas_session):
    """sshd may send the exit status first; the output is complete only at EOF (as in a .o file)."""
    script = "(sleep 2; echo late; echo late-err >&2) & echo early"
    rc, out, err = _capture(atlas_session, ["sh", "-c", script])
    assert (rc, out, err) == (0, b"early\nlate\n", b"late-err\n")


def test_a_background_process_holding_the_output_does_not_keep_the_job_running(atlas_session):
    result = {}
    worker = threading.Thread(target=lambda: result.update(
        r=_capture(atlas_session, ["sh", "-c", "sleep 120 & echo done"])), daemon=True)
    worker.start()
    worker.join(timeout=60)  # the sleep holds stdout for 120 s; we stop waiting long before
    assert not worker.is_alive(), "run() waited for a background process of the payload"
    assert result["r"] == (0, b"done\n", b"")


def test_only_the_host_key_from_the_console_is_accepted(atlas_vm, vm_setup):
    """The pinned key is the only one: another key (as a process that took the forwarded port
    would present) is refused, and a booting job fails instead of retrying."""
    import glob

    from vmimagemanager.context import key_path
    from vmimagemanager.guest import Endpoint, HostKeyMismatch, connect, wait_for_ssh
    from vmimagemanager.seed import generate_keypair

    _lease, ctx = atlas_vm
    other = " ".join(generate_keypair("impostor").public_line.split()[:2])
    endpoint = Endpoint(ctx.host, ctx.port, ctx.user, key_path(vm_setup[1].run_dir, ctx.label),
                        other)
    before = set(glob.glob("/tmp/vmim-ssh-*"))
    with pytest.raises(HostKeyMismatch, match="presented a host key other than"):
        connect(endpoint)
    with pytest.raises(BootError, match="refusing to connect"):
        wait_for_ssh(endpoint, time.monotonic() + 30)
    assert set(glob.glob("/tmp/vmim-ssh-*")) == before  # no key copy or socket left


def test_a_session_leaves_no_process_key_or_socket_behind(atlas_vm, vm_setup):
    import glob

    from vmimagemanager.context import key_path
    from vmimagemanager.guest import Endpoint, connect

    _lease, ctx = atlas_vm
    key = key_path(vm_setup[1].run_dir, ctx.label).read_bytes()
    before = set(glob.glob("/tmp/vmim-ssh-*"))
    session = connect(Endpoint(ctx.host, ctx.port, ctx.user, key, ctx.host_key))  # in memory
    private = set(glob.glob("/tmp/vmim-ssh-*")) - before
    assert len(private) == 1
    (path,) = private
    assert os.stat(path).st_mode & 0o777 == 0o700
    assert os.stat(f"{path}/key").st_mode & 0o777 == 0o600
    assert session.check_call("id -un").strip() == ctx.user
    master = session._master.pid
    session.close()
    assert not os.path.exists(path)
    assert not Path(f"/proc/{master}").exists() or \
        Path(f"/proc/{master}/stat").read_text().split()[2] == "Z"
    with pytest.raises(GuestError, match="connection to the VM is closed"):
        session.check_call("true")


def test_large_output_on_both_streams_at_once_does_not_deadlock(atlas_session):
    size = 16 * 1024 * 1024
    script = f"yes out | head -c {size} & yes err | head -c {size} >&2; wait"
    rc, out, err = _capture(atlas_session, ["sh", "-c", script])
    assert rc == 0
    assert out == b"out\n" * (size // 4)
    assert err == b"err\n" * (size // 4)


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(env=st.dictionaries(st.from_regex(r"\A[A-Z][A-Z0-9_]{0,8}\Z").filter(
                               lambda k: k not in {"PATH", "IFS", "ENV", "PWD", "SHLVL"}),
                           st.text(st.characters(blacklist_categories=("Cs",),
                                                 blacklist_characters="\0"), max_size=30),
                           max_size=3),
       args=st.lists(st.text(st.characters(blacklist_categories=("Cs",),
                                           blacklist_characters="\0"), max_size=20),
                     max_size=3))
def test_environment_and_arguments_round_trip(atlas_session, env, args):
    env = {**env, "QUOTES": "a'b\"c $HOME `id` \\n\nline2 ü €"}
    # NUL-framed: the argument count, the arguments, then the environment (env -0)
    rc, out, _ = _capture(atlas_session, ["sh", "-c", 'printf "%s\\0" "$#"; '
                                          'for k; do printf "%s\\0" "$k"; done; env -0',
                                          "argv0", *args], env)
    assert rc == 0
    items = out.split(b"\0")
    count = int(items[0])
    got_args = [a.decode() for a in items[1:1 + count]]
    assert got_args == args
    got_env = dict(item.decode().split("=", 1) for item in items[1 + count:] if item)
    for key, value in env.items():
        assert got_env[key] == value


def test_upload_is_private_to_the_user(atlas_session):
    atlas_session.upload(b"proxy-data", "/tmp/x509up_u5001", 0o600)
    assert atlas_session.check_call("stat -c '%a %U' /tmp/x509up_u5001; "
                                    "cat /tmp/x509up_u5001") == "600 atlas001\nproxy-data"


def test_sigterm_to_the_host_side_stops_the_remote_payload(atlas_session):
    holder = {}

    def run():
        holder["rc"] = atlas_session.run(["sh", "-c", "echo $$ > /tmp/sleeper; sleep 300"], {},
                                         stdin_fd=None)

    t = threading.Thread(target=run)
    t.start()
    time.sleep(3)
    atlas_session.request_stop()
    t.join(60)
    assert not t.is_alive()
    assert holder["rc"] == 143
    pid = atlas_session.check_call("cat /tmp/sleeper").strip()
    assert atlas_session.check_call(f"kill -0 {pid} 2>/dev/null && echo alive || echo gone") \
        == "gone\n"


def test_job_key_is_readable_by_its_owner_only(atlas_vm, vm_setup):
    from vmimagemanager.context import key_path

    _lease, ctx = atlas_vm
    key = key_path(vm_setup[1].run_dir, ctx.label)
    own = subprocess.run(["su", "atlas001", "-c", f"head -c 10 {key}"], capture_output=True)
    assert own.returncode == 0 and own.stdout.startswith(b"-----")
    for other in ("atlas002", "cms001"):
        r = subprocess.run(["su", other, "-c", f"cat {key}; ls {key.parent.parent}"],
                           capture_output=True)
        assert r.returncode != 0 and b"-----" not in r.stdout
    admin = vm_setup[1].state_dir / "keys" / "admin_ed25519"
    r = subprocess.run(["su", "atlas001", "-c", f"cat {admin}"], capture_output=True)
    assert r.returncode != 0


def test_fresh_overlay_per_lease_and_nothing_left_behind(life, vm_setup):
    from vmimagemanager.context import key_path, read_context
    from vmimagemanager.guest import Endpoint, connect

    cfg = vm_setup[1]

    def session_for(label):
        ctx = read_context(cfg.run_dir, label)
        return connect(Endpoint(ctx.host, ctx.port, ctx.user, key_path(cfg.run_dir, label),
                                ctx.host_key))

    life.start_vm(JobRequest("9101", "0", "cms001", "cms", "cms"), slots=["t2"])
    files = lease_files(cfg, "t2", "9101.0")
    assert files.overlay.exists() and files.seed.exists()
    s = session_for("9101.0")
    s.check_call("echo secret > /home/cms001/left-by-job-9101; sync")
    assert "VO=cms" in s.check_call("cat /etc/grid-middleware-release")
    s.close()
    life.end_vm("t2")
    assert not life.hv.is_running("vmim-t2")
    assert not files.overlay.exists() and not files.seed.exists()
    assert not (cfg.run_dir / "jobs" / "9101.0").exists()
    assert life.leases.get("t2") is None

    life.start_vm(JobRequest("9102", "0", "cms001", "cms", "cms"), slots=["t2"])
    s = session_for("9102.0")
    assert s.check_call("ls /home/cms001/left-by-job-9101 2>/dev/null || echo absent") == \
        "absent\n"
    s.close()
    life.end_vm("t2")
    assert life.reconcile(dry_run=True) == [] or all("t1" in a for a in [])


def test_the_epilog_leaves_the_destroy_to_a_detached_process_and_the_slot_waits(life,
                                                                                 vm_setup):
    """teardown.end_job (the epilog) records the VM's usage and returns; a process of its own, out
    of the job's session and groups, destroys the VM and frees the slot. A job that wants the
    slot meanwhile waits for it instead of being handed a slot whose VM still runs."""
    from vmimagemanager.teardown import end_job

    cfg = vm_setup[1]
    life.start_vm(JobRequest("9111", "0", "atlas001", "atlas", "atlas"), slots=["t2"])
    ended = end_job(life, "9111", "0")
    assert ended is not None and ended.usage is not None  # measured before the VM went
    assert ended.usage["cpu_seconds"] > 0 and ended.lease.job_label == "9111.0"
    lease = life.leases.get("t2")
    if lease is not None:  # the detached teardown is still at work (it usually is)
        assert str(lease.state) == "tearing-down" and lease.pid != os.getpid()
        holder = lease.pid
        status = Path(f"/proc/{holder}/status").read_text().splitlines()
        assert [line.split()[1:] for line in status if line.startswith("Groups:")] == [[]]
        assert os.getsid(holder) == holder  # a session of its own
    life.start_vm(JobRequest("9112", "0", "atlas001", "atlas", "atlas"), slots=["t2"])
    assert life.leases.get("t2").job_label == "9112.0"
    life.end_vm("t2")
    records = [json.loads(line)["job"] for line in
               (cfg.state_dir / "usage.jsonl").read_text().splitlines()]
    assert records.count("9111.0") == 1  # recorded once, by the epilog, not again by the child
    assert not list(cfg.overlay_dir.glob("t2.*"))


def test_guest_without_sshd_times_out_clearly_and_is_cleaned_up(life, vm_setup):
    cfg = vm_setup[1]
    started = time.monotonic()
    with pytest.raises(BootError) as info:
        life.start_vm(JobRequest("9201", "0", "atlas002", "atlas-nossh", "atlas"),
                      slots=["t2"], boot_timeout=25)
    message = str(info.value)
    assert "no ssh host key" in message
    assert "vmim-init: this image starts no sshd" in message  # console tail included
    assert "\n" not in message
    assert time.monotonic() - started < 120
    assert not life.hv.is_running("vmim-t2")
    assert life.leases.get("t2") is None
    assert not list(cfg.overlay_dir.glob("t2.*"))
    assert not (cfg.run_dir / "jobs" / "9201.0").exists()


def test_cli_exec_status_and_reconcile(atlas_vm, vm_setup):
    path = str(vm_setup[0])
    cli = [sys.executable, "-m", "vmimagemanager.cli", "--config", path]
    r = subprocess.run([*cli, "exec", "t1", "--", "sh", "-c", "id -un; exit 5"],
                       capture_output=True, text=True)
    assert r.returncode == 5 and r.stdout == "root\n", r.stderr
    r = subprocess.run([*cli, "exec", "t1", "--user", "atlas001", "--", "id", "-un"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "atlas001\n", r.stderr
    r = subprocess.run([*cli, "slots", "--json"], capture_output=True, text=True)
    rows = {row["slot"]: row for row in json.loads(r.stdout)}
    assert rows["t1"]["state"] == "running" and rows["t1"]["domain"] == "vmim-t1"
    assert rows["t1"]["job"] == "9001.0"
    r = subprocess.run([*cli, "exec", "t2", "--", "true"], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.startswith("vmimagemanager: slot t2 has no running VM")




def test_images_check_reports_requirements(vm_setup, atlas_vm):
    path = str(vm_setup[0])
    r = subprocess.run([sys.executable, "-m", "vmimagemanager.cli", "--config", path, "images",
                        "check", "cms", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    checks = {c["requirement"]: c for c in json.loads(r.stdout)}
    assert all(c["ok"] for c in checks.values()), checks
    assert any("cms001" in name for name in checks)  # logged in as a pool account of the VO
    assert "pool account cms001 has the host's uid/gid" in checks
    assert vm_setup[1].slots[1].name in [c["detail"].removeprefix("slot ") for c in
                                         checks.values()]
    r = subprocess.run([sys.executable, "-m", "vmimagemanager.cli", "--config", path, "images",
                        "check", "no-such-image"], capture_output=True, text=True)
    assert r.returncode == 1 and "image 'no-such-image' not found" in r.stderr


@pytest.fixture(scope="module")
def shared_dir():
    share = make_base_dir("vmim-share-")
    (share / "input.txt").write_text("from the host\n")
    os.chmod(share / "input.txt", 0o644)
    yield share
    import shutil

    shutil.rmtree(share, ignore_errors=True)


def test_job_runner_uses_shared_cwd_stages_proxy_and_rewrites_tmpdir(vm_setup, life, shared_dir,
                                                                      tmp_path):
    """The starter's work, outside SGE: a (read-only, 9p) shared directory is the job's cwd in
    the guest."""
    from dataclasses import replace

    from vmimagemanager.config import SharedPath
    from vmimagemanager.context import key_path
    from vmimagemanager.guest import Endpoint, connect
    from vmimagemanager.jobs import Job
    from vmimagemanager.node import Node
    from vmimagemanager.runner import JobRunner

    cfg = replace(vm_setup[1], shared_paths=(SharedPath(str(shared_dir), "hypervisor",
                                                        "passthrough", readonly=True),))
    own = Node(cfg, life.hv, life.leases)
    started = own.start_vm(JobRequest("9301", "0", "atlas001", "atlas", "atlas"),
                              slots=["t2"])
    lease, ctx = started.lease, started.context
    try:
        assert ctx.guest_checked_paths == (str(shared_dir),)
        script = tmp_path / "job.sh"
        script.write_text("#!/bin/sh\npwd; cat input.txt; echo \"tmp=$TMPDIR\"; "
                          "stat -c '%a %U' \"$X509_USER_PROXY\"; cat \"$X509_USER_PROXY\"\n")
        proxy = tmp_path / "x509up_u5001"
        proxy.write_text("PROXY-CERT\n")
        env = {"JOB_ID": "9301", "TMPDIR": "/tmp/9301.1.vmtest.q", "X509_USER_PROXY": str(proxy),
               "LD_PRELOAD": "/evil.so", "PATH": "/tmp/9301.1.vmtest.q:/usr/bin:/bin"}
        job = Job("9301", "0", "atlas001", argv=[str(script)], is_script=True, shell="/bin/sh",
                  env=env, cwd=str(shared_dir))

        def run_job(job) -> tuple[int, str]:
            """The runner's exit status and what the job wrote to stdout."""
            out_r, out_w = os.pipe()
            saved = os.dup(1)
            os.dup2(out_w, 1)
            try:
                rc = JobRunner(job, ctx, cfg.run_dir).run(stdin_fd=None)
            finally:
                os.dup2(saved, 1)
                os.close(saved)
                os.close(out_w)
            out = os.read(out_r, 65536).decode("utf-8", "replace")
            os.close(out_r)
            return rc, out

        rc, out = run_job(job)
        assert rc == 0, out
        lines = out.splitlines()
        assert lines[0] == str(shared_dir)
        assert lines[1] == "from the host"
        assert lines[2] == "tmp=/tmp/vmim-9301.0"
        assert lines[3] == "600 atlas001"
        assert lines[4] == "PROXY-CERT"
        probe = connect(Endpoint(ctx.host, ctx.port, ctx.user, key_path(cfg.run_dir, ctx.label),
                                 ctx.host_key))
        try:  # the scratch dir (the script was written into it) went with the payload's end
            assert probe.check_call("ls -d /tmp/vmim-* 2>/dev/null; true") == ""
            probe.check_call("mkdir -m 500 /tmp/vmim-9302.0")  # there, but the script can't be
            with pytest.raises(GuestError) as info:
                JobRunner(replace(job, job_id="9302"), ctx, cfg.run_dir).run(stdin_fd=None)
            assert "cannot write the job script into /tmp/vmim-9302.0 in the VM" in str(info.value)
        finally:
            probe.close()
        # A script sourcing a file the image lacks (the SGE settings): stopped before it runs.
        settings = "/var/lib/vmim-no-cell/default/common/settings.sh"
        needy = replace(job, guest_files=(settings,))
        with pytest.raises(GuestError) as info:
            JobRunner(needy, ctx, cfg.run_dir).run(stdin_fd=None)
        assert f"image atlas has no {settings}, which the job script sources" in str(info.value)
        # Scripts the run's command line cannot carry (too large; no final newline) go in a
        # round trip of their own, byte for byte all the same; a small one goes inside it.
        for n, body in enumerate([b"#!/bin/sh\n" + b"# padding\n" * 8000 + b"echo big\n",
                                  b"#!/bin/sh\necho \xff'$x' `echo odd`",
                                  b"#!/bin/sh\ncat <<'EOF'\n$HOME \\\nEOF\n"]):
            odd = tmp_path / f"odd{n}.sh"
            odd.write_bytes(body)
            rc, out = run_job(replace(job, job_id=f"931{n}", argv=[str(odd)], env={},
                                      cwd=None))
            assert rc == 0, out
            assert out == ["big\n", "\ufffd$x odd\n", "$HOME \\\n"][n]
    finally:
        own.end_vm(lease.slot)


def test_images_check_fails_clearly_on_unmounted_shares_and_missing_sge_settings(
        vm_setup, atlas_vm, tmp_path):
    """The check can fail: a guest-mode share the image never mounts, no SGE settings file."""
    data = yaml.safe_load(vm_setup[0].read_text())
    data["shared_paths"] = [{"path": "/home", "mode": "hypervisor"},
                            {"path": "/srv/vmim-site-lustre", "mode": "guest"}]
    path = tmp_path / "check.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    r = subprocess.run([sys.executable, "-m", "vmimagemanager.cli", "--config", str(path),
                        "images", "check", "cms", "--json"], capture_output=True, text=True,
                       env={**os.environ, "SGE_ROOT": "/var/lib/vmim-no-cell",
                            "SGE_CELL": "default"})
    assert r.returncode == 1, r.stdout + r.stderr
    checks = {c["requirement"]: c for c in json.loads(r.stdout)}
    assert checks["shared path /home/cms001 mounted"]["ok"], checks
    assert not checks["shared path /srv/vmim-site-lustre mounted"]["ok"]
    assert "is not a mounted file system in the guest" in \
        checks["shared path /srv/vmim-site-lustre mounted"]["detail"]
    keys = [c for name, c in checks.items() if name.startswith("login keys kept out")]
    assert keys and keys[0]["ok"], checks
    settings = checks["/var/lib/vmim-no-cell/default/common/settings.sh readable (CE job "
                      "scripts source it)"]
    assert not settings["ok"] and "share $SGE_ROOT/$SGE_CELL/common" in settings["detail"]


def test_up_store_restore_down_keeps_what_the_admin_changed(vm_setup, atlas_vm):
    path = str(vm_setup[0])

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "vmimagemanager.cli", "--config", path,
                               *args], capture_output=True, text=True)

    r = cli("up", "t2", "--image", "cms")
    assert r.returncode == 0 and "running as vmim-t2" in r.stdout, r.stderr
    assert cli("exec", "t2", "--", "sh", "-c", "echo updated > /etc/site-update").returncode == 0
    r = cli("store", "t2", "cms-updated")
    assert r.returncode == 0, r.stderr
    assert cli("slots", "--json").stdout.count('"state": "free"') == 1  # t2 free, t1 busy
    assert cli("restore", "t2", "--image", "cms-updated").returncode == 0
    r = cli("exec", "t2", "--", "cat", "/etc/site-update")
    assert r.stdout == "updated\n", r.stderr
    r = cli("images", "remove", "cms-updated")
    assert r.returncode == 1 and "in use by job admin-t2.0" in r.stderr
    assert cli("down", "t2").returncode == 0
    assert cli("images", "remove", "cms-updated").returncode == 0
    assert cli("reconcile", "--dry-run").stdout.startswith("nothing to do")
