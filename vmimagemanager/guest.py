"""The guest executor: reach a VM over ssh and run a job in it as the job's user.

The host key is never learnt from the network: the guest prints it on its serial console (the
cloud-init convention) and we pin exactly that key, so a process that grabbed the forwarded port
or an address on the bridge cannot pose as the job's VM. paramiko is imported here only: the
starter needs it, the prolog and epilog barely.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import re
import secrets
import select
import shlex
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import BootError, GuestError

log = logging.getLogger("vmimagemanager.guest")

HOST_KEY_BEGIN = "-----BEGIN SSH HOST KEY KEYS-----"
HOST_KEY_END = "-----END SSH HOST KEY KEYS-----"
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
CHUNK = 256 * 1024
# After the payload's exit status: output still in flight arrives within DRAIN_QUIET seconds; a
# background process it left holding stdout/stderr open is not waited for longer than that
# (or than DRAIN_MAX if it keeps writing).
DRAIN_QUIET = 5.0
DRAIN_MAX = 60.0


@dataclass(frozen=True)
class Endpoint:
    """Where and as whom to reach a guest, and the host key it must present."""

    host: str
    port: int
    user: str
    key: Path | bytes  # the private key's file, or its OpenSSH text (the prolog holds it in memory)
    host_key: str  # "ssh-ed25519 AAAA..." as printed on the guest console


def parse_console_host_keys(text: str) -> list[str]:
    """Host keys from the console's BEGIN/END block ("type base64" lines), last block wins."""
    keys: list[str] = []
    inside = False
    for raw in text.splitlines():
        line = raw.strip().strip("\r")
        if line == HOST_KEY_BEGIN:
            inside, keys = True, []
        elif line == HOST_KEY_END:
            inside = False
        elif inside and line.startswith(("ssh-", "ecdsa-")):
            parts = line.split()
            if len(parts) >= 2:
                keys.append(f"{parts[0]} {parts[1]}")
    return keys


def console_tail(path: Path, lines: int = 8) -> str:
    """Last lines of a console log joined into one line for an error message."""
    try:
        data = path.read_bytes()[-8192:].decode("utf-8", "replace")
    except OSError:
        return "(no console log)"
    tail = [ln.strip() for ln in data.replace("\r", "").splitlines() if ln.strip()][-lines:]
    return " | ".join(tail) if tail else "(console log is empty)"


def wait_for_host_key(console_log: Path, deadline: float, still_running) -> str:
    """Wait until the guest has printed its ssh host key on the console; return it."""
    delay = 0.1
    while True:
        try:
            keys = parse_console_host_keys(console_log.read_text("utf-8", "replace"))
        except OSError:
            keys = []
        if keys:
            ed25519 = [k for k in keys if k.startswith("ssh-ed25519 ")]
            return (ed25519 or keys)[0]
        if not still_running():
            raise BootError(f"the VM stopped before printing its ssh host key; console: "
                            f"{console_tail(console_log)}")
        if time.monotonic() > deadline:
            raise BootError(f"the VM printed no ssh host key before the boot timeout; is sshd "
                            f"in the image? console: {console_tail(console_log)}")
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)


def _pinned_client(endpoint: Endpoint):
    import paramiko

    client = paramiko.SSHClient()
    key_type, key_b64 = endpoint.host_key.split()[:2]
    key = paramiko.PKey.from_type_string(key_type, base64.b64decode(key_b64))
    name = endpoint.host if endpoint.port == 22 else f"[{endpoint.host}]:{endpoint.port}"
    client.get_host_keys().add(name, key_type, key)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    return client


def _load_private_key(key: Path | bytes):
    import paramiko

    try:
        if isinstance(key, bytes):
            return paramiko.Ed25519Key.from_private_key(io.StringIO(key.decode()))
        return paramiko.Ed25519Key.from_private_key_file(str(key))
    except (OSError, paramiko.SSHException) as exc:
        where = "(in memory)" if isinstance(key, bytes) else str(key)
        raise GuestError(f"cannot read the job's ssh key {where}: {exc}") from None


def connect(endpoint: Endpoint, timeout: float = 10.0):
    """One connection attempt with the pinned host key; returns a paramiko SSHClient."""
    client = _pinned_client(endpoint)
    client.connect(endpoint.host, endpoint.port, username=endpoint.user,
                   pkey=_load_private_key(endpoint.key), timeout=timeout,
                   banner_timeout=timeout, auth_timeout=timeout, look_for_keys=False,
                   allow_agent=False)
    transport = client.get_transport()
    if transport is not None:
        transport.set_keepalive(30)
    return client


def wait_for_ssh(endpoint: Endpoint, deadline: float, console_log: Path | None = None,
                 still_running=lambda: True):
    """Connect as soon as sshd answers (backoff up to 2 s); a clear error at the deadline."""
    import paramiko

    delay, last = 0.2, "no attempt made"
    while True:
        try:
            return connect(endpoint, timeout=max(2.0, min(10.0, deadline - time.monotonic())))
        except paramiko.BadHostKeyException:
            raise BootError(f"{endpoint.host}:{endpoint.port} presented a host key other than "
                            "the one the VM printed on its console; refusing to connect") from None
        except paramiko.AuthenticationException as exc:
            last = f"authentication failed ({exc})"
        except (OSError, EOFError, paramiko.SSHException) as exc:
            last = f"{type(exc).__name__}: {exc}"
        if not still_running():
            raise BootError(f"the VM stopped while waiting for ssh ({last}); console: "
                            f"{console_tail(console_log) if console_log else '-'}")
        if time.monotonic() + delay > deadline:
            tail = console_tail(console_log) if console_log else "-"
            raise BootError(f"ssh on {endpoint.host}:{endpoint.port} did not answer before the "
                            f"boot timeout (last error: {last}); console: {tail}")
        time.sleep(delay)
        delay = min(delay * 1.5, 2.0)


def remote_command(argv: Sequence[str], env: Mapping[str, str], cwd: str | None,
                   pidfile: str) -> str:
    """A POSIX sh command line that runs argv in its own session and reports its exit status.

    Every value is shlex-quoted, so quotes, `$`, backticks, newlines and unicode reach the payload
    unchanged. The payload runs under setsid so the whole process group can be signalled; its pid
    goes to `pidfile` for that purpose. stdin is kept through fd 3 (a background command would
    otherwise read /dev/null).
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
    parts = []
    if cwd:
        parts.append(f"cd -- {q(cwd)} || {{ echo {q('vmimagemanager: cannot enter ' + cwd)} >&2;"
                     " exit 1; }")
    # fd 3 keeps stdin for the payload; fd 4 keeps stderr for it while the wrapper's own stderr
    # goes to /dev/null (bash would otherwise print "Killed" into the job's error file).
    parts.append("exec 3<&0 4>&2 2>/dev/null")
    parts.append(f"setsid env -- {' '.join(assigns)} {' '.join(q(a) for a in argv)} "
                 "<&3 2>&4 3<&- 4>&- &")
    parts.append(f"pid=$!; echo $pid > {q(pidfile)}; exec 3<&- 4>&-")
    parts.append(f"wait $pid; rc=$?; rm -f {q(pidfile)}; exit $rc")
    return "\n".join(parts)


class GuestSession:
    """An ssh connection to one guest as one user."""

    def __init__(self, client):
        self.client = client
        self._stop = threading.Event()
        self._pidfile: str | None = None

    def close(self) -> None:
        self.client.close()

    def _exec(self, command: str):
        transport = self.client.get_transport()
        if transport is None or not transport.is_active():
            raise GuestError("the ssh connection to the VM is closed")
        channel = transport.open_session()
        channel.exec_command(command)
        return channel

    def check_call(self, command: str, stdin: bytes = b"") -> str:
        """Run a small shell command; its stdout, or GuestError with its stderr."""
        channel = self._exec(command)
        if stdin:
            channel.sendall(stdin)
        channel.shutdown_write()
        out = channel.makefile("rb").read()
        err = channel.makefile_stderr("rb").read()
        status = channel.recv_exit_status()
        channel.close()
        if status != 0:
            raise GuestError(f"in the VM, {command.splitlines()[0]!r} failed ({status}): "
                             f"{err.decode('utf-8', 'replace').strip()}")
        return out.decode("utf-8", "replace")

    def upload(self, data: bytes, path: str, mode: int = 0o600) -> None:
        """Write a file in the guest, private from the start (no sftp: not every image has it)."""
        q = shlex.quote
        parent = os.path.dirname(path) or "."
        self.check_call(f"umask 077; mkdir -p -- {q(parent)} && cat > {q(path)} && "
                        f"chmod {mode:o} -- {q(path)}", stdin=data)

    def terminate(self, signame: str = "TERM") -> None:
        """Signal the payload's process group from a second channel."""
        if self._pidfile is None:
            return
        q = shlex.quote(self._pidfile)
        try:
            self.check_call(f"test -s {q} && kill -{signame} -- -$(cat {q}) 2>/dev/null; true")
        except Exception as exc:  # noqa: BLE001 - best effort while stopping; reported
            log.warning("could not signal the payload in the VM: %s", exc)

    def request_stop(self) -> None:
        """Called from a signal handler: the run loop stops the payload and returns."""
        self._stop.set()

    def run(self, argv: Sequence[str], env: Mapping[str, str] | None = None,
            cwd: str | None = None, stdin_fd: int | None = 0, stdout_fd: int = 1,
            stderr_fd: int = 2) -> int:
        """Run argv in the guest, streaming stdin/stdout/stderr; returns its exit status.

        0..255 as the payload exited; 128+N when a signal N killed it (as a shell reports it).
        """
        self._pidfile = f"/tmp/.vmim-{secrets.token_hex(8)}.pid"
        channel = self._exec(remote_command(argv, env or {}, cwd, self._pidfile))
        feeder = None
        if stdin_fd is None:
            channel.shutdown_write()
        else:
            feeder = threading.Thread(target=_feed_stdin, args=(channel, stdin_fd), daemon=True)
            feeder.start()
        stopping_since: float | None = None
        exited_at: float | None = None
        last_data = time.monotonic()
        try:
            while True:
                now = time.monotonic()
                if self._stop.is_set() and stopping_since is None:
                    stopping_since = now
                    self.terminate("TERM")
                elif stopping_since is not None and now - stopping_since > 10:
                    self.terminate("KILL")
                    stopping_since = float("inf")
                if _drain(channel, stdout_fd, stderr_fd):
                    last_data = now
                    continue
                # OpenSSH may send the exit status before the rest of the output: the stream is
                # complete at EOF, not at the exit status.
                if channel.eof_received or channel.closed:
                    _drain(channel, stdout_fd, stderr_fd)  # what came in with the EOF
                    if channel.exit_status_ready() or channel.closed:
                        break
                    time.sleep(0.2)  # output closed, payload still running: wait (stoppable)
                    continue
                if channel.exit_status_ready():
                    exited_at = exited_at or now
                    if now - max(last_data, exited_at) > DRAIN_QUIET or \
                            now - exited_at > DRAIN_MAX:
                        log.info("payload exited but a process it left keeps its output open; "
                                 "not waiting for it")
                        break
                select.select([channel], [], [], 0.2)
            status = channel.recv_exit_status()
        finally:
            channel.close()
        if status < 0:
            raise GuestError("the ssh connection to the VM ended without an exit status (the VM "
                             "was stopped or the connection broke)")
        return status


def _drain(channel, stdout_fd: int, stderr_fd: int) -> bool:
    """Relay whatever output the channel holds right now; True if there was any."""
    got = False
    while channel.recv_ready():
        _write_all(stdout_fd, channel.recv(CHUNK))
        got = True
    while channel.recv_stderr_ready():
        _write_all(stderr_fd, channel.recv_stderr(CHUNK))
        got = True
    return got


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _feed_stdin(channel, fd: int) -> None:
    """Copy the host-side stdin into the channel, then signal EOF."""
    try:
        while True:
            data = os.read(fd, CHUNK)
            if not data:
                break
            channel.sendall(data)
    except OSError as exc:
        log.debug("stdin forwarding stopped: %s", exc)
    finally:
        try:
            channel.shutdown_write()
        except OSError as exc:  # channel already gone: nothing left to tell
            log.debug("stdin EOF not delivered: %s", exc)
