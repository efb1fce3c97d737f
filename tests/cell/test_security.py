"""The job's owner attacks the root hooks, through the real gridengine cell (docs/security.md).

Each test does what a pool account can do at any site (`qsub -v`, files in its own home, `qsub -b
y PATH`, a process of its own beside the job) and checks that none of it reaches root: no code of
the user's runs as root, no child of a root hook inherits the user's variables, root creates
nothing in the job's TMPDIR, root's reads cannot be redirected or hung, and the job still runs.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import shutil
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.support.pki import ALICE, Pki, openssl
from tests.support.sgecell import JOB, close_vm_cell, home, open_vm_cell, wait_done, wait_for
from vmimagemanager.audit import read_history

pytestmark = pytest.mark.integration

QUEUE = "sec.q"
OWNER = "atlas001"
MARKER_VAR = "VMIM_SECURITY_TEST_MARKER"
# A provider module OpenSSL 3 loads from OPENSSL_CONF: its constructor records who ran it.
EVIL_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>
__attribute__((constructor)) static void ran(void) {
    int fd = open("%(marker)s", O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd >= 0) { dprintf(fd, "uid %%d\n", (int)geteuid()); close(fd); }
}
"""
OPENSSL_CNF = """openssl_conf = openssl_init
[openssl_init]
providers = provider_sect
[provider_sect]
default = default_sect
evil = evil_sect
[default_sect]
activate = 1
[evil_sect]
module = %(module)s
activate = 1
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A test CA in a CA directory of its own (the cell's `grid_ca_dir`) and Alice's proxy."""
    pki = Pki(tmp_path_factory.mktemp("pki"))
    pki.ca("ca", "/DC=org/DC=test/CN=Test CA")
    (pki.dir / "certificates").mkdir()
    shutil.copy(pki.dir / "ca.pem", pki.dir / "certificates" / "ca.pem")
    openssl("rehash", str(pki.dir / "certificates"), cwd=pki.dir)
    pki.user("alice", ALICE)
    pki.proxy("proxy", "alice")
    return pki


@pytest.fixture(scope="module")
def cell(libvirt_system, guest_images, pki):
    c = open_vm_cell(QUEUE, "vmim-sec-", guest_images,
                     extra={"grid_ca_dir": str(pki.dir / "certificates")})
    yield c
    close_vm_cell(c)


def owned(path: Path, text: str | bytes, mode: int = 0o644) -> Path:
    entry = pwd.getpwnam(OWNER)
    if isinstance(text, str):
        path.write_text(text)
    else:
        path.write_bytes(text)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    os.chmod(path, mode)
    return path


@pytest.fixture(scope="module")
def hostile_files(cell):
    """What the owner leaves in its home: a provider module, an OpenSSL configuration naming
    it, a gconv module list, a self-signed certificate as its "proxy", and a library
    directory of its own (copies of the system's libc)."""
    h = home(OWNER)
    marker = Path("/var/tmp") / f"vmim-security-ran-{os.getpid()}"
    marker.unlink(missing_ok=True)
    source = cell.base / "evil.c"
    source.write_text(EVIL_C % {"marker": marker})
    module = h / "vmim-sec-evil.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(module), str(source)], check=True)
    owned(module, module.read_bytes(), 0o755)
    conf = owned(h / "vmim-sec-openssl.cnf", OPENSSL_CNF % {"module": module})
    gconv = h / "vmim-sec-gconv"
    gconv.mkdir(exist_ok=True)
    owned(gconv / "gconv-modules", f"module INTERNAL EVIL// {module.with_suffix('')} 1\n")
    cert = cell.base / "self-signed.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(cell.base / "self-signed.key"), "-out", str(cert), "-days", "2",
                    "-subj", "/DC=org/CN=Somebody Else"], check=True, capture_output=True,
                   env={"PATH": "/usr/bin:/bin"})
    proxy = owned(h / "vmim-sec-proxy.pem", cert.read_text() + (cell.base / "self-signed.key")
                  .read_text(), 0o600)
    libs = h / "vmim-sec-lib"
    libs.mkdir(exist_ok=True)
    for name in ("libc.so.6", "libpthread.so.0", "libdl.so.2", "libm.so.6"):
        system = Path("/lib/x86_64-linux-gnu") / name
        if system.exists():  # the system's own libraries: found here, they show in the maps
            owned(libs / name, system.read_bytes(), 0o755)
    files = {"marker": marker, "module": module, "conf": conf, "gconv": gconv, "proxy": proxy,
             "libs": libs}
    yield files
    shutil.rmtree(libs, ignore_errors=True)
    marker.unlink(missing_ok=True)
    for path in (module, conf, proxy):
        path.unlink(missing_ok=True)
    shutil.rmtree(gconv, ignore_errors=True)


class RootEnvironWatch:
    """Samples /proc during a job, for every process of uid 0:
    - one whose environment holds MARKER_VAR and that runs a dynamically linked program (the
      loader read the job's LD_LIBRARY_PATH, LD_AUDIT, ...), other than gridengine's shepherd
      (loaded before it sets the job's environment for its child);
    - one that maps a file under `home` (a library the job's environment named was loaded)."""

    def __init__(self, home: Path) -> None:
        self.home = str(home).rstrip("/") + "/"
        self.offenders: dict[int, str] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RootEnvironWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = str(os.getpid())
        while not self._stop.is_set():
            for pid in filter(str.isdigit, os.listdir("/proc")):
                if pid != me:
                    self._sample(pid)
            self.samples += 1
            time.sleep(0.005)

    def _sample(self, pid: str) -> None:
        needle = MARKER_VAR.encode() + b"="
        try:
            if os.stat(f"/proc/{pid}").st_uid != 0:
                return
            exe = os.readlink(f"/proc/{pid}/exe")
            with open(f"/proc/{pid}/environ", "rb") as fh:
                marked = needle in fh.read()
            with open(f"/proc/{pid}/maps") as fh:
                files = {line.split(None, 5)[5].strip() for line in fh
                         if len(line.split(None, 5)) == 6}
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace")
            if os.readlink(f"/proc/{pid}/exe") != exe:
                return  # it ran exec between the reads: its environment and maps disagree
        except OSError:
            return
        foreign = sorted(f for f in files if f.startswith(self.home))
        if foreign:
            self.offenders[int(pid)] = f"{cmdline} maps {foreign}"
        elif marked and "sge_shepherd" not in cmdline and any("/ld-linux" in f for f in files):
            self.offenders[int(pid)] = f"{cmdline} ({exe}, dynamically linked)"


def start_event(cell, job_id: str) -> dict:
    return wait_for(lambda: next((e for e in read_history(cell.cfg, job=job_id)
                                  if e["event"] == "start"), None),
                    f"the start event of job {job_id}", timeout=240, interval=0.5)


def test_no_variable_of_the_job_reaches_root_code_and_the_job_still_runs(cell, hostile_files):
    """`qsub -v OPENSSL_CONF=~/o.cnf,X509_USER_PROXY=~/cert.pem` made the prolog's `openssl`
    load the user's module as uid 0 (seen on the code before this test). Debian's gridengine
    strips LD_LIBRARY_PATH and the loader's other variables before the root prolog, but not
    GLIBC_TUNABLES, MALLOC_CHECK_ or BASH_FUNC_*, and not every gridengine strips: at dd60899
    the wrapper's /bin/sh and /usr/bin/env, both dynamically linked, ran as root with the
    job's variables (this watch found both)."""
    h = home(OWNER)
    hostile = {
        "OPENSSL_CONF": hostile_files["conf"], "OPENSSL_MODULES": h,
        "X509_USER_PROXY": hostile_files["proxy"], "GCONV_PATH": hostile_files["gconv"],
        "LOCPATH": h, "TMPDIR": h, "TMP": h, "HOME": "/tmp", "SSH_AUTH_SOCK": h / "agent",
        "LD_LIBRARY_PATH": hostile_files["libs"], "OPENSSL_ENGINES": h, "SSL_CERT_DIR": h,
        MARKER_VAR: "1",
    }
    variables = ",".join(f"{k}={v}" for k, v in hostile.items())
    with RootEnvironWatch(h) as watch:
        job_id = cell.submit("hostile-env", OWNER, "-v", variables, "-v", "SLEEP=0", JOB)
        records = wait_done(job_id, timeout=300)
    out, err = cell.output("hostile-env", OWNER)
    assert records[0]["exit_status"] == "0" and "finished" in out, (out, err)
    ran = hostile_files["marker"].read_text() if hostile_files["marker"].exists() else ""
    assert "uid 0" not in ran, f"the user's OpenSSL module ran as root: {ran!r}"
    assert watch.samples > 50 and not watch.offenders, watch.offenders
    started = start_event(cell, job_id)
    assert "identity" not in started, started  # a self-signed certificate is only a claim
    assert "Somebody Else" in started.get("identity_unverified", ""), started


def test_a_proxy_the_nodes_ca_issued_is_the_jobs_identity(cell, pki):
    proxy = home(OWNER) / "vmim-sec-good-proxy.pem"
    owned(proxy, "", 0o600)
    pki.proxy_file(proxy, "proxy", "alice")
    try:
        job_id = cell.submit("good-proxy", OWNER, "-v", f"X509_USER_PROXY={proxy},SLEEP=0",
                             JOB)
        started = start_event(cell, job_id)
        assert started.get("identity") == ALICE, started
        wait_done(job_id, timeout=300)
    finally:
        proxy.unlink(missing_ok=True)


class Inotify:
    """Linux inotify through libc: which names appear in a directory, and whose they are."""

    IN_CREATE, IN_MOVED_TO = 0x100, 0x80

    def __init__(self) -> None:
        self.libc = ctypes.CDLL("libc.so.6", use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK)
        assert self.fd >= 0
        self.dirs: dict[int, Path] = {}

    def watch(self, path: Path) -> None:
        wd = self.libc.inotify_add_watch(self.fd, str(path).encode(),
                                         self.IN_CREATE | self.IN_MOVED_TO)
        if wd >= 0:
            self.dirs[wd] = path

    def events(self) -> list[Path]:
        try:
            data = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return []
        found, offset = [], 0
        while offset < len(data):
            wd, _mask, _cookie, size = struct.unpack_from("iIII", data, offset)
            name = data[offset + 16:offset + 16 + size].rstrip(b"\0").decode()
            offset += 16 + size
            if wd in self.dirs:
                found.append(self.dirs[wd] / name)
        return found

    def close(self) -> None:
        os.close(self.fd)


def test_a_cold_boot_makes_nothing_in_the_jobs_tmpdir(cell):
    """SGE gives the prolog TMP=/tmp/JOB.TASK.QUEUE, a directory of the job's owner: root's
    key-generation and seed directories were made there (seen on the code before this test)."""
    watcher = Inotify()
    watcher.watch(Path("/tmp"))
    made: dict[Path, int | None] = {}
    job_id = cell.submit("tmpdir", OWNER, "-v", "SLEEP=0", JOB)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and not (cell.output("tmpdir", OWNER)[0]):
            for path in watcher.events():
                if path.parent == Path("/tmp") and not path.name.startswith(f"{job_id}."):
                    continue
                try:
                    made[path] = os.lstat(path).st_uid
                except OSError:
                    made[path] = None
                if path.parent == Path("/tmp"):
                    watcher.watch(path)
            time.sleep(0.002)
    finally:
        watcher.close()
    wait_done(job_id, timeout=300)
    tmpdir = [p for p in made if p.parent == Path("/tmp")]
    assert tmpdir, f"never saw the job's TMPDIR /tmp/{job_id}.*"
    inside = {p: uid for p, uid in made.items() if p.parent != Path("/tmp")}
    by_root = [p for p, uid in inside.items() if uid == 0 or p.name.startswith(
        ("vmim-key-", "vmim-seed-"))]
    assert not by_root, f"root made these in the job's TMPDIR: {sorted(map(str, by_root))}"
    start_event(cell, job_id)


def test_a_binary_job_naming_a_fifo_neither_hangs_nor_is_opened_by_the_prolog(cell):
    """`qsub -b y PATH`: SGE's spool names the user's PATH as script_file. The prolog opened it
    as root to look for a proxy line: a FIFO there hung the prolog for ever."""
    fifo = home(OWNER) / "vmim-sec-fifo"
    fifo.unlink(missing_ok=True)
    os.mkfifo(fifo, 0o755)
    entry = pwd.getpwnam(OWNER)
    os.chown(fifo, entry.pw_uid, entry.pw_gid)
    try:
        job_id = cell.submit("fifo", OWNER, "-b", "y", str(fifo))
        started = start_event(cell, job_id)  # the prolog finished: it did not block on open
        assert started["outcome"] == "ready", started
        wait_done(job_id, timeout=300)
    finally:
        fifo.unlink(missing_ok=True)


def console_writers(cell, slot: str) -> set[str]:
    """The processes that hold the slot's console log open: virtlogd, never QEMU itself (the
    guest's output reaches the file through virtlogd, which rotates it at its max_size)."""
    console = (cell.cfg.state_dir / "console" / f"{slot}.log").resolve()
    holders = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(console) for fd in fds):
                holders.add(Path(f"/proc/{pid}/comm").read_text().strip())
        except OSError:
            continue
    return holders


def test_the_owner_can_neither_replace_nor_redirect_its_context(cell):
    """The job's context directory was the owner's (0500, but chmod-able): now root's 0711,
    and root's readers (exec, reconcile, power-off) read root's own copy."""
    job_id = cell.run_job("ctx", OWNER, sleep=30)
    lease = cell.wait_lease_state(job_id, "running", timeout=240)
    directory = cell.cfg.run_dir / "jobs" / lease.job_label

    def as_owner(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(["runuser", "-u", OWNER, "--", *argv], capture_output=True,
                              text=True)

    for argv in (["mv", f"{directory}/context.json", f"{directory}/moved"],
                 ["ln", "-s", "/etc/shadow", f"{directory}/link"],
                 ["chmod", "0700", str(directory)],
                 ["cat", str(cell.cfg.run_dir / "contexts" / f"{lease.job_label}.json")]):
        r = as_owner(*argv)
        assert r.returncode != 0 and ("denied" in r.stderr or "not permitted" in r.stderr), (
            argv, r.stderr)
    assert as_owner("cat", f"{directory}/context.json").returncode == 0  # its own copy
    assert console_writers(cell, lease.slot) == {"virtlogd"}  # its size is capped there
    r = cell.cli("exec", lease.slot, "--", "true")
    assert r.returncode == 0, r.stderr
    r = cell.cli("reconcile", "--dry-run")
    assert lease.job_label not in r.stdout + r.stderr, r.stdout
    records = wait_done(job_id, timeout=300)
    assert records[0]["exit_status"] == "0"
