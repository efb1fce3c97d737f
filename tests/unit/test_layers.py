"""The layer rule (docs/architecture.md): the core imports nothing from batch/; a batch system is
an adapter on top of it. And one module (accounts.py) asks NSS about users."""

from __future__ import annotations

import ast
from pathlib import Path

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
