"""`vmimagemanager images check NAME`: boot an image once and report which guest requirements it
meets (the list in README, "Guest image requirements")."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass

from .accounts import account, group_members
from .config import Config
from .context import key_path
from .errors import VmimError
from .guest import Endpoint, connect
from .images import ImageStore
from .node import JobRequest, open_node
from .shares import unmounted_report

TOOLS = ("sh", "setsid", "env", "cat", "mkdir", "mkfifo", "sleep", "kill", "rm", "stat")
# What ARC's job wrapper calls on the worker (it still runs the job without them, but reports
# "Unknown host", empty times and no accounting): one line naming what is missing.
ARC_WRAPPER_PROBE = ("m=''; command -v hostname >/dev/null || m=\"$m hostname\"; "
                     "date -d @0 >/dev/null 2>&1 || m=\"$m date-d\"; "
                     "/usr/bin/time --version >/dev/null 2>&1 || m=\"$m GNU-/usr/bin/time\"; "
                     "[ -z \"$m\" ] || { echo \"missing:$m\"; exit 1; }")


@dataclass
class Check:
    requirement: str
    ok: bool
    detail: str


def _vo_account(cfg: Config, image: str) -> str | None:
    """A pool account of a VO that uses this image (first member of its first group)."""
    for rule in cfg.vos:
        if rule.image != image:
            continue
        for group in rule.groups:
            if members := group_members(group):
                return members[0]
    return None


def run_checks(cfg: Config, image: str, user: str | None,
               batch_files: tuple[str, ...] = ()) -> list[Check]:
    """`batch_files`: what the batch system's CE job scripts read in the guest (SGE's
    settings.sh), named by the front end: the core knows no batch system."""
    life = open_node(cfg)
    login = user or _vo_account(cfg, image) or "root"
    request = JobRequest(job_id="check-" + image.replace(".", "-")[:50], task_id="0",
                         owner=login, image=image, vo="check")
    checks: list[Check] = []
    try:
        started = life.start_vm(request)
        lease, ctx = started.lease, started.context
    except VmimError as exc:
        return [Check("boots, prints its ssh host key on the console, sshd accepts the job key",
                      False, str(exc))]
    try:
        checks.append(Check("boots, prints its ssh host key on the console, sshd accepts the "
                            f"job key for {login}", True, f"slot {lease.slot}"))
        session = connect(Endpoint(ctx.host, ctx.port, login,
                                   key_path(cfg.run_dir, ctx.label), ctx.host_key))
        try:
            checks += _guest_checks(cfg, session, login, lease.slot)
            checks += _storage_checks(session, ctx.guest_checked_paths, ctx.label,
                                      batch_files)
        finally:
            session.close()
    finally:
        life.end_vm(lease.slot)
    return checks


def _probe(session, command: str) -> tuple[bool, str]:
    try:
        return True, session.check_call(command).strip()
    except VmimError as exc:
        return False, str(exc)


def _guest_checks(cfg: Config, session, user: str, slot: str) -> list[Check]:
    checks = []
    ok, out = _probe(session, "id -u; id -g")
    if user != "root":
        host = account(user)
        want = f"{host.uid}\n{host.gid}"
        checks.append(Check(f"pool account {user} has the host's uid/gid", ok and out == want,
                            f"guest {out.split()} host {want.split()}" if ok else out))
    missing = []
    for tool in TOOLS:
        found, _ = _probe(session, f"command -v {shlex.quote(tool)} >/dev/null")
        if not found:
            missing.append(tool)
    checks.append(Check("POSIX tools the executor uses: " + " ".join(TOOLS), not missing,
                        "missing: " + " ".join(missing) if missing else "all present"))
    found, out = _probe(session, ARC_WRAPPER_PROBE)
    checks.append(Check("hostname, date -d, GNU /usr/bin/time (ARC CE's job wrapper)", found,
                        "all present" if found else out or "missing"))
    found, out = _probe(session, "test -x /bin/bash && /bin/bash -c 'echo $BASH_VERSION'")
    checks.append(Check("/bin/bash (CE job managers write '#$ -S /bin/bash')", found,
                        out if found else "missing"))
    want_host = cfg.slot(slot).guest_hostname
    found, out = _probe(session, "hostname")
    checks.append(Check("contextualisation: host name from the seed", found and out == want_host,
                        f"hostname {out!r}, expected {want_host!r}"))
    return checks


def _storage_checks(session, shared: tuple[str, ...], label: str,
                    batch_files: tuple[str, ...]) -> list[Check]:
    """Shares mounted; login keys kept out of the (shared) home; the batch system's files CE
    jobs source."""
    checks = []
    found, out = _probe(session, unmounted_report(shared))
    for path in shared:
        mounted = found and f"dir {path}" not in out.splitlines()
        checks.append(Check(f"shared path {path} mounted", mounted,
                            "on its own file system" if mounted else
                            f"{path} is not a mounted file system in the guest"))
    found, out = _probe(session, 'cat "$HOME/.ssh/authorized_keys" 2>/dev/null; true')
    leaked = found and f"vmim-job-{label}" in out
    checks.append(Check("login keys kept out of the home directory (sshd AuthorizedKeysFile, "
                        "e.g. /etc/ssh/authorized_keys/%u)", found and not leaked,
                        "the job key was written to ~/.ssh/authorized_keys: with a shared home "
                        "that is the user's real home" if leaked else "not in ~/.ssh"))
    for settings in batch_files:
        found, _ = _probe(session, f"test -r {shlex.quote(settings)}")
        checks.append(Check(f"{settings} readable (CE job scripts source it)", found,
                            "present" if found else "missing: share $SGE_ROOT/$SGE_CELL/common "
                            "read-only (shared_paths) or install it in the image"))
    return checks


def check_image(cfg: Config, image: str, user: str | None, json_output: bool = False,
                batch_files: tuple[str, ...] = ()) -> int:
    ImageStore(cfg.image_dir).get(image)
    checks = run_checks(cfg, image, user, batch_files)
    if json_output:
        print(json.dumps([c.__dict__ for c in checks], indent=2))
    else:
        for c in checks:
            print(f"{'ok  ' if c.ok else 'FAIL'}  {c.requirement}: {c.detail}")
    return 0 if all(c.ok for c in checks) else 1
