"""The Prometheus text exposition format, read as Prometheus reads it."""

from __future__ import annotations

import re

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    """The samples of a text exposition, checked as Prometheus reads it: every sample belongs
    to a family declared by HELP and TYPE lines before it, names follow the conventions."""
    declared: dict[str, str] = {}
    samples = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            declared[name] = kind
            continue
        match = SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name, _, labels, value = match.groups()
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in declared or declared.get(family) == "histogram", f"undeclared: {line}"
        samples[(name, frozenset(LABEL.findall(labels or "")))] = float(value)
    for name, kind in declared.items():
        if name.startswith("vmimagemanager_"):
            assert (kind == "counter") == name.endswith("_total"), name
    return samples


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)
