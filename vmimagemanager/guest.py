"""The guest executor: reach a VM over ssh and run a job in it as the job's user.

The host key is never learnt from the network: the guest prints it on its serial console (the
cloud-init convention) and we pin exactly that key, so a process that grabbed the forwarded port
or an address on the bridge cannot pose as the job's VM.

The client is OpenSSH's `ssh` (on every node; a Python ssh library cost the hooks 0.15 s of
start-up each): one ControlMaster connection per session, each command a session multiplexed
over it, so a job pays one key exchange. No ssh configuration of the node or the user applies
(`-F /dev/null`); the only host key accepted is the pinned one (a known_hosts file of the
session's own).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import select
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import BootError, GuestError

log = logging.getLogger("vmimagemanager.guest")

HOST_KEY_BEGIN = "-----BEGIN SSH HOST KEY KEYS-----"
HOST_KEY_END = "-----END SSH HOST KEY KEYS-----"
# What root reads of a console log the guest writes: the boot's first 4 MiB (where the host key
# is; virtlogd caps the file itself, see docs/security.md), or the last 8 KiB for an error.
CONSOLE_READ_BYTES = 4 << 20
CONSOLE_TAIL_BYTES = 8 << 10
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
HOST_KEY_RE = re.compile(r"^(ssh-[a-z0-9-]+|ecdsa-sha2-nistp[0-9]+) "
                         r"[A-Za-z0-9+/]+={0,2}\Z")
# After the payload has exited, output still in flight is relayed for up to DRAIN_SECONDS; a
# background process it left holding stdout/stderr open is not waited for longer.
DRAIN_SECONDS = 5
HOST_ALIAS = "vmim-guest"


@dataclass(frozen=True)
class Endpoint:
    """Where and as whom to reach a guest, and the host key it must present."""

    host: str
    port: int
    user: str
    key: Path | bytes  # the private key's file, or its OpenSSH text (the prolog holds it in memory)
    host_key: str  # "ssh-ed25519 AAAA..." as printed on the guest console


def parse_console_host_keys(text: str) -> list[str]:
    """Host keys from the console's BEGIN/END block ("type base64" lines), the last complete
    block wins. A block whose END line has not arrived yet gives nothing: its last key line may
    still be half written (the console is read while the guest prints it)."""
    keys: list[str] = []
    block: list[str] | None = None
    for raw in text.splitlines():
        line = raw.strip().strip("\r")
        if line == HOST_KEY_BEGIN:
            block = []
        elif line == HOST_KEY_END:
            if block is not None:
                keys, block = block, None
        elif block is not None and line.startswith(("ssh-", "ecdsa-")):
            parts = line.split()
            if len(parts) >= 2:
                block.append(f"{parts[0]} {parts[1]}")
    return keys


def read_console(path: Path, tail: bool = False) -> str:
    """At most CONSOLE_READ_BYTES of a console log (the guest writes it: it may be huge), from
    its start (the host key is printed during the boot) or, with `tail`, its last 8 KiB."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if tail:
            size = os.fstat(fd).st_size
            os.lseek(fd, max(0, size - CONSOLE_TAIL_BYTES), os.SEEK_SET)
        data = os.read(fd, CONSOLE_TAIL_BYTES if tail else CONSOLE_READ_BYTES)
    finally:
        os.close(fd)
    return data.decode("utf-8", "replace")


def console_tail(path: Path, lines: int = 8) -> str:
    """Last lines of a console log joined into one line for an error message."""
    try:
        data = read_console(path, tail=True)
    except OSError:
        return "(no console log)"
    tail = [ln.strip() for ln in data.replace("\r", "").splitlines() if ln.strip()][-lines:]
    return " | ".join(tail) if tail else "(console log is empty)"


def console_host_key(console_log: Path) -> str:
    """The host key the guest printed on its console, ed25519 preferred; '' if none yet."""
    try:
        keys = parse_console_host_keys(read_console(console_log))
    except OSError:
        return ""
    ed25519 = [k for k in keys if k.startswith("ssh-ed25519 ")]
    return (ed25519 or keys or [""])[0]


def wait_for_host_key(console_log: Path, deadline: float, still_running) -> str:
    """Wait until the guest has printed its ssh host key on the console; return it.

    Polled every 50 ms for the first 20 s (reading a small file costs nothing next to the boot;
    a long sleep here is start latency of every job), then every 0.5 s (slow images)."""
    started = time.monotonic()
    while True:
        if key := console_host_key(console_log):
            return key
        if not still_running():
            raise BootError(f"the VM stopped before printing its ssh host key; console: "
                            f"{console_tail(console_log)}")
        if time.monotonic() > deadline:
            raise BootError(f"the VM printed no ssh host key before the boot timeout; is sshd "
                            f"in the image? console: {console_tail(console_log)}")
        time.sleep(0.05 if time.monotonic() - started < 20 else 0.5)


# Key exchange: classical curve25519 first. The connection never leaves the node (the VM's port is
# forwarded on 127.0.0.1, or a bridge on the node), so OpenSSH 9's default post-quantum hybrid
# (sntrup761x25519) protects nothing here, and it costs the guest CPU at every login (two per
# job: the boot's and the starter's). An explicit list, not "^...": the
# "^" prefix needs OpenSSH 8.3, and EL8 nodes have 8.0. Images with only older kex (SL6's 5.3
# sshd) still find diffie-hellman-group-exchange-sha256 in it.
KEX_ALGORITHMS = ("curve25519-sha256,curve25519-sha256@libssh.org,ecdh-sha2-nistp256,"
                  "ecdh-sha2-nistp384,ecdh-sha2-nistp521,diffie-hellman-group-exchange-sha256,"
                  "diffie-hellman-group16-sha512,diffie-hellman-group18-sha512,"
                  "diffie-hellman-group14-sha256")


class HostKeyMismatch(GuestError):
    """The guest presented another host key than the one on its console: never retried."""


NOT_READY = "not-ready"  # first line of FILES.rc when remote_command's `prepare` found problems


class GuestNotReady(GuestError):
    """The run's `prepare` step reported problems (`report`, its lines): nothing was run."""

    def __init__(self, report: list[str]):
        super().__init__(f"the VM is not ready for the job: {'; '.join(report)}")
        self.report = report


def _ssh_options(endpoint: Endpoint, private: str, log_level: str = "ERROR") -> list[str]:
    """What every ssh of ours passes: no configuration files, no agent, batch mode, and the
    pinned host key (in `private`/known_hosts, written by connect) as the only known one."""
    return ["ssh", "-F", "/dev/null", "-T", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
            "-o", "IdentityAgent=none", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={private}/known_hosts",
            "-o", "GlobalKnownHostsFile=/dev/null", "-o", f"HostKeyAlias={HOST_ALIAS}",
            "-o", f"HostKeyAlgorithms={endpoint.host_key.split()[0]}",
            "-o", f"KexAlgorithms={KEX_ALGORITHMS}", "-o", "CheckHostIP=no",
            "-o", "UpdateHostKeys=no", "-o", f"LogLevel={log_level}",
            "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4",
            "-p", str(endpoint.port), "-l", endpoint.user]


def _connect_error(endpoint: Endpoint, stderr: str) -> GuestError:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and not ln.startswith("@")]
    if "Host key verification failed." in lines:
        return HostKeyMismatch(f"{endpoint.host}:{endpoint.port} presented a host key other "
                               "than the one the VM printed on its console; refusing to connect")
    return GuestError(lines[-1] if lines else "ssh exited without saying why")


def connect(endpoint: Endpoint, timeout: float = 10.0, keep_in: Path | None = None
            ) -> GuestSession:
    """Log in once (a ControlMaster); GuestError (HostKeyMismatch) if that fails.

    With `keep_in` (a directory made here; its parent must be root's and closed to others), the
    login outlives this process (ssh's ControlPersist) until the VM goes or `close`: the agent
    logs in to a spare at its boot, and the prolog that binds it uses that login (`resume`)
    instead of a login of its own on the job's path."""
    if not HOST_KEY_RE.match(endpoint.host_key):
        raise GuestError(f"not an ssh host key: {endpoint.host_key[:60]!r}")
    if keep_in is not None:
        shutil.rmtree(keep_in, ignore_errors=True)
        os.mkdir(keep_in, 0o700)
        private = str(keep_in)
    else:
        private = tempfile.mkdtemp(prefix="vmim-ssh-")  # 0700: known host, key copy, socket
    master: subprocess.Popen | None = None
    try:
        with open(os.path.join(private, "known_hosts"), "w") as known:
            known.write(f"{HOST_ALIAS} {endpoint.host_key}\n")
        key = endpoint.key
        if isinstance(key, bytes):  # the prolog holds the job's key in memory only
            key_file = os.path.join(private, "key")
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(key)
            key = key_file
        control = os.path.join(private, "control")
        # -f with ControlPersist: once logged in, the master goes to the background on its own
        # and the process started here exits 0
        persist = ["-f", "-o", "ControlPersist=yes"] if keep_in is not None else []
        master = subprocess.Popen(
            [*_ssh_options(endpoint, private), "-i", str(key), *persist,
             "-o", f"ConnectTimeout={timeout:.0f}", "-M", "-S", control, "-N", endpoint.host],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            process_group=0)
        # ssh makes the control socket (listening, under its final name) once logged in
        deadline = time.monotonic() + timeout + 5
        while not os.path.exists(control):
            if master.poll() is not None:
                raise _connect_error(endpoint, master.stderr.read().decode("utf-8", "replace"))
            if time.monotonic() > deadline:
                raise GuestError(f"no ssh login to {endpoint.host}:{endpoint.port} within "
                                 f"{timeout + 5:.0f} s")
            time.sleep(0.005)
        if keep_in is None:
            return GuestSession(endpoint, master, private, control)
        master.wait(timeout + 5)
        master.stderr.close()
        return KeptSession(endpoint, private, control)
    except BaseException:
        if master is not None:
            if master.poll() is None:
                master.kill()
                master.wait()
            master.stderr.close()
        if keep_in is not None:  # a master that went to the background meanwhile
            _end_kept(os.path.join(private, "control"))
        shutil.rmtree(private, ignore_errors=True)
        raise


def resume(endpoint: Endpoint, kept_in: Path) -> GuestSession | None:
    """The login `connect(keep_in=kept_in)` kept, if its master still runs (None: log in)."""
    control = str(kept_in / "control")
    if not (kept_in / "control").is_socket() or _ask_master(control, "check") != 0:
        return None
    return KeptSession(endpoint, str(kept_in), control)


def _end_kept(control: str) -> None:
    """Ask a kept master to end (nothing if there is none)."""
    if os.path.exists(control):
        _ask_master(control, "exit")


def _ask_master(control: str, command: str) -> int:
    """`ssh -O check|exit` to the master listening on `control`; its exit status."""
    return subprocess.run(["ssh", "-F", "/dev/null", "-S", control, "-O", command, HOST_ALIAS],
                          stdin=subprocess.DEVNULL, capture_output=True).returncode


def wait_for_ssh(endpoint: Endpoint, deadline: float, console_log: Path | None = None,
                 still_running=lambda: True, keep_in: Path | None = None) -> GuestSession:
    """Log in as soon as sshd answers (retried, backoff up to 1 s); a clear error at the
    deadline. sshd starts just after the guest prints its host key: the first tries are soon.
    `keep_in`: as for connect."""
    delay, last = 0.05, "no attempt made"
    while True:
        try:
            return connect(endpoint, timeout=max(2.0, min(10.0, deadline - time.monotonic())),
                           keep_in=keep_in)
        except HostKeyMismatch as exc:
            raise BootError(str(exc)) from None
        except GuestError as exc:
            last = str(exc)
        if not still_running():
            raise BootError(f"the VM stopped while waiting for ssh ({last}); console: "
                            f"{console_tail(console_log) if console_log else '-'}")
        if time.monotonic() + delay > deadline:
            tail = console_tail(console_log) if console_log else "-"
            raise BootError(f"ssh on {endpoint.host}:{endpoint.port} did not answer before the "
                            f"boot timeout (last error: {last}); console: {tail}")
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)


def remote_command(argv: Sequence[str], env: Mapping[str, str], cwd: str | None,
                   files: str, remove: str | None = None, prepare: str | None = None) -> str:
    """A POSIX sh command line that runs argv in its own session and reports its exit status.

    Every value is shlex-quoted, so quotes, `$`, backticks, newlines and unicode reach the payload
    unchanged. The payload runs under setsid so the whole process group can be signalled; its pid
    goes to `files`.pid for that purpose, its exit status to `files`.rc (read when ssh's own
    status, 255, is ambiguous). stdin is kept through fd 3 (a background command would otherwise
    read /dev/null). Its stdout and stderr are relayed through FIFOs, so that once it has exited
    a background process it left holding them delays the end by DRAIN_SECONDS at most (sshd
    keeps a session open while anything holds its pipes). `remove` (the job's scratch dir) is
    removed once the payload has ended, with the wrapper's own files: no round trip of its own.
    `prepare` (shell lines: the job's scratch dir, its script, the checks) runs first, in the
    same round trip: if it prints anything, that is its report of what is wrong, the payload is
    not run, and the exit status is 255 with NOT_READY and the report in `files`.rc. It runs in
    the wrapper's own shell (no subshell: a fork less on every job's path), so it must leave the
    umask alone: the payload gets the image's.
    """
    if not argv:
        raise GuestError("nothing to run: empty command")
    assigns = []
    for key, value in env.items():
        if not ENV_NAME_RE.match(key):
            log.warning("not forwarding environment variable with unusable name %r", key)
            continue
        assigns.append(shlex.quote(f"{key}={value}"))
    q = shlex.quote
    f = q(files)
    removed = f" {q(remove)}" if remove else ""
    parts = []
    if prepare:
        parts.append(f"{{ {prepare}\n}} >{f}.chk 2>/dev/null </dev/null")
        parts.append(f"if [ -s {f}.chk ]; then {{ echo {NOT_READY}; cat {f}.chk; }} >{f}.rc; "
                     f"rm -rf -- {f}.chk{removed}; exit 255; fi")
    if cwd:
        parts.append(f"cd -- {q(cwd)} || {{ echo {q('vmimagemanager: cannot enter ' + cwd)} >&2;"
                     " exit 1; }")
    # fd 3 keeps stdin for the payload; fd 4 keeps stderr for it while the wrapper's own stderr
    # goes to /dev/null (bash would otherwise print "Killed" into the job's error file).
    parts.append("exec 3<&0 4>&2 2>/dev/null")
    parts.append(f"mkfifo -m 600 {f}.o {f}.e || {{ echo 'vmimagemanager: mkfifo failed in the "
                 "VM' >&4; exit 1; }")
    parts.append(f"cat {f}.o & o=$!; cat {f}.e >&4 & e=$!")
    parts.append(f"setsid env -- {' '.join(assigns)} {' '.join(q(a) for a in argv)} "
                 f"<&3 >{f}.o 2>{f}.e 3<&- 4>&- &")
    parts.append(f"pid=$!; echo $pid > {f}.pid; exec 3<&-")
    parts.append(f"wait $pid; rc=$?; echo $rc > {f}.rc")
    # the timer holds none of the session's descriptors (sshd would wait for it)
    parts.append(f"(sleep {DRAIN_SECONDS}; kill $o $e) </dev/null >/dev/null 2>&1 4>&- & t=$!")
    chk = f" {f}.chk" if prepare else ""
    parts.append(f"wait $o $e; kill $t; rm -rf -- {f}.o {f}.e {f}.pid{chk}{removed}; exit $rc")
    return "\n".join(parts)


class _ExitWait:
    """`wait(timeout)`: the exit status, or None if the process still runs after `timeout` s.

    Woken by the process's exit itself (a pidfd, Linux 5.3) rather than Popen.wait's polling,
    which notices an exit up to 50 ms late: on every job's path. Where the kernel has no pidfd
    (EL8's 4.18), Popen.wait it is."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        try:
            self.pidfd: int | None = os.pidfd_open(proc.pid)
        except OSError:
            self.pidfd = None

    def wait(self, timeout: float) -> int | None:
        if self.pidfd is not None:
            if not select.select([self.pidfd], [], [], timeout)[0]:
                return None
            return self.proc.wait()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


class GuestSession:
    """A logged-in ssh connection to one guest as one user (an OpenSSH ControlMaster)."""

    def __init__(self, endpoint: Endpoint, master: subprocess.Popen | None, private: str,
                 control: str):
        self.endpoint = endpoint
        self._master = master
        self._private = private
        self._control = control
        self._stop = threading.Event()
        self._files: str | None = None

    def close(self) -> None:
        """End the connection and remove the socket and any key copy."""
        if self._master.poll() is None:
            self._master.terminate()
            try:
                self._master.wait(5)
            except subprocess.TimeoutExpired:
                self._master.kill()
                self._master.wait()
        self._master.stderr.close()
        shutil.rmtree(self._private, ignore_errors=True)

    def _argv(self, command: str, log_level: str = "ERROR") -> list[str]:
        # no -i: if the master is gone, ssh's own fallback to a new connection cannot log in
        return [*_ssh_options(self.endpoint, self._private, log_level), "-o", "ControlMaster=no",
                "-S", self._control, self.endpoint.host, command]

    def _closed(self) -> GuestError | None:
        if self._master.poll() is not None:
            return GuestError("the ssh connection to the VM is closed (the VM was stopped or "
                              "the connection broke)")
        return None

    def check_call(self, command: str, stdin: bytes = b"", timeout: float | None = None) -> str:
        """Run a small shell command; its stdout, or GuestError with its stderr (or when it
        takes longer than `timeout` seconds)."""
        if (closed := self._closed()) is not None:
            raise closed
        try:
            r = subprocess.run(self._argv(command), input=stdin, capture_output=True,
                               timeout=timeout)
        except subprocess.TimeoutExpired:
            raise GuestError(f"in the VM, {command.splitlines()[0]!r} did not end within "
                             f"{timeout:g} s") from None
        if r.returncode == 255 and (closed := self._closed()) is not None:
            raise closed
        if r.returncode != 0:
            raise GuestError(f"in the VM, {command.splitlines()[0]!r} failed ({r.returncode}): "
                             f"{r.stderr.decode('utf-8', 'replace').strip()}")
        return r.stdout.decode("utf-8", "replace")

    def upload(self, data: bytes, path: str, mode: int = 0o600) -> None:
        """Write a file in the guest, private from the start (no sftp: not every image has it)."""
        q = shlex.quote
        parent = os.path.dirname(path) or "."
        self.check_call(f"umask 077; mkdir -p -- {q(parent)} && cat > {q(path)} && "
                        f"chmod {mode:o} -- {q(path)}", stdin=data)

    def terminate(self, signame: str = "TERM") -> None:
        """Signal the payload's process group from a second session."""
        if self._files is None:
            return
        q = shlex.quote(f"{self._files}.pid")
        try:
            self.check_call(f"test -s {q} && kill -{signame} -- -$(cat {q}) 2>/dev/null; true")
        except Exception as exc:  # noqa: BLE001 - best effort while stopping; reported
            log.warning("could not signal the payload in the VM: %s", exc)

    def request_stop(self) -> None:
        """Called from a signal handler: the run loop stops the payload and returns."""
        self._stop.set()

    def run(self, argv: Sequence[str], env: Mapping[str, str] | None = None,
            cwd: str | None = None, stdin_fd: int | None = 0, stdout_fd: int = 1,
            stderr_fd: int = 2, remove: str | None = None, prepare: str | None = None) -> int:
        """Run argv in the guest with the given stdin/stdout/stderr; returns its exit status.

        0..255 as the payload exited; 128+N when a signal N killed it (as a shell reports it).
        ssh hands the descriptors to the connection's master, which relays them itself.
        GuestNotReady if `prepare` (see remote_command) reported problems.
        """
        if (closed := self._closed()) is not None:
            raise closed
        self._files = f"/tmp/.vmim-{secrets.token_hex(8)}"
        # ssh's own messages would land in the job's stderr: QUIET (failures show as 255)
        argv_ssh = self._argv(remote_command(argv, env or {}, cwd, self._files, remove,
                                             prepare), "QUIET")
        proc = subprocess.Popen(argv_ssh, stdin=subprocess.DEVNULL if stdin_fd is None
                                else stdin_fd, stdout=stdout_fd, stderr=stderr_fd,
                                process_group=0)  # the starter's signals are handled here
        stopping_since: float | None = None
        ended = _ExitWait(proc)
        try:
            while (status := ended.wait(0.2)) is None:
                now = time.monotonic()
                if self._stop.is_set() and stopping_since is None:
                    stopping_since = now
                    self.terminate("TERM")
                elif stopping_since is not None and now - stopping_since > 10:
                    self.terminate("KILL")
                    stopping_since = float("inf")
        finally:
            ended.close()
        if status == 255 or status < 0:  # ssh's own failure (or killed), or the payload's 255?
            lost = GuestError("the ssh connection to the VM ended without an exit status (the "
                              "VM was stopped or the connection broke)")
            try:
                kept = self.check_call(f"cat {shlex.quote(self._files + '.rc')}").splitlines()
            except GuestError:
                raise lost from None
            if kept[:1] == [NOT_READY]:
                raise GuestNotReady(kept[1:])
            try:
                return int(kept[0])
            except (IndexError, ValueError):
                raise lost from None
        return status


class KeptSession(GuestSession):
    """A login whose master ssh runs on its own (ControlPersist), not as our child: any root
    process may use it, and `close` ends it."""

    def __init__(self, endpoint: Endpoint, private: str, control: str):
        super().__init__(endpoint, None, private, control)

    def close(self) -> None:
        _end_kept(self._control)
        shutil.rmtree(self._private, ignore_errors=True)

    def _closed(self) -> GuestError | None:
        if not os.path.exists(self._control):  # the master removes it when it ends
            return GuestError("the kept ssh connection to the VM is closed (the VM was stopped "
                              "or the connection broke)")
        return None
