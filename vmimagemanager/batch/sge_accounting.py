"""The job's true usage, VM included, as a gridengine accounting record.

Why a record of our own: gridengine 8.1.9's data collector finds a job's processes by the job's
additional group id, but only processes that started after the job did (checked on the cell: a
process with the job's group started while the prolog ran was not counted, one started while
the job ran was, to the hundredth of a second of libvirt's figure; docs/accounting.md). A job's
VM boots in the prolog, before the job starts, so qacct can never include it. The epilog reads
what libvirt says the domain used, just before destroying it, and appends one line in the format
of $SGE_ROOT/$SGE_CELL/common/accounting (sge_accounting(5)) to state_dir/accounting: the file
APEL's SGE parser reads (point its accounting file at it, or at both files).
"""

from __future__ import annotations

from collections.abc import Mapping

from ..accounts import account
from ..errors import VmimError
from ..jobs import Job
from .sge_spool import granted_pe, granted_shape

# sge_accounting(5), gridengine 8.1.9: 45 colon-separated fields.
FIELDS = (
    "qname", "hostname", "group", "owner", "job_name", "job_number", "account", "priority",
    "submission_time", "start_time", "end_time", "failed", "exit_status", "ru_wallclock",
    "ru_utime", "ru_stime", "ru_maxrss", "ru_ixrss", "ru_ismrss", "ru_idrss", "ru_isrss",
    "ru_minflt", "ru_majflt", "ru_nswap", "ru_inblock", "ru_oublock", "ru_msgsnd", "ru_msgrcv",
    "ru_nsignals", "ru_nvcsw", "ru_nivcsw", "project", "department", "granted_pe", "slots",
    "task_number", "cpu", "mem", "io", "category", "iow", "pe_taskid", "maxvmem", "arid",
    "ar_submission_time",
)


def _clean(value: object) -> str:
    """A field never holds the separator or a line break (a job name is the user's choice)."""
    return str(value).replace(":", "_").replace("\n", " ").replace("\r", " ")


def _number(values: Mapping[str, str], key: str) -> float:
    try:
        return float(values.get(key, 0) or 0)
    except ValueError:
        return 0.0


def record_fields(job: Job, host: str, config: Mapping[str, str], usage: Mapping[str, str],
                  vm: Mapping[str, float]) -> dict[str, object]:
    """`config` and `usage` are the job's spool files (execd's, not the user's); `vm` is what
    libvirt said the domain used. Host-side usage (the starter relaying over ssh) is added."""
    try:
        group = account(job.owner).primary_group
    except VmimError:
        group = "NONE"
    utime = _number(usage, "ru_utime") + vm.get("user_seconds", 0.0)
    stime = _number(usage, "ru_stime") + vm.get("system_seconds", 0.0)
    # libvirt's cpu_time is the whole QEMU process; user+system may lag it slightly.
    cpu = max(utime + stime, _number(usage, "ru_utime") + _number(usage, "ru_stime")
              + vm.get("cpu_seconds", 0.0))
    peak_kib = max(vm.get("peak_rss_kib", vm.get("rss_kib", 0.0)), _number(usage, "ru_maxrss"))
    # The wall time covers the period the CPU time was spent in: the VM's, from its boot (or
    # its bind, for a warm spare), which starts before execd's start_time (docs/accounting.md).
    wall = max(_number(usage, "ru_wallclock"), vm.get("wall_seconds", 0.0))
    end = _number(usage, "end_time")
    start = min(_number(usage, "start_time"), end - wall) if end else 0
    cores = int(vm.get("cores", 0)) or granted_shape(config)[0]
    fields: dict[str, object] = dict.fromkeys(FIELDS, 0)
    fields.update({
        "qname": config.get("queue", job.queue), "hostname": config.get("host", host),
        "group": group, "owner": job.owner, "job_name": config.get("job_name", "NONE"),
        "job_number": job.job_id, "account": config.get("account", "sge"),
        "priority": config.get("priority", "0"),
        "submission_time": config.get("submission_time", "0"),
        "start_time": f"{start:.0f}" if end else usage.get("start_time", "0"),
        "end_time": usage.get("end_time", "0"),
        "exit_status": usage.get("exit_status", "0"), "ru_wallclock": f"{wall:.0f}",
        "ru_utime": f"{utime:.6f}", "ru_stime": f"{stime:.6f}", "ru_maxrss": f"{peak_kib:.0f}",
        "project": "NONE", "department": "defaultdepartment",
        "granted_pe": granted_pe(config),
        "slots": cores, "task_number": job.task_id, "cpu": f"{cpu:.6f}",
        # GB*s: the peak resident memory over the wall time, an upper bound of the integral
        "mem": f"{peak_kib / (1 << 20) * wall:.6f}", "io": "0.000000", "category": "NONE",
        "iow": "0.000000", "pe_taskid": "NONE", "maxvmem": f"{peak_kib * 1024:.6f}",
    })
    for key in ("ru_ixrss", "ru_idrss", "ru_isrss", "ru_minflt", "ru_majflt", "ru_nswap",
                "ru_inblock", "ru_oublock", "ru_msgsnd", "ru_msgrcv", "ru_nsignals",
                "ru_nvcsw", "ru_nivcsw"):
        fields[key] = usage.get(key, "0")
    return fields


def record_line(job: Job, host: str, config: Mapping[str, str], usage: Mapping[str, str],
                vm: Mapping[str, float]) -> str:
    fields = record_fields(job, host, config, usage, vm)
    return ":".join(_clean(fields[name]) for name in FIELDS)


