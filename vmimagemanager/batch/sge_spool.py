"""What SGE's execd spools for a job, read by root hooks and the starter alike.

The job's spool directory (`$SGE_JOB_SPOOL_DIR`) holds `config` (the job's settings), the
epilog's `usage`, and, two levels up, the spooled job script. Root hooks trust the directory
only where execd keeps it (trusted_spool_dir) and read every file as untrusted (no links, bounded,
never blocking): the job's owner names the directory through the job's environment.
"""

from __future__ import annotations

import logging
import math
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


class SpoolFile(dict):
    """A key=value file of execd's: its values (the first of a key), and the keys written more
    than once (`repeated`)."""

    repeated: frozenset[str] = frozenset()


def read_spool_file(spool_dir: str | None, name: str = "config") -> SpoolFile:
    """A key=value file of the job's spool directory: `config` (handle_as_binary, shell_path,
    script_file, pe, h_vmem, ...) or, in the epilog, `usage` (exit_status, signal, ru_*).

    Lines end at "\n" only, as execd writes them: str.splitlines would also end one at \x1c,
    \x85 or \u2028, which a job's name or arguments (printed there as they are) may hold.
    A job argument with a line break still adds a line: a key found twice is in `repeated`."""
    values = SpoolFile()
    if not spool_dir:
        return values
    try:
        text = read_untrusted(os.path.join(spool_dir, name), None, SPOOL_FILE_MAX_BYTES)
    except OSError:
        return values
    repeated = set()
    for line in text.decode("utf-8", errors="replace").split("\n"):
        key, sep, value = line.partition("=")
        if not sep:
            continue
        if key in values:
            repeated.add(key)
        else:
            values[key] = value
    values.repeated = frozenset(repeated)
    return values


# gridengine's memory values (sge_types(1)): a number as strtod reads it, or, starting with 0,
# as strtol with base 0 does (octal, 0x hex); k, m, g are powers of 1000, K, M, G of 1024
MEMORY_UNITS = {"": 1, "k": 1000, "K": 1 << 10, "m": 1000 ** 2, "M": 1 << 20,
                "g": 1000 ** 3, "G": 1 << 30}
MEMORY_RE = re.compile(r"\+?(0[xX][0-9a-fA-F]{1,16}|0[0-7]{0,22}|[1-9][0-9]{0,20}(?:\.[0-9]{1,20})?"
                       r"(?:[eE][+-]?[0-9]{1,3})?|\.[0-9]{1,20})([kKmMgG]?)")
SHAPE_KEYS = ("pe", "pe_slots", "host_slots", "h_vmem", "h_vmem_is_consumable_job")


def memory_mib(text: str) -> int | None:
    """A gridengine memory value ("512M", "2G", "536870912", "1e9", "0x20000000") in MiB,
    rounded up; None for INFINITY or nothing (none asked); 0 for 0 (the smallest VM).
    VmimError for anything else: the job is held with the value, never given a default."""
    text = text.strip()
    if text in ("", "INFINITY", "infinity"):
        return None
    match = MEMORY_RE.fullmatch(text)
    if match is None:
        raise VmimError(f"h_vmem={text[:40]!r} in the job's spooled config is not a memory "
                        "value; resubmit it with one such as 2G")
    number = match.group(1)
    if number[:2] in ("0x", "0X"):
        size = float(int(number, 16))
    elif number.startswith("0") and "." not in number:
        size = float(int(number, 8))
    else:
        size = float(number)
    size *= MEMORY_UNITS[match.group(2)]
    if not math.isfinite(size):
        raise VmimError(f"h_vmem={text[:40]!r} in the job's spooled config is too large")
    return math.ceil(size / (1 << 20))


def granted_pe(spool: Mapping[str, str]) -> str:
    """The job's PE as the accounting file names it: NONE for a serial job."""
    pe = spool.get("pe", "")
    return "NONE" if pe.lower() in ("", "none") else pe


def granted_shape(spool: Mapping[str, str]) -> tuple[int, int | None]:
    """The cores and memory (MiB, None: none asked) execd granted the job on this host, from
    its spooled `config` (gridengine 8.1.9 writes `pe=none`, `pe_slots=1`, `host_slots=1` for
    a serial job): a PE job's slots here (host_slots; pe_slots under allocation_rule
    $pe_slots), else 1; h_vmem per slot times the slots (execd's own limit of the job is that
    product), or the job's own value where the complex is consumable per JOB. VmimError (the
    job is held) where a value is not one, or one of them is written twice: a job argument
    with a line break adds lines to the file, and which is execd's cannot be told."""
    repeated = sorted(set(getattr(spool, "repeated", ())) & set(SHAPE_KEYS))
    if repeated:
        raise VmimError(f"the job's spooled config names {', '.join(repeated)} more than once "
                        "(a job name or argument with a line break adds lines there): its "
                        "cores and memory cannot be told; resubmit it without one")
    cores = 1
    if granted_pe(spool) != "NONE":
        for key in ("host_slots", "pe_slots"):
            if re.fullmatch(r"[0-9]{1,5}", spool.get(key, "")) and int(spool[key]) > 0:
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
