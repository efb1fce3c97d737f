"""`vmimagemanager slurm install-hooks`: make this node's Slurm run each job in its VM.

Writes, root-owned, into one directory: the Prolog and Epilog wrappers (configuration path
baked in), the SPANK plugin built from slurm_spank.c, and a plugstack.conf include that loads it
with the starter's paths. slurm.conf itself is the site's: the command checks that slurmd's
`Prolog`, `Epilog` and `PrologFlags` point here and prints the lines to add if not.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from ..config import load_config
from ..errors import VmimError
from ..node.state import ensure_admin_key
from . import wrappers
from .service import register
from .slurm import HOOK_ENV
from .wrappers import HookSystem

SPANK_SOURCE = Path(__file__).with_name("slurm_spank.c")
SPANK_HEADER = Path("/usr/include/slurm/spank.h")
PLUGIN = "vmim_spank.so"

# Any non-zero exit of a Prolog or Epilog drains the node, so both wrappers exit 0 whatever the
# hook did; a prolog that failed asks slurmctld to requeue the job (batch/slurm.py).
_ABNORMAL = {
    "prolog": ("0", 'say "the prolog hook failed ($why); the job is requeued"\n'
                    'clean scontrol requeue "$SLURM_JOB_ID" 2>/dev/null || say "scontrol requeue '
                    '$SLURM_JOB_ID failed: the job ends without its VM"\n'
                    "exit 0"),
    "epilog": wrappers.EPILOG_AGAIN,
}

SLURM = HookSystem(
    name="Slurm", tag="slurm", installer="slurm install-hooks", abnormal=_ABNORMAL,
    keep=HOOK_ENV,
    purpose=(
        "# Runs the Python hook as a child and exits 0 however it ends (a crash, the OOM "
        "killer's\n# SIGKILL, a missing installation): any other exit drains the node. The "
        "hook runs as root\n# with slurmd's SLURM_* variables; `python -I` ignores every "
        "PYTHON* variable."))


def plugstack_line(plugin: Path, python: str, starter: Path, config: str) -> str:
    for value in (str(plugin), python, str(starter), config):
        if any(c.isspace() for c in value):
            raise VmimError(f"{value!r} contains white space, which plugstack.conf cannot "
                            "carry; move it")
    return f"required {plugin} python={python} starter={starter} config={config}\n"


def build_plugin(target: Path) -> None:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not SPANK_HEADER.exists():
        raise VmimError(f"building the SPANK plugin needs a C compiler and {SPANK_HEADER}: "
                        "apt-get install gcc libslurm-dev (EL: gcc slurm-devel)")
    tmp = target.with_name(f".{target.name}.tmp")
    r = subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o", str(tmp),
                        str(SPANK_SOURCE)], capture_output=True, text=True)
    if r.returncode != 0:
        raise VmimError(f"building the SPANK plugin failed: {r.stderr.strip()}")
    os.chown(tmp, 0, 0)
    os.chmod(tmp, 0o755)
    tmp.rename(target)


def slurmd_settings() -> dict[str, str]:
    """Prolog, Epilog and PrologFlags as slurmctld has them ({} if it does not answer)."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    settings = {}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() in ("Prolog", "Epilog", "PrologFlags"):
            settings[key.strip()] = value.strip()
    return settings


def install_hooks(config_path: str, args) -> int:
    config = os.path.abspath(config_path)
    # a configuration that does not load never reaches slurmd; the Prolog never makes the key
    cfg = load_config(config)
    ensure_admin_key(cfg)
    register(cfg, "slurm", node=socket.gethostname().split(".")[0])  # drained when unhealthy
    directory = Path(args.dir)
    bindir = Path(sys.executable).parent
    shell = wrappers.static_shell()
    bodies = {}
    for hook in ("prolog", "epilog"):
        target = bindir / f"vmim-slurm-{hook}"
        bodies[hook] = wrappers.wrapper_script(SLURM, hook, str(target), config,
                                              wrappers.hook_interpreter(target), shell=shell)
    starter = bindir / "vmim-slurm-starter"
    python = wrappers.hook_interpreter(starter)
    line = plugstack_line(directory / PLUGIN, python, starter, config)
    paths = wrappers.write_root_scripts(directory, bodies)
    build_plugin(directory / PLUGIN)
    plugstack = Path(args.plugstack)
    plugstack.parent.mkdir(parents=True, exist_ok=True)
    wrappers.write_root_scripts(plugstack.parent, {plugstack.name: line})
    os.chmod(plugstack, 0o644)
    print(f"Slurm hooks in {directory}: prolog, epilog, {PLUGIN} (loaded by {plugstack})")
    wanted = {"Prolog": str(paths["prolog"]), "Epilog": str(paths["epilog"])}
    have = slurmd_settings()
    missing = [f"{k}={v}" for k, v in wanted.items() if have.get(k) != v]
    if "Alloc" not in have.get("PrologFlags", ""):
        missing.append("PrologFlags=Alloc")
    if missing:
        print("add to slurm.conf on every VM node, then 'scontrol reconfigure': "
              + " ".join(missing), file=sys.stderr)
    return 0
