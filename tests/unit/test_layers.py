"""The layer rule (docs/architecture.md): the core imports nothing from batch/; a batch system is
an adapter on top of it. One module (accounts.py) asks NSS about users. And what each hook
loads at start: the starters (every job, as its user) never the life cycle, no hook lxml
unless it builds a domain, nothing but a libvirt connection loads libvirt."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO

PACKAGE = REPO / "vmimagemanager"
# the adapters themselves, and the admin's command line (it sets batch systems up: install-queue)
FRONT_ENDS = {"batch", "cli"}


def imports(path: Path) -> set[str]:
    """Every module `path` imports, as absolute names (relative ones resolved)."""
    tree = ast.parse(path.read_text())
    package = ["vmimagemanager", *path.relative_to(PACKAGE).parent.parts]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}
    return found


def core_modules() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py")
            if p.relative_to(PACKAGE).parts[0] not in FRONT_ENDS]


def test_the_core_imports_nothing_from_batch():
    offenders = {str(p.relative_to(PACKAGE)): sorted(
        m for m in imports(p) if m.startswith("vmimagemanager.batch")) for p in core_modules()}
    assert len(offenders) > 20
    assert not {name: mods for name, mods in offenders.items() if mods}


def test_only_accounts_asks_nss_about_users():
    users = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                   if {"pwd", "grp"} & imports(p))
    assert users == ["accounts.py"]


# entry module -> what it must not load at start (a lazy import where a hook would pay for it)
HOOK_MUST_NOT_LOAD = {
    "vmimagemanager.batch.sge_starter": {"vmimagemanager.node", "vmimagemanager.flow",
                                         "libvirt", "lxml", "sqlite3"},
    "vmimagemanager.batch.slurm_starter": {"vmimagemanager.node", "vmimagemanager.flow",
                                           "libvirt", "lxml", "sqlite3"},
    # prolog and epilog: the admission (flow: VO rules, spares) is loaded by the prolog alone
    "vmimagemanager.batch.sge": {"libvirt", "lxml", "vmimagemanager.flow",
                                 "vmimagemanager.node.spares", "vmimagemanager.policy"},
    "vmimagemanager.batch.slurm": {"libvirt", "lxml", "vmimagemanager.flow",
                                   "vmimagemanager.node.spares", "vmimagemanager.policy"},
    "vmimagemanager.cli": {"vmimagemanager.node", "libvirt", "lxml"},
}


@pytest.mark.parametrize("entry", sorted(HOOK_MUST_NOT_LOAD))
def test_a_hook_loads_at_start_only_what_its_path_needs(entry):
    code = f"import sys, json, {entry}; print(json.dumps(sorted(sys.modules)))"
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", code], check=True,
                                           capture_output=True, text=True, cwd=REPO).stdout))
    assert entry in loaded
    assert not {m for m in loaded if m.split(".")[0] in HOOK_MUST_NOT_LOAD[entry]
                or any(m == bad or m.startswith(bad + ".")
                       for bad in HOOK_MUST_NOT_LOAD[entry])}
