"""The per-job context: what the prolog (root) hands to the starter (the job's user).

Two copies, written together by root:
- the starter's: `<run_dir>/jobs/<job>.<task>/` holding `context.json` and the job's private ssh
  key, both the job user's with mode 0400, in a directory of root's with mode 0711. The user can
  read them (by name: nobody can list the directory) but can neither replace, rename nor add a
  file there; another user can read neither (0400). What the user does to its own two files
  only changes what its own starter reads.
- root's: `<run_dir>/contexts/<job>.<task>.json` (root's, 0600 in a 0700 directory). Every
  root reader (reconcile, `exec`, the guest power-off) reads this copy and never the user's.
The parents (run_dir, jobs/) are root's with mode 0711.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import VmimError
from .files import read_untrusted, write_private_file
from .jobs import LABEL_RE, check_label

KEY_NAME = "id_ed25519"
CONTEXT_MAX_BYTES = 1 << 20


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
    cores: int = 0  # the VM's (the job's) shape; 0: a context of an earlier version
    memory_mib: int = 0

    @property
    def guest_checked_paths(self) -> tuple[str, ...]:
        return self.shared_paths


def jobs_dir(run_dir: Path) -> Path:
    return run_dir / "jobs"


def root_contexts_dir(run_dir: Path) -> Path:
    return run_dir / "contexts"


def context_dir(run_dir: Path, label: str) -> Path:
    return jobs_dir(run_dir) / check_label(label)


def root_context_path(run_dir: Path, label: str) -> Path:
    return root_contexts_dir(run_dir) / f"{check_label(label)}.json"


def _root_dir(path: Path, mode: int) -> None:
    path.mkdir(mode=mode, exist_ok=True)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0:
        raise VmimError(f"{path} must be a directory owned by root; remove it and retry")
    os.chmod(path, mode)


def ensure_jobs_dir(run_dir: Path) -> Path:
    for path, mode in ((run_dir, 0o711), (jobs_dir(run_dir), 0o711),
                       (root_contexts_dir(run_dir), 0o700)):
        _root_dir(path, mode)
    return jobs_dir(run_dir)


def write_context(run_dir: Path, context: JobContext, private_key: bytes | None, uid: int,
                  gid: int) -> Path:
    """Write the job's two context copies (replacing older ones for the same job)."""
    ensure_jobs_dir(run_dir)
    data = json.dumps(asdict(context)).encode()
    final = context_dir(run_dir, context.label)
    tmp = final.with_name(f".{context.label}.tmp")
    mine = root_context_path(run_dir, context.label)
    mine_tmp = mine.with_name(f".{mine.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    mine_tmp.unlink(missing_ok=True)
    os.mkdir(tmp, 0o700)
    try:
        write_private_file(tmp / "context.json", data, uid, gid, 0o400)
        if private_key is not None:
            write_private_file(tmp / KEY_NAME, private_key, uid, gid, 0o400)
        os.chmod(tmp, 0o711)
        write_private_file(mine_tmp, data)
        remove_context(run_dir, context.label)
        os.rename(mine_tmp, mine)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        mine_tmp.unlink(missing_ok=True)
        raise
    return final


def _parse_context(raw: bytes, where: Path) -> JobContext:
    try:
        data = json.loads(raw)
        data["shared_paths"] = tuple(data.get("shared_paths", ()))
        return JobContext(**data)
    except (ValueError, TypeError, AttributeError) as exc:
        raise VmimError(f"cannot read the VM context {where}: {exc}") from None


def _read_context_file(path: Path, label: str, owner_uid: int | None) -> JobContext:
    try:
        raw = read_untrusted(str(path), owner_uid, CONTEXT_MAX_BYTES)
    except FileNotFoundError:
        raise VmimError(f"no VM context for job {label} ({path} is missing): the prolog did not "
                        "run or failed; check the queue's prolog setting and syslog") from None
    except OSError as exc:
        raise VmimError(f"cannot read the VM context {path}: {exc}") from None
    return _parse_context(raw, path)


def read_context(run_dir: Path, label: str) -> JobContext:
    """The starter's copy (read by the job's user)."""
    return _read_context_file(context_dir(run_dir, label) / "context.json", label, None)


def read_root_context(run_dir: Path, label: str) -> JobContext:
    """Root's own copy: what every root reader uses (the user's copy is the user's to change)."""
    return _read_context_file(root_context_path(run_dir, label), label, 0)


def key_path(run_dir: Path, label: str) -> Path:
    return context_dir(run_dir, label) / KEY_NAME


def remove_context(run_dir: Path, label: str) -> bool:
    """Remove both copies; True if there was either."""
    path = context_dir(run_dir, label)
    mine = root_context_path(run_dir, label)
    found = os.path.lexists(mine)
    mine.unlink(missing_ok=True)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return found
    if stat.S_ISDIR(st.st_mode):
        if st.st_uid != 0:  # written by an earlier version: the directory was the user's
            os.chmod(path, 0o700)  # a directory (lstat), in root's jobs/: not swappable
        shutil.rmtree(path)  # never follows a link inside (fd-based rmtree)
    else:
        path.unlink()
    return True


def list_contexts(run_dir: Path) -> list[str]:
    """Every job label with either copy of a context (or a spare's kept-login directory)."""
    labels = set()
    if jobs_dir(run_dir).is_dir():
        labels |= {p.name for p in jobs_dir(run_dir).iterdir() if LABEL_RE.fullmatch(p.name)}
    if root_contexts_dir(run_dir).is_dir():
        labels |= {p.name.removesuffix(".json") for p in root_contexts_dir(run_dir).iterdir()
                   if p.name.endswith(".json") and LABEL_RE.fullmatch(p.name.removesuffix(".json"))}
    return sorted(labels)
