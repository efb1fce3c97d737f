"""SGE's starter_method: runs as the job's user, in place of the job, and runs it in its VM.

Kept apart from the prolog and epilog (batch/sge.py) so that what runs for every job as its
user imports only the context reader and the runner, never the life cycle.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from ..config import config_path, load_config
from ..context import read_context
from ..errors import VmimError
from ..jobs import Job, check_job_id, normalise_task_id
from ..logsetup import setup_logging
from ..runner import start_in_context
from .base import starter_arguments
from .sge_spool import read_spool_file, sourced_sge_settings


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
