"""The shell wrappers a batch system calls for the root hooks (prolog, epilog), for any adapter.

A batch system turns a hook that crashed, was killed or is not installed into trouble for the
whole node (SGE: the queue instance goes to E; Slurm: the node drains). The wrapper runs the
Python hook as a child and maps however it ends to what that batch system handles per job
(`HookSystem.abnormal`). It is written root-owned with the configuration path baked in: the
root hooks never read it from the job's environment.

Root runs the wrapper with whatever environment the batch system gives (SGE: the job's, `qsub
-v` included), so every command it starts runs under `env -i` with the allow-list of
rootenv.BASE_ENVIRONMENT, and the hook gets only the variables it reads (`HookSystem.keep`).
Until that `env -i`, no dynamically linked program may run: its loader reads the job's
LD_LIBRARY_PATH, LD_AUDIT and GLIBC_TUNABLES. Debian's gridengine strips LD_* (not
GLIBC_TUNABLES) before the root prolog; the wrappers do not rely on a deny-list some
gridengine builds lack, so their shell and `env` are a statically linked BusyBox
(`static_shell`). Its static glibc still reads GLIBC_TUNABLES and MALLOC_* at start (malloc
tuning: no file is loaded and no code of the job's runs).
"""

from __future__ import annotations

import os
import shlex
import stat
import struct
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import VmimError
from ..rootenv import BASE_ENVIRONMENT, SAFE_PATH


@dataclass(frozen=True)
class HookSystem:
    name: str  # as admins know it: "SGE", "Slurm"
    tag: str  # in the hooks' names and syslog tags: vmim-<tag>-prolog
    installer: str  # the CLI command that writes the wrappers
    purpose: str  # the wrapper's comment: what "abnormal" means for this batch system
    # hook -> (exit codes passed through as they are, shell lines run for any other end)
    abnormal: Mapping[str, tuple[str, str]]
    # the variables the Python hooks read from the batch system; nothing else reaches them
    keep: tuple[str, ...] = ()


# An epilog hook that did not end normally runs once more (hooks are idempotent) to finish an
# interrupted teardown; an epilog exits 0 in every batch system (anything else re-runs the job,
# holds it or takes the node out of service).
EPILOG_AGAIN = ("0", 'say "the epilog hook failed ($why); running it once more to finish the '
                     'teardown"\n[ -x "$hook" ] && (run_hook "$@")\n'
                     "exit 0")

# Where a static BusyBox is installed: Debian's busybox-static, EL's busybox (EPEL)
STATIC_SHELLS = ("/bin/busybox", "/usr/bin/busybox", "/usr/sbin/busybox", "/sbin/busybox")
DEFAULT_STATIC_SHELL = STATIC_SHELLS[0]

WRAPPER = """#!{shell} sh
# vmimagemanager {system} {hook}. Written by 'vmimagemanager {installer}'; do not edit.
{purpose}
# Root runs this with the batch system's environment, which may be the job's: every command
# below starts from an allow-list environment, and the hook gets only {keep_names}. The shell
# and its env are a statically linked BusyBox: no loader reads the job's LD_LIBRARY_PATH or
# LD_AUDIT before env -i, and BusyBox's sh imports no function (BASH_FUNC_*) nor IFS.
PATH={path}; export PATH
python={python}
hook={target}
config={config}
clean() {{ {shell} env -i {base} "$@"; }}
# exec: started with &, $! is the hook's own pid (the TERM trap below signals the hook itself)
run_hook() {{ exec {shell} env -i {base} {keep} "$python" -I "$hook" \\
  --config "$config" {args}"$@" </dev/null; }}
say() {{ echo "vmimagemanager {hook}: $*" >&2
  clean logger -t vmim-{tag}-{hook} -- "$*" 2>/dev/null; }}
if [ -x "$hook" ]; then
  run_hook "$@" &
  child=$!
  trap 'kill -TERM $child 2>/dev/null' TERM INT HUP
  while :; do
    wait $child 2>/dev/null; rc=$?
    kill -0 $child 2>/dev/null || break  # wait was interrupted by a trapped signal
  done
  case $rc in {allowed}) exit $rc ;; esac
  if [ $rc -gt 128 ]; then why="killed by signal $((rc - 128))"; else why="exit status $rc"; fi
else
  why="$hook is not installed on $(clean hostname)"
fi
{abnormal}
"""


def wrapper_script(system: HookSystem, hook: str, target: str, config: str,
                   python: str, args: Sequence[str] = (),
                   shell: str = DEFAULT_STATIC_SHELL) -> str:
    """`args`: what the installer learnt of the batch system, passed to the hook before the
    batch system's own arguments; `shell`: a static BusyBox (`static_shell`)."""
    allowed, abnormal = system.abnormal[hook]
    # ${NAME+"NAME=$NAME"}: the assignment if the batch system set NAME, nothing otherwise
    keep = " ".join(f'${{{name}+"{name}=${name}"}}' for name in system.keep)
    return WRAPPER.format(system=system.name, installer=system.installer,
                          purpose=system.purpose, tag=system.tag, hook=hook,
                          target=shlex.quote(target), config=shlex.quote(config),
                          python=shlex.quote(python), allowed=allowed, abnormal=abnormal,
                          shell=shlex.quote(shell),
                          path=SAFE_PATH, keep_names=", ".join(system.keep) or "nothing",
                          base=" ".join(shlex.quote(f"{k}={v}")
                                        for k, v in BASE_ENVIRONMENT.items()),
                          keep=keep, args="".join(f"{shlex.quote(a)} " for a in args))


def static_shell(candidates: Sequence[str] = STATIC_SHELLS) -> str:
    """The first of `candidates` that is a statically linked program only root can change."""
    seen = []
    for path in candidates:
        why = _not_a_static_root_program(path)
        if why is None:
            return path
        if why != "not found":
            seen.append(f"{path} {why}")
    found = f" ({'; '.join(seen)})" if seen else ""
    raise VmimError(
        f"no statically linked BusyBox found{found}: install busybox-static (Debian) or "
        "busybox (EL, EPEL); root's hook wrappers start with the job's environment, and a "
        "dynamically linked shell would load libraries from the job's LD_LIBRARY_PATH")


def _not_a_static_root_program(path: str) -> str | None:
    """Why `path` cannot be the wrappers' shell, or None: a regular file of root's, writable
    by root only, an ELF program with no program interpreter (no dynamic loader)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "not found"
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        return "is not a regular file that only root can change"
    try:
        with open(path, "rb") as fh:
            header = fh.read(64)
            if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] not in (1, 2):
                return "is not an ELF program"
            wide, order = header[4] == 2, "<" if header[5] == 1 else ">"
            # e_phoff, then e_shoff, e_flags, e_ehsize skipped, then e_phentsize, e_phnum
            phoff, phentsize, phnum = (struct.unpack_from(order + "Q14xHH", header, 32)
                                       if wide else
                                       struct.unpack_from(order + "I10xHH", header, 28))
            for index in range(phnum):
                fh.seek(phoff + index * phentsize)
                (kind,) = struct.unpack(order + "I", fh.read(4))
                if kind == 3:  # PT_INTERP
                    return "is dynamically linked"
    except (OSError, struct.error) as exc:
        return f"cannot be read ({exc})"
    return _lacks_applets(path)


def _lacks_applets(path: str) -> str | None:
    """A BusyBox built without sh or env would fail every hook (exit 127: each job
    rescheduled for ever)."""
    try:
        listed = subprocess.run([path, "--list"], capture_output=True, text=True, timeout=10,
                                env={"PATH": SAFE_PATH}).stdout.split()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot be run ({exc})"
    missing = [applet for applet in ("sh", "env") if applet not in listed]
    return f"has no {' and no '.join(missing)} applet" if missing else None


def hook_interpreter(target: Path) -> str:
    """The Python a console script runs with (its #! line): the wrappers call it with -I."""
    if not target.exists():
        raise VmimError(f"{target} not found: install vmimagemanager first")
    try:
        with open(target, "rb") as fh:
            first = fh.readline().decode("utf-8", "replace").strip()
    except OSError as exc:
        raise VmimError(f"{target}: cannot read ({exc.strerror})") from None
    if not first.startswith("#!/") or " " in first:
        raise VmimError(f"{target}: not a Python console script (first line {first!r})")
    return first[2:]


def write_root_scripts(directory: Path, bodies: Mapping[str, str]) -> dict[str, Path]:
    """Write each script root-owned, 0755, by rename (a hook starting meanwhile sees the old
    or the new one, never half of one)."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o755)
    paths = {}
    for name, body in bodies.items():
        path = directory / name
        tmp = directory / f".{name}.tmp"
        tmp.write_text(body)
        os.chown(tmp, 0, 0)
        os.chmod(tmp, 0o755)
        tmp.rename(path)
        paths[name] = path
    return paths
