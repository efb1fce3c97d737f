"""What SGE's execd spools for a job, read by root hooks and the starter alike.

The job's spool directory (`$SGE_JOB_SPOOL_DIR`) holds `config` (the job's settings), the
epilog's `usage`, and, two levels up, the spooled job script. Root hooks trust the directory
only where execd keeps it (trusted_spool_dir) and read every file as untrusted (no links, bounded,
never blocking): the job's owner names the directory through the job's environment.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Mapping, Sequence

from ..accounts import account
from ..errors import VmimError
from ..files import read_untrusted
from ..jobs import Job

log = logging.getLogger("vmimagemanager.sge")


def trusted_spool_dir(path: str | None, job: Job, host: str,
                      execd_spools: Sequence[str]) -> str | None:
    """$SGE_JOB_SPOOL_DIR (`path`) for a root hook, only if it is execd's directory of this
    job: `<execd_spool_dir>/<host>/active_jobs/<job>.<task>` (a job outside an array is task
    1 there) for an execd_spool_dir install-queue wrote into the hook's command line. The root
    hooks' environment carries the user's `qsub -v` variables, and a directory of that name
    made by another account of the same person (or by a guest's root through a share) would
    otherwise forge the job's accounting record and its proxy."""
    if not path or not host or "/" in host or host.startswith("."):
        return None
    task = job.task_id if job.task_id != "0" else "1"
    names = {host, host.split(".")[0]}  # execd names its directory by the short name or not
    expected = {os.path.realpath(os.path.join(base, name, "active_jobs",
                                              f"{job.job_id}.{task}"))
                for base in execd_spools if base.startswith("/") for name in names}
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
        owner_uid = account(job.owner).uid
    except (OSError, VmimError):
        return None
    if real not in expected or not stat.S_ISDIR(st.st_mode) or st.st_uid == owner_uid:
        log.warning("job %s: ignoring SGE_JOB_SPOOL_DIR %r: not execd's spool directory of "
                    "the job (%s)", job.label, path, ", ".join(sorted(expected)) or
                    "no --execd-spool: run 'vmimagemanager sge install-queue' again")
        return None
    return real


# GRAM's SGE job manager writes the job's environment into the script, one variable a line:
# X509_USER_PROXY="<path, with \\ \$ \" \` escaped>"; export X509_USER_PROXY
GRAM_PROXY_LINE = re.compile(r'^X509_USER_PROXY="((?:[^"\\]|\\.)*)"; export X509_USER_PROXY$',
                             re.M)
SCRIPT_HEAD_BYTES = 1 << 20
SCRIPT_MAX_BYTES = 64 << 20
SPOOL_FILE_MAX_BYTES = 1 << 20  # a spooled script larger than this is not searched at all


def spooled_script(spool_dir: str | None, spool: Mapping[str, str], job_id: str) -> str:
    """The job script as execd spooled it (`<execd spool>/job_scripts/<job id>`), or '' when
    the job's script_file is anything else: for `qsub -b y PATH` it names the user's PATH,
    which root must not open (a FIFO would hang the prolog, a device would be opened)."""
    script_file = spool.get("script_file", "")
    if not spool_dir or spool.get("handle_as_binary", "0") != "0" or not script_file:
        return ""
    expected = os.path.join(os.path.dirname(os.path.dirname(spool_dir)), "job_scripts", job_id)
    # spool_dir is a real path (trusted_spool_dir), so `expected` has no link to follow
    return expected if os.path.realpath(script_file) == expected else ""


def script_proxy_path(spool_dir: str | None, spool: Mapping[str, str], job_id: str) -> str:
    """The proxy a CE-written job script sets (GRAM puts it in the script, not in the job's
    environment), for the audit trail; '' if the script sets none. Only read, never run: the
    spooled copy only, not following links, at most its first SCRIPT_HEAD_BYTES."""
    script = spooled_script(spool_dir, spool, job_id)
    if not script:
        return ""
    try:
        head = read_untrusted(script, None, SCRIPT_MAX_BYTES)[:SCRIPT_HEAD_BYTES]
    except OSError:
        return ""
    match = GRAM_PROXY_LINE.search(head.decode("utf-8", errors="replace"))
    return re.sub(r"\\(.)", r"\1", match.group(1)) if match else ""


def is_interactive(spool: Mapping[str, str]) -> bool:
    """qrsh, qlogin and qsh jobs: execd writes their script_file as a keyword, not a path."""
    return spool.get("script_file") in ("QRSH", "QLOGIN", "INTERACTIVE") or \
        "qrsh_control_port" in spool


def read_spool_file(spool_dir: str | None, name: str = "config") -> dict[str, str]:
    """A key=value file of the job's spool directory: `config` (handle_as_binary, shell_path,
    script_file, ...) or, in the epilog, `usage` (exit_status, signal, ru_*)."""
    values: dict[str, str] = {}
    if not spool_dir:
        return values
    try:
        text = read_untrusted(os.path.join(spool_dir, name), None, SPOOL_FILE_MAX_BYTES)
    except OSError:
        return values
    for line in text.decode("utf-8", errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key] = value
    return values


# gridengine's memory specifiers (sge_types(1)): k, m, g are powers of 1000, K, M, G of 1024
MEMORY_UNITS = {"": 1, "k": 1000, "K": 1 << 10, "m": 1000 ** 2, "M": 1 << 20,
                "g": 1000 ** 3, "G": 1 << 30}
MEMORY_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)([kKmMgG]?)")


def memory_mib(text: str) -> int | None:
    """A gridengine memory value ("512M", "2G", "536870912") in MiB, rounded up; None for
    INFINITY, nothing or anything that is not one."""
    match = MEMORY_RE.fullmatch(text.strip())
    if match is None:
        return None
    size = float(match.group(1)) * MEMORY_UNITS[match.group(2)]
    return -(-int(size) // (1 << 20)) or None


def granted_pe(spool: Mapping[str, str]) -> str:
    """The job's PE as the accounting file names it: NONE for a serial job."""
    pe = spool.get("pe", "")
    return "NONE" if pe.lower() in ("", "none") else pe


def granted_shape(spool: Mapping[str, str]) -> tuple[int, int | None]:
    """The cores and memory (MiB, None: none asked) execd granted the job on this host, from
    its spooled `config` (gridengine 8.1.9 writes `pe=none`, `pe_slots=1`, `host_slots=1` for
    a serial job): a PE job's slots here (host_slots; pe_slots under allocation_rule
    $pe_slots), else 1; h_vmem per slot times the slots (execd's own limit of the job is that
    product), or the job's own value where the complex is consumable per JOB."""
    cores = 1
    if granted_pe(spool) != "NONE":
        for key in ("host_slots", "pe_slots"):
            if spool.get(key, "").isdigit() and int(spool[key]) > 0:
                cores = int(spool[key])
                break
    per = memory_mib(spool.get("h_vmem", ""))
    if per is None:
        return cores, None
    job_level = spool.get("h_vmem_is_consumable_job", "0").lower() in ("1", "true")
    return cores, per if job_level else per * cores


def sge_settings_path(env: Mapping[str, str]) -> str | None:
    """`$SGE_ROOT/$SGE_CELL/common/settings.sh`, the file CE job scripts source (None: no SGE)."""
    root = env.get("SGE_ROOT")
    return f"{root.rstrip('/')}/{env.get('SGE_CELL') or 'default'}/common/settings.sh" \
        if root else None


def sourced_sge_settings(script: str, env: Mapping[str, str]) -> tuple[str, ...]:
    """The cell's settings.sh if the job script sources it, as CE job managers' scripts do."""
    settings = sge_settings_path(env)
    if settings is None:
        return ()
    try:
        with open(script, encoding="utf-8", errors="replace") as fh:
            return (settings,) if settings in fh.read(1 << 20) else ()
    except OSError:  # the runner reports an unreadable script itself
        return ()
