"""Run a batch job inside its VM from the job user's side (the starter's work).

Batch-system neutral: it takes a Job and the context the prolog wrote, connects with the pinned
host key, stages what the job needs (its script, its proxy), and relays stdin/stdout/stderr and
the exit status. Never imports libvirt.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shlex
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import NoReturn

from .context import JobContext, key_path
from .errors import GuestError, VmimError
from .guest import Endpoint, GuestNotReady, GuestSession, connect
from .jobs import Job
from .shares import is_under, unmounted_report

log = logging.getLogger("vmimagemanager.runner")

# Host-side variables that must not reach the guest: they describe the host process, the
# dynamic loader, or the ssh/starter plumbing.
DROP_EXACT = {"PWD", "OLDPWD", "SHLVL", "_", "SSH_AUTH_SOCK", "SSH_CLIENT", "SSH_CONNECTION",
              "SSH_TTY", "VMIM_CONFIG", "BASH_ENV", "ENV"}
DROP_PREFIX = ("LD_", "SSH_", "SGE_STARTER_", "BASH_FUNC_")
GUEST_SCRIPT = "job-script"  # the job's script, in its scratch dir in the guest
# A job script goes into the guest inside the run's own command line (one ssh round trip fewer
# per job) while it and the job's environment together stay below this; the command is one
# argument of the guest's `sh -c`, which Linux limits to 128 KiB.
EMBED_MAX = 64 * 1024
# A job whose VM's OOM killer ended one of its processes, and whose payload still exited 0, ends
# with this status (a shell's for a process killed by SIGKILL): it did not get the memory it
# needed, and a pilot or CE must see that it failed.
OOM_STATUS = 137
OOM_CHECK_TIMEOUT = 30.0  # seconds the VM gets to say its OOM count after the payload ended


def embedded_write(target: str, script: bytes, room: int = EMBED_MAX) -> str | None:
    """Shell lines writing `script` to `target` from a here-document (every byte as it is),
    with `|| echo script` on failure; None where a here-document cannot carry it unchanged
    (larger than `room`, a NUL byte, no final newline) or could end it early."""
    if len(script) > room or b"\0" in script or not script.endswith(b"\n"):
        return None
    text = script.decode("utf-8", "surrogateescape")  # the command line gives back the bytes
    end = f"VMIM_SCRIPT_END_{secrets.token_hex(8)}"
    if end in text:
        return None
    q = shlex.quote(target)
    return f"; cat > {q} <<'{end}' && chmod 700 -- {q} || echo script\n{text}{end}"


def guest_environment(env: Mapping[str, str], host_tmpdir: str | None, guest_tmp: str) -> dict:
    """The job's environment as the guest should see it."""
    result = {}
    for key, value in env.items():
        if key in DROP_EXACT or key.startswith(DROP_PREFIX):
            continue
        result[key] = value
    for key in ("TMPDIR", "TMP"):
        if key in result:
            result[key] = guest_tmp
    if host_tmpdir and "PATH" in result:
        parts = [guest_tmp if p == host_tmpdir else p for p in result["PATH"].split(":")]
        result["PATH"] = ":".join(parts)
    return result


class JobRunner:
    def __init__(self, job: Job, context: JobContext, run_dir: Path):
        self.job = job
        self.context = context
        self.run_dir = run_dir
        self.session: GuestSession | None = None

    def _on_signal(self, signum, _frame) -> None:
        log.warning("job %s: got signal %d, stopping the payload in the VM", self.job.label,
                    signum)
        if self.session is not None:
            self.session.request_stop()

    def run(self, stdin_fd: int | None = 0) -> int:
        ctx = self.context
        endpoint = Endpoint(host=ctx.host, port=ctx.port, user=ctx.user,
                            key=key_path(self.run_dir, ctx.label), host_key=ctx.host_key)
        try:
            self.session = connect(endpoint)
        except GuestError as exc:  # one clear line for the .e file
            raise GuestError(f"cannot reach the job's VM at {ctx.host}:{ctx.port} ({exc}); the "
                             "VM may have stopped") from None
        signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in signals}
        try:
            return self._run_in_guest(stdin_fd)
        finally:
            self.session.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _guest_oom_kills(self) -> int:
        """How often the guest's OOM killer ran since the VM booted (its own counter: a job's
        VM is fresh, so any kill was of the job); 0 where the guest cannot say."""
        assert self.session is not None
        try:  # the guest answers this: bounded in time, and only digits are taken
            vmstat = self.session.check_call("cat /proc/vmstat", timeout=OOM_CHECK_TIMEOUT)
        except GuestError as exc:  # the VM is gone: the job's status says enough
            log.info("job %s: no OOM count from the VM: %s", self.job.label, exc)
            return 0
        found = re.search(r"^oom_kill ([0-9]{1,20})$", vmstat, re.M)
        return int(found.group(1)) if found else 0

    def _preparation(self, scratch: str, write: str) -> str:
        """Shell lines that make the scratch dir (private from the start: the script is written
        into it, readable by nobody else before its chmod), then `write` the job script into it,
        and print a line for each problem: `scratch`, `dir PATH` (a share not mounted),
        `file PATH` (a file the script sources is missing), `script`. The umask stays the
        image's (remote_command's `prepare`)."""
        q = shlex.quote
        files = " ".join(q(p) for p in self.job.guest_files)
        return (f"mkdir -p -m 700 -- {q(scratch)} || echo scratch; "
                f"{unmounted_report(self.context.guest_checked_paths)}; "
                f"for p in {files}; do test -r \"$p\" || echo \"file $p\"; done{write}")

    def _refuse(self, report: list[str], scratch: str) -> NoReturn:
        """The one clear line for what the preparation reported."""
        problems = [(line.split(" ", 1) + [""])[:2] for line in report if line.strip()]
        kinds = {kind for kind, _ in problems}
        dirs = [p for kind, p in problems if kind == "dir"]
        files = [p for kind, p in problems if kind == "file"]
        if dirs:
            raise GuestError(f"the VM is not ready for the job: shared path(s) {', '.join(dirs)} "
                             f"not mounted in image {self.context.image}; check 'vmimagemanager "
                             "images check' and shared_paths")
        if files:
            raise GuestError(f"image {self.context.image} has no {', '.join(files)}, which the "
                             "job script sources (CE job managers do); share its directory "
                             "read-only (shared_paths) or install it in the image")
        if "scratch" in kinds or "script" in kinds:
            raise GuestError(f"cannot write the job script into {scratch} in the VM (is its "
                             "file system full or read-only?)")
        raise GuestError(f"the VM is not ready for the job: {'; '.join(report)}")

    def _run_in_guest(self, stdin_fd: int | None) -> int:
        assert self.session is not None
        job, ctx = self.job, self.context
        scratch = f"{ctx.scratch_dir.rstrip('/')}/vmim-{job.label}"
        argv = list(job.argv)
        script = Path(argv[0]).read_bytes() if job.is_script else None
        guest_script = f"{scratch}/{GUEST_SCRIPT}"
        env = guest_environment(job.env, job.env.get("TMPDIR"), scratch)
        room = EMBED_MAX - sum(len(k) + len(v) + 4 for k, v in env.items())
        write = "" if script is None else embedded_write(guest_script, script, room)
        if write is None:  # not in the command line: a round trip of its own, from stdin
            target = shlex.quote(guest_script)
            report = self.session.check_call(self._preparation(
                scratch, f"; cat > {target} && chmod 700 -- {target} || echo script"),
                stdin=script or b"")
            if report.strip():
                self._refuse(report.splitlines(), scratch)
        prepare = None if write is None else self._preparation(scratch, write)
        if script is not None:
            if job.exec_script and script.startswith(b"#!"):
                argv = [guest_script, *argv[1:]]
            else:
                argv = [job.shell, guest_script, *argv[1:]]
        proxy = env.get("X509_USER_PROXY")
        if proxy and os.path.isabs(proxy) and not is_under(proxy, ctx.shared_paths):
            try:
                data = Path(proxy).read_bytes()
            except OSError as exc:
                raise GuestError(f"cannot read X509_USER_PROXY {proxy}: {exc.strerror}") from None
            self.session.upload(data, proxy, 0o600)
        cwd = job.cwd if job.cwd and is_under(job.cwd, ctx.shared_paths) else scratch
        log.info("job %s: running %s in slot %s (image %s) as %s in %s", job.label,
                 "script" if job.is_script else "binary", ctx.slot, ctx.image, ctx.user, cwd)
        try:  # the command removes the scratch dir once the payload has ended
            status = self.session.run(argv, env, cwd, stdin_fd=stdin_fd, remove=scratch,
                                      prepare=prepare)
            if self._guest_oom_kills() > 0:  # the job ran out of its memory: it failed
                print(out_of_memory_line(job, ctx), file=sys.stderr, flush=True)
                return status or OOM_STATUS
            return status
        except GuestNotReady as exc:  # nothing ran, the scratch dir is gone
            self._refuse(exc.report, scratch)
        except BaseException:
            try:
                self.session.check_call(f"rm -rf -- {shlex.quote(scratch)}")
            except Exception as exc:  # noqa: BLE001 - the VM is destroyed by the epilog anyway
                log.info("job %s: scratch cleanup skipped: %s", job.label, exc)
            raise


def out_of_memory_line(job: Job, ctx: JobContext) -> str:
    """The job's one line when the guest's OOM killer ended a process of it."""
    size = f"{ctx.memory_mib / 1024:g} GiB" if ctx.memory_mib else "memory"
    return (f"vmimagemanager: job {job.label} ran out of its {size} (its VM's memory, "
            f"{ctx.cores or 1} core(s)): the VM's kernel killed a process of the job; ask for "
            "more memory (SGE: -l h_vmem per slot; Slurm: --mem)")


def start_in_context(job: Job, context: JobContext, run_dir: Path) -> int:
    """The starter's last step in every batch system: end a rejected job with its reason, run a
    native one as the batch system would, or run the job in its VM."""
    if context.mode == "reject":
        print(context.message, file=sys.stderr)
        return 1
    if context.mode == "native":
        return exec_native(job)
    try:
        return JobRunner(job, context, run_dir).run()
    except VmimError as exc:
        print(f"vmimagemanager: job {job.label}: {exc}", file=sys.stderr)
        return 1


def exec_native(job: Job) -> int:
    """No VO matched and the site runs such jobs on the host: do what the batch system itself
    would (a script without #! goes to the job's shell)."""
    argv = list(job.argv)
    if job.is_script and not (job.exec_script and has_shebang(argv[0])):
        argv = [job.shell, *argv]
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        print(f"vmimagemanager: cannot run {argv[0]}: {exc.strerror}", file=sys.stderr)
        return 127
    return 127  # not reached


def has_shebang(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(2) == b"#!"
    except OSError:
        return False
