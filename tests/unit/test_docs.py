"""The documents that make claims about tests: each test they name exists."""

from __future__ import annotations

import re

from tests.support import REPO

# `tests/DIR/FILE.py::NAME` (a path from the tree's top), or `::NAME` for the file named last
REFERENCE = re.compile(r"(tests/(?:[a-z_0-9]+/)*[a-z_0-9]+\.py)(?:::([A-Za-z_0-9]+))?"
                       r"|`::([A-Za-z_0-9]+)`")


def test_every_test_docs_security_names_exists():
    text = (REPO / "docs" / "security.md").read_text()
    current, missing, named = None, [], 0
    for match in REFERENCE.finditer(text):
        current = match.group(1) or current
        name = match.group(2) or match.group(3)
        if not name:
            continue
        named += 1
        source = (REPO / current).read_text() if (REPO / current).exists() else ""
        if not re.search(rf"^def {re.escape(name)}\b", source, re.M):
            missing.append(f"{current}::{name}")
    assert named > 30 and not missing, missing
