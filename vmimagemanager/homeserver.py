"""The owner's home served to the job's VM with the owner's rights only: a virtiofsd per job.

QEMU runs unprivileged (libvirt's DAC user: libvirt-qemu on Debian), so it cannot write users'
files itself; and a 9p export by a root QEMU lets the guest's root act as root on the exported
tree (QEMU 7.2's local backend creates as QEMU's user, then chowns to whatever the guest asks).
So the home goes through QEMU's vhost-user file system device to a virtiofsd that root starts
for each job **as the job's owner**:

- root makes the listening socket (in run_dir/vhost, root's) and hands it over (--fd): only
  QEMU's user may connect to it (0600, owned by that user), and virtiofsd needs no directory
  of its own;
- setpriv drops to the owner's uid and primary gid with no supplementary groups (virtiofsd
  calls setgroups() at start, and a group of root's must not come along);
- `unshare --user --map-current-user --keep-caps`: virtiofsd's sandbox (it pivots into the home,
  with mount, pid and network namespaces of its own) needs capabilities, which it has only in a
  user namespace that maps the owner's uid and gid and nothing else. A request the guest makes
  as any other uid, root included, fails there (EINVAL): no device node, no file of root's or of
  another uid, no setuid-root file. The host's kernel checks each access as the owner's,
  quotas included.

The owner must not be able to ptrace it: it holds the listening socket QEMU connects to and
then the guest's RAM (the owner would be the vhost-user back end, root in its own guest without
a kernel exploit, and a client of QEMU's back-end channel). So `unshare` and `virtiofsd` run
from root's execute-only (0711) copies (`private_tools`): a process that runs a file its user
cannot read is not dumpable, and the owner may then only signal it.

virtiofsd exits by itself when QEMU lets go of the connection (the domain destroyed, or the
device detached). `stop` ends one whose VM never started; reconcile ends one whose lease is gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import select
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .accounts import Account
from .errors import ConfigError, VmimError
from .leases import process_start
from .rootenv import clean_environment
from .shares import GuestShare, hypervisor_source, served_by_owner

log = logging.getLogger("vmimagemanager.homeserver")

# What a server maps beside the guest's RAM (its code, threads, buffers): VmPeak less the guest's
# memory, measured 222 MiB for 1 and 2 GiB guests (docs/job-shapes.md, 2026-12-02).
SERVER_OWN_MIB = 256


def address_space_mib() -> int | None:
    """This process's hard address-space limit in MiB (a server started now inherits it);
    None without one."""
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    return None if hard == resource.RLIM_INFINITY else hard >> 20

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"  # QEMU 7.2's C virtiofsd (qemu-system-common)
UNIX_SOCKET_PATH_MAX = 107  # sun_path without its terminating NUL
STARTUP_WAIT = 5.0  # seconds a new virtiofsd has to wait for QEMU (it takes milliseconds)
# accept() and accept4() by machine: a virtiofsd blocked in one has passed its checks (the home,
# the namespace) and waits for QEMU; elsewhere STARTUP_GRACE is waited for an early exit
ACCEPT_SYSCALLS = {"x86_64": ("43", "288"), "aarch64": ("202", "242")}
STARTUP_GRACE = 0.1


class HomeServerError(VmimError):
    """A virtiofsd for a job's home could not be started: the job is held with the reason."""


@dataclass(frozen=True)
class HomeServer:
    """One running virtiofsd: the share's tag, its socket (what libvirt's <source socket>
    names) and its process."""

    tag: str
    socket: Path
    pid: int


def _root_dir(path: Path) -> Path:
    """`path`, a directory of root's, 0711 (others may pass, not list or write), made if
    missing; ConfigError if it is anything else."""
    path.mkdir(mode=0o711, parents=True, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        raise ConfigError(f"{path} must be a directory of root's that no one else may write "
                          "to; remove it and let vmimagemanager make it again")
    os.chmod(path, 0o711)
    return path


def server_dir(run_dir: Path) -> Path:
    """root's directory of the vhost-user sockets and pid files: QEMU's user may pass, not
    list; each socket is its own."""
    return _root_dir(run_dir / "vhost")


def socket_path(run_dir: Path, label: str, tag: str) -> Path:
    path = server_dir(run_dir) / f"{label}.{tag}.sock"
    if len(os.fsencode(path)) > UNIX_SOCKET_PATH_MAX:
        raise ConfigError(f"run_dir {run_dir} is too long for a unix socket path ({path}); "
                          "choose a shorter run_dir")
    return path


def _pid_file(sock: Path) -> Path:
    return sock.with_suffix(".pid")


def _tools() -> tuple[str, str, str]:
    found = []
    for tool in ("prlimit", "setpriv", "unshare"):
        path = shutil.which(tool, path="/usr/bin:/bin")
        if path is None:
            raise HomeServerError(f"{tool} (util-linux) is not installed: the owner's home "
                                  "cannot be served; install util-linux")
        found.append(path)
    if not os.access(VIRTIOFSD, os.X_OK):
        raise HomeServerError(f"{VIRTIOFSD} is missing: the owner's home cannot be served; "
                              "install qemu-system-common (QEMU 7.2's virtiofsd)")
    return found[0], found[1], found[2]


def private_tools(image_dir: Path) -> tuple[str, str, str, str]:
    """prlimit and setpriv (run as root), and root's execute-only copies of unshare and
    virtiofsd, in image_dir/.libexec (root's, 0711, on disk: run_dir is often a noexec tmpfs),
    made again when the original changes."""
    directory = _root_dir(image_dir / ".libexec")
    if os.statvfs(directory).f_flag & os.ST_NOEXEC:
        raise HomeServerError(f"{directory} is on a noexec file system: the owner's file "
                              "server cannot run from it; put image_dir where root may run "
                              "programs")
    prlimit, setpriv, unshare = _tools()
    return (prlimit, setpriv, str(_private_copy(directory, unshare)),
            str(_private_copy(directory, VIRTIOFSD)))


def _private_copy(directory: Path, source: str) -> Path:
    target = directory / os.path.basename(source)
    want = os.stat(source)
    try:
        have = os.lstat(target)
        if (stat.S_ISREG(have.st_mode) and have.st_uid == 0 and have.st_size == want.st_size
                and have.st_mtime_ns == want.st_mtime_ns and stat.S_IMODE(have.st_mode) == 0o711):
            return target
    except FileNotFoundError:
        pass
    part = directory / f".{target.name}.{os.getpid()}"
    part.unlink(missing_ok=True)
    out = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o700)
    with open(source, "rb") as src, os.fdopen(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
        os.fchmod(dst.fileno(), 0o711)
    os.utime(part, ns=(want.st_atime_ns, want.st_mtime_ns))
    os.replace(part, target)
    return target


def command(owner: Account, home: str, fd: int, tools: tuple[str, str, str, str]) -> list[str]:
    """virtiofsd as `owner`, in a user namespace mapping only the owner, serving `home` on the
    listening socket `fd`, with `tools` (private_tools).
    - `--rlimit-nofile=0`: by default it raises its open-file limit (to up to 1,000,000) once
      QEMU connects, which the owner may not do, and it stops there;
    - `cache=none`: no file data cached in the guest, so what the CE writes on the host while
      the job runs is seen at once (as with 9p's default), and streaming is faster under TCG
      than with `cache=auto`; `timeout=1`: names and attributes cached for a second
      (docs/shared-storage.md has the measurements);
    - its messages go to stderr, read while it starts: with `--syslog` its seccomp filter
      kills it at its first message after the sandbox (socket() is not allowed there)."""
    prlimit, setpriv, unshare, virtiofsd = tools
    # no core file: it would hold the guest's memory, and land in the owner's home
    return [prlimit, "--core=0:0", "--",
            setpriv, f"--reuid={owner.uid}", f"--regid={owner.gid}", "--clear-groups",
            "--reset-env", "--", unshare, "--user", "--map-current-user", "--keep-caps", "--",
            virtiofsd, f"--fd={fd}", "--rlimit-nofile=0", "-o", "log_level=warn", "-o",
            f"source={home}",
            "-o", "sandbox=namespace", "-o", "cache=none", "-o", "timeout=1"]


def start(run_dir: Path, label: str, tag: str, owner: Account, home: str,
          qemu_ids: tuple[int, int], tools: tuple[str, str, str, str]) -> HomeServer:
    """A virtiofsd serving `home` (the checked real path of the owner's home) as `owner`, its
    socket open to QEMU's user (`qemu_ids`: uid, gid) alone."""
    if "," in home or "\\" in home:  # virtiofsd's -o parser splits at commas
        raise HomeServerError(f"the home {home!r} cannot be served: a comma or backslash in its "
                              "path; give the account a plain home path")
    sock = socket_path(run_dir, label, tag)
    stop_stale(sock)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(os.fsdecode(sock))
        os.chown(sock, *qemu_ids)
        os.chmod(sock, 0o600)
        listener.listen(1)
        fd = listener.fileno()
        proc = subprocess.Popen(
            command(owner, home, fd, tools), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, pass_fds=(fd,),
            start_new_session=True, env=clean_environment(), cwd="/",
            restore_signals=False)  # SIGPIPE stays ignored: its stderr is closed once it runs
    except OSError as exc:
        sock.unlink(missing_ok=True)
        raise HomeServerError(f"cannot start the file server of {home} for job {label}: {exc}"
                              ) from None
    finally:
        listener.close()
    _wait_started(proc, sock, home, label)
    _pid_file(sock).write_text(f"{proc.pid} {process_start(proc.pid)}\n")
    return HomeServer(tag, sock, proc.pid)


def _waiting_for_qemu(pid: int) -> bool | None:
    """Whether virtiofsd is blocked in accept() (None: this machine's numbers are unknown)."""
    calls = ACCEPT_SYSCALLS.get(os.uname().machine)
    if calls is None:
        return None
    try:
        with open(f"/proc/{pid}/syscall", encoding="ascii") as fh:
            return fh.read().split()[0] in calls
    except (OSError, IndexError):
        return False


def _wait_started(proc: subprocess.Popen, sock: Path, home: str, label: str) -> None:
    """Until virtiofsd has passed its checks (the home, the namespace) and waits for QEMU; one
    line saying why if it stops before. (QEMU could connect earlier, the socket listens: this
    is for a clear error instead of a failed boot.)"""
    start = time.monotonic()
    while proc.poll() is None:
        ready = _waiting_for_qemu(proc.pid)
        if ready or (ready is None and time.monotonic() - start > STARTUP_GRACE):
            break
        if time.monotonic() - start > STARTUP_WAIT:
            proc.kill()  # our own child, not reaped yet: its pid cannot be another's
            proc.wait()
            sock.unlink(missing_ok=True)
            raise HomeServerError(f"the file server of {home} for job {label} did not start "
                                  f"within {STARTUP_WAIT:.0f} s")
        time.sleep(0.002)
    if proc.returncode is not None:
        err = _read_bounded(proc.stderr).decode(errors="replace").strip()
        sock.unlink(missing_ok=True)
        last = err.splitlines()[-1] if err else f"exit {proc.returncode}"
        raise HomeServerError(f"the file server of {home} for job {label} stopped at once "
                              f"({last})")
    if proc.stderr is not None:
        proc.stderr.close()


def _read_bounded(pipe, limit: int = 4096, wait: float = 0.5) -> bytes:
    """What a stopped server wrote, at most `limit` bytes and `wait` seconds: another process
    may hold the pipe's other end."""
    if pipe is None:
        return b""
    os.set_blocking(pipe.fileno(), False)
    data, deadline = b"", time.monotonic() + wait
    while len(data) < limit and time.monotonic() < deadline:
        ready, _, _ = select.select([pipe], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(pipe.fileno(), limit - len(data))
        if not chunk:
            break
        data += chunk
    return data


def running(sock: Path) -> tuple[int, int] | None:
    """(pid, start time) of the virtiofsd `sock`'s pid file names, if that very process still
    runs."""
    try:
        pid_text, started_text = _pid_file(sock).read_text().split()
        pid, started = int(pid_text), int(started_text)
    except (OSError, ValueError):
        return None
    if process_start(pid) != started:
        return None
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            if b"virtiofsd" not in fh.read():
                return None
    except OSError:
        return None
    return pid, started


def stop(sock: Path, wait: float = 2.0) -> None:
    """End the server behind `sock` (if it still runs) and remove its socket and pid file."""
    found = running(sock)
    if found is not None:
        _kill(*found, wait)
    sock.unlink(missing_ok=True)
    _pid_file(sock).unlink(missing_ok=True)


def stop_stale(sock: Path) -> None:
    """A socket left by an earlier start for the same job and share (a prolog retried)."""
    if sock.exists() or sock.is_symlink() or _pid_file(sock).exists():
        stop(sock)


def _kill(pid: int, started: int, wait: float) -> None:
    """SIGTERM, then SIGKILL, to the process `pid` that started at `started`, through its pidfd:
    a pid taken by another process meanwhile is never signalled. virtiofsd's sandboxed child
    ends with it (it asks for PR_SET_PDEATHSIG)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if process_start(pid) != started:
            return  # the pid is another process's by now
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                signal.pidfd_send_signal(pidfd, sig)
            except ProcessLookupError:
                return
            ended, _, _ = select.select([pidfd], [], [], wait)  # readable once it has ended
            with contextlib.suppress(ChildProcessError):  # our own child: reap it
                os.waitpid(pid, os.WNOHANG)
            if ended:
                return
    finally:
        os.close(pidfd)


def servers_of(run_dir: Path) -> dict[str, list[Path]]:
    """job label -> its servers' sockets, from run_dir/vhost (for reconcile and teardown)."""
    found: dict[str, list[Path]] = {}
    directory = run_dir / "vhost"
    if not directory.is_dir():
        return found
    for path in directory.iterdir():
        if path.suffix in (".sock", ".pid"):
            label = ".".join(path.name.split(".")[:2])  # a job label has one dot: JOB.TASK
            sock = path.with_suffix(".sock")
            if sock not in found.setdefault(label, []):
                found[label].append(sock)
    return found


def stop_servers_of(run_dir: Path, label: str) -> None:
    """End every server of job `label` (its VM is gone, or never started)."""
    for sock in servers_of(run_dir).get(label, []):
        stop(sock)


def serve_homes(run_dir: Path, image_dir: Path, label: str, owner: Account,
                shares: Iterable[GuestShare],
                qemu_ids: tuple[int, int] | None) -> tuple[HomeServer, ...]:
    """A virtiofsd for each of the job's shares served as its owner (none started if one
    fails: the ones already running are stopped)."""
    homes = [share for share in shares if served_by_owner(share)]
    if homes and qemu_ids is None:
        raise HomeServerError("libvirt does not say which user QEMU runs as (no DAC security "
                              "model), so the owner's home cannot be handed to it alone; "
                              "check 'security_driver' in /etc/libvirt/qemu.conf")
    tools = private_tools(image_dir) if homes else ("", "", "", "")
    started: list[HomeServer] = []
    try:
        for share in homes:
            started.append(start(run_dir, label, share.tag, owner, hypervisor_source(share),
                                 qemu_ids, tools))
    except BaseException:
        for server in started:
            stop(server.socket)
        raise
    return tuple(started)
