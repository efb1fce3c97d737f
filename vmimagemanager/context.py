"""The per-job context: what the prolog (root) hands to the starter (the job's user).

One directory per job under the run directory: `<run_dir>/jobs/<job>.<task>/`, owned by the job's
user with mode 0500, holding `context.json` and the job's private ssh key (both 0400). The parent
directories are root's with mode 0711: another user can neither list the jobs nor enter one, so
the job user can read its own key and nothing else; root-only state stays in the state directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import VmimError
from .files import write_private_file

LABEL_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}\.[A-Za-z0-9_-]{1,32}$")
KEY_NAME = "id_ed25519"


def check_label(label: str) -> str:
    """A job label (`<job_id>.<task_id>`) is used in paths: allow nothing that could escape."""
    if not LABEL_RE.match(label):
        raise VmimError(f"invalid job id/task id {label!r}: expected <digits or name>.<task>")
    return label


@dataclass(frozen=True)
class JobContext:
    mode: str  # "vm": run in the VM below; "native": run on the host; "reject": refuse
    label: str
    message: str = ""
    slot: str = ""
    host: str = ""
    port: int = 0
    user: str = ""
    host_key: str = ""
    vo: str = ""
    image: str = ""
    shared_paths: tuple[str, ...] = ()  # the job's shares: the starter checks each is mounted
    scratch_dir: str = "/tmp"

    @property
    def guest_checked_paths(self) -> tuple[str, ...]:
        return self.shared_paths


def jobs_dir(run_dir: Path) -> Path:
    return run_dir / "jobs"


def context_dir(run_dir: Path, label: str) -> Path:
    return jobs_dir(run_dir) / check_label(label)


def ensure_jobs_dir(run_dir: Path) -> Path:
    path = jobs_dir(run_dir)
    for p in (run_dir, path):
        p.mkdir(mode=0o711, exist_ok=True)
        st = p.lstat()
        if not p.is_dir() or p.is_symlink() or st.st_uid != 0:
            raise VmimError(f"{p} must be a directory owned by root; remove it and retry")
        os.chmod(p, 0o711)
    return path


def write_context(run_dir: Path, context: JobContext, private_key: bytes | None, uid: int,
                  gid: int) -> Path:
    """Write the job's context directory (replacing an older one for the same job)."""
    ensure_jobs_dir(run_dir)
    final = context_dir(run_dir, context.label)
    tmp = final.with_name(f".{context.label}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.mkdir(tmp, 0o700)
    try:
        write_private_file(tmp / "context.json", json.dumps(asdict(context)).encode(), uid,
                           gid, 0o400)
        if private_key is not None:
            write_private_file(tmp / KEY_NAME, private_key, uid, gid, 0o400)
        os.chown(tmp, uid, gid)
        os.chmod(tmp, 0o500)
        remove_context(run_dir, context.label)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_context(run_dir: Path, label: str) -> JobContext:
    path = context_dir(run_dir, label) / "context.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise VmimError(f"no VM context for job {label} ({path} is missing): the prolog did not "
                        "run or failed; check the queue's prolog setting and syslog") from None
    except (OSError, ValueError) as exc:
        raise VmimError(f"cannot read the VM context {path}: {exc}") from None
    data["shared_paths"] = tuple(data.get("shared_paths", ()))
    data.pop("guest_checked_paths", None)  # written by earlier versions; now derived
    return JobContext(**data)


def key_path(run_dir: Path, label: str) -> Path:
    return context_dir(run_dir, label) / KEY_NAME


def remove_context(run_dir: Path, label: str) -> bool:
    path = context_dir(run_dir, label)
    if not path.exists():
        return False
    os.chmod(path, 0o700)
    shutil.rmtree(path)
    return True


def list_contexts(run_dir: Path) -> list[str]:
    path = jobs_dir(run_dir)
    if not path.is_dir():
        return []
    return sorted(p.name for p in path.iterdir() if LABEL_RE.match(p.name))
