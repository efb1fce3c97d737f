"""Son of Grid Engine adapter: prolog (root), starter_method (job user), epilog (root).

Exit codes, as checked on a real cell (see README, troubleshooting):
- prolog 0: go on; 99: SGE puts the job back in the queue (no free slot, a boot that failed);
  100: the job goes to Eqw, held for an admin (missing image, bad configuration, a job whose VM
  failed to boot max_boot_attempts times). Any other code would put the *queue instance* into the
  E state and stop the node, so the prolog never exits with one.
- epilog: always 0. 99 would run the finished job again and 100 would hold it; leftovers after a
  failed epilog are logged and removed by `vmimagemanager reconcile`.

The root hooks run with the job's environment, which the user controls (`qsub -v`): they read
only HOOK_ENV from it (each value checked before use), run with the allow-list environment of
rootenv, and take the configuration path only from argv.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import stat
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from ..accounts import account
from ..config import Config, config_path, load_config
from ..errors import VmimError
from ..files import append_line, read_untrusted
from ..flow import Decision, Outcome
from ..jobs import Job, check_job_id, normalise_task_id
from ..logsetup import setup_logging
from .base import starter_arguments
from .contract import HookCall, run_epilog, run_prolog

if TYPE_CHECKING:
    from ..node import EndResult

log = logging.getLogger("vmimagemanager.sge")

EXIT_OK = 0
EXIT_RESCHEDULE = 99
EXIT_HOLD = 100
# What the root hooks read of the environment SGE gives them (the job's): SGE_TASK_ID when the
# queue passes no $ja_task_id, the job's spool directory (checked: execd's own), the proxy's
# path (read as the owner's file, never followed through a link).
HOOK_ENV = ("SGE_TASK_ID", "SGE_JOB_SPOOL_DIR", "X509_USER_PROXY")


def _hook_args(program: str, argv: Sequence[str] | None,
               env: Mapping[str, str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=program, description="SGE hook of vmimagemanager; configured in the queue as "
        f"'root@{program} --config FILE $job_id $ja_task_id $job_owner $queue $host'")
    parser.add_argument("--config", help="configuration file (never taken from the environment)")
    parser.add_argument("--execd-spool", action="append", default=[], metavar="DIR",
                        help="sge_execd's spool directory (execd_spool_dir; install-queue "
                        "writes it): only $SGE_JOB_SPOOL_DIR below DIR/HOST/active_jobs/ is "
                        "trusted")
    parser.add_argument("args", nargs="+", metavar="ARG",
                        help="JOB_ID [TASK_ID] JOB_OWNER QUEUE HOST")
    ns = parser.parse_args(argv)
    if len(ns.args) == 5:
        ns.job_id, task, ns.owner, ns.queue, ns.host = ns.args
    elif len(ns.args) == 4:
        ns.job_id, ns.owner, ns.queue, ns.host = ns.args
        task = env.get("SGE_TASK_ID")
    else:
        parser.error("expected JOB_ID [TASK_ID] JOB_OWNER QUEUE HOST")
    ns.job_id = check_job_id(ns.job_id)
    ns.task_id = normalise_task_id(task)
    return ns


# What the prolog tells SGE of each outcome: exit status, log level and word, the end of the one
# line the job's .e file gets (tests/cell/test_sge.py, tests/cell/test_faults.py check each on
# the cell).
PROLOG_OUTCOMES = {
    Outcome.READY: (EXIT_OK, logging.INFO, "ready", ""),
    Outcome.RETRY: (EXIT_RESCHEDULE, logging.WARNING, "rescheduled", "the job is rescheduled"),
    Outcome.HOLD: (EXIT_HOLD, logging.ERROR, "held",
                   "the job is held (Eqw): fix the cause, then 'qmod -cj {job_id}'"),
}


class SgeHooks:
    """The SGE side of the hook contract (batch/contract.py)."""

    program = "vmim-sge"
    hook_env = HOOK_ENV

    def parse(self, hook: str, argv: Sequence[str] | None,
              env: Mapping[str, str]) -> HookCall:
        args = _hook_args(f"{self.program}-{hook}", argv, env)
        job = Job(job_id=args.job_id, task_id=args.task_id, owner=args.owner, queue=args.queue)
        return HookCall(job, args.config, env, args.host, trusted_spool_dir(
            env.get("SGE_JOB_SPOOL_DIR"), job, args.host, args.execd_spool))

    def unusable(self, hook: str, exc: BaseException) -> int:
        log.error("%s: %s", hook, exc)
        if hook == "epilog":  # never 99/100 here: see the module docstring
            print(f"vmimagemanager epilog: {exc}", file=sys.stderr)
            return EXIT_OK
        print(f"vmimagemanager prolog: {exc}; the job is held (Eqw) until an admin fixes "
              "this and runs 'qmod -cj'", file=sys.stderr)
        return EXIT_HOLD

    def admission(self, call: HookCall) -> tuple[Job, bool]:
        """The proxy a CE delegated, for the audit trail's Grid identity: the job's variable,
        or the line GRAM writes into the spooled script."""
        job = call.job
        spool = read_spool_file(call.spool_dir)
        proxy = call.env.get("X509_USER_PROXY") or script_proxy_path(call.spool_dir, spool,
                                                                      job.job_id)
        return replace(job, env={"X509_USER_PROXY": proxy}), is_interactive(spool)

    def report(self, cfg: Config | None, call: HookCall, decision: Decision) -> int:
        status, level, word, says = PROLOG_OUTCOMES[decision.outcome]
        job = call.job
        if says:
            log.log(level, "job %s: %s: %s", job.label, word, decision.reason)
            print(f"vmimagemanager prolog: job {job.label}: {decision.reason}; "
                  f"{says.format(job_id=job.job_id)}", file=sys.stderr)
        return status

    def ended(self, cfg: Config, call: HookCall, ended: EndResult) -> tuple[str, str]:
        """gridengine's accounting line with the VM's usage; a starter killed on the node said
        so in the job's .e file."""
        job, spool_dir = call.job, call.spool_dir
        usage = read_spool_file(spool_dir, "usage")
        vm = ended.usage
        if vm is not None:
            from .sge_accounting import record_line

            append_line(cfg.state_dir / "accounting", record_line(
                job, call.host, read_spool_file(spool_dir), usage, vm), 0o640)
        if usage.get("signal", "0") not in ("", "0"):  # the starter on the host was killed
            print(f"vmimagemanager epilog: job {job.label} was ended by signal "
                  f"{usage['signal']} on the node (qdel, a limit such as h_rt, the OOM killer "
                  "or an admin); its VM is destroyed", file=sys.stderr)
        return usage.get("exit_status", ""), usage.get("signal", "")


def prolog_main(argv: Sequence[str] | None = None) -> int:
    return run_prolog(SgeHooks(), argv)


def epilog_main(argv: Sequence[str] | None = None) -> int:
    return run_epilog(SgeHooks(), argv)


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


# -- starter_method (runs as the job's user) ------------------------------------------------------
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


def job_from_starter(argv: Sequence[str], env: dict[str, str]) -> Job:
    spool = read_spool_file(env.get("SGE_JOB_SPOOL_DIR"))
    is_script = spool.get("handle_as_binary", "0") != "1"
    shell = env.get("SGE_STARTER_SHELL_PATH") or spool.get("shell_path") or "/bin/sh"
    needs = sourced_sge_settings(argv[0], env) if is_script and argv else ()
    return Job(job_id=check_job_id(env.get("JOB_ID", "")),
               task_id=normalise_task_id(env.get("SGE_TASK_ID")),
               owner=env.get("USER", ""), queue=env.get("QUEUE", ""), argv=list(argv),
               is_script=is_script, shell=shell, env=env, cwd=os.getcwd(), guest_files=needs,
               exec_script=env.get("SGE_STARTER_SHELL_START_MODE") == "unix_behavior")


def starter_main(argv: Sequence[str] | None = None) -> int:
    from ..context import read_context
    from ..runner import start_in_context

    setup_logging("vmim-sge-starter", stderr_level=logging.ERROR)
    args, command = starter_arguments("vmim-sge-starter", "SGE starter_method of "
                                      "vmimagemanager", argv)
    if not command:
        print("vmimagemanager starter: no job command given", file=sys.stderr)
        return 1
    try:
        cfg = load_config(config_path(args.config))
        job = job_from_starter(command, dict(os.environ))
        context = read_context(cfg.run_dir, job.label)
    except VmimError as exc:
        print(f"vmimagemanager: {exc}", file=sys.stderr)
        return 1
    return start_in_context(job, context, cfg.run_dir)
