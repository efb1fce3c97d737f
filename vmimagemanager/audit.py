"""The audit trail: one JSON line per job event, for the questions a security incident asks.

Which Grid user ran what, in which image (name and sha256), on which node and slot, when, and
how it ended. `state_dir/audit.jsonl` is root-only (0600; etc/logrotate.d/vmimagemanager); the
same line goes to syslog or the journal when one runs (logger "vmimagemanager.audit").
`vmimagemanager history` reads it.

Events: `start` (the prolog's outcome: ready, retry or hold, with the reason; for a VM the slot,
domain, image, sha256, boot and prolog seconds, whether a warm spare served it), `end` (the
epilog: the payload's exit status or signal, the VM's CPU seconds), `spare` (the agent booted a
warm spare, or failed to) and `reconcile` (what a reconcile round cleaned up). Each event also
moves the Prometheus counters (metrics.py).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import stat
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .files import append_line

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger("vmimagemanager.audit")

AUDIT_FILE = "audit.jsonl"
PROXY_MAX_BYTES = 64 * 1024
# The proxy's own name parts: RFC 3820 proxies add CN=<number>, legacy ones CN=proxy or
# CN=limited proxy, to the subject of the certificate that signed them.
PROXY_CN = re.compile(r"(/CN=(\d+|proxy|limited proxy))+$")


def audit_path(cfg: Config) -> Path:
    return cfg.state_dir / AUDIT_FILE


def record(cfg: Config, event: str, job: str = "", **fields: object) -> None:
    """Append one event; a trail that cannot be written is logged, never in the job's way."""
    entry = {"time": round(time.time(), 3), "node": socket.gethostname(), "event": event,
             "job": job, **{k: v for k, v in fields.items() if v not in (None, "", {})}}
    line = json.dumps(entry)
    try:
        # a fresh node's first job may be one without a VM: nothing has made state_dir yet
        cfg.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        append_line(audit_path(cfg), line, 0o600)
    except OSError as exc:
        log.warning("audit trail %s not written: %s", audit_path(cfg), exc)
    log.info("%s", line)
    from .metrics import observe

    observe(cfg, entry)  # the Prometheus counters are a fold of these events


def proxy_identity(path: str | None, owner_uid: int) -> str:
    """The Grid identity of the job's proxy (`X509_USER_PROXY`): the subject of the proxy's
    first certificate without the proxy's own CN parts; '' when there is none.

    Root reads the file on the job's word (the path comes from the job's environment), so only
    a regular file of the job's owner, read without following a symbolic link, and only its
    certificate goes to openssl (its private key never leaves this process).
    """
    if not path:
        return ""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return ""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != owner_uid:
            return ""
        pem = os.read(fd, PROXY_MAX_BYTES).decode("ascii", errors="replace")
    except OSError:
        return ""
    finally:
        os.close(fd)
    match = re.search(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem, re.S)
    if not match:
        return ""
    try:
        out = subprocess.run(["openssl", "x509", "-noout", "-subject", "-nameopt", "compat"],
                             input=match.group(0), capture_output=True, text=True, timeout=10,
                             check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return PROXY_CN.sub("", out.removeprefix("subject=").strip())


def read_history(cfg: Config, job: str | None = None, user: str | None = None) -> list[dict]:
    """The trail's events, oldest first (the rotated file `audit.jsonl.1` included), optionally
    of one job (ID or ID.TASK) or one owner."""
    events = []
    for path in (audit_path(cfg).with_name(f"{AUDIT_FILE}.1"), audit_path(cfg)):
        try:
            lines = path.read_text().splitlines()
        except FileNotFoundError:
            continue
        for line in lines:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a full disk: skip it, keep the rest
                continue
            label = str(entry.get("job", ""))
            if job and label != job and label.split(".")[0] != job:
                continue
            if user and entry.get("owner") != user:
                continue
            events.append(entry)
    return events


def vm_starts(cfg: Config) -> dict[str, dict]:
    """Job label -> its last `start` event that started a VM (slot, image, spare, phases,
    prolog seconds): what benchmarks and tests read of a job's start."""
    return {e["job"]: e for e in read_history(cfg)
            if e["event"] == "start" and e.get("mode") == "vm"}
