"""How long each hook takes to import what it runs, in this tree and (optionally) another revision.

A fresh interpreter per measurement (start-up minus a bare `python -c pass`, best of N, the two
trees alternating so that both see the same machine state). What a hook imports is the modules
its path really loads, the lazy ones included: the same names for every revision, where a module
that moved is given as alternatives (the first one the revision has counts).
Target: each hook's imports <= 150 ms (docs/performance.md).

Usage (from the tree's top):
    python -m benchmarks.imports [--against REV] [--runs 9] [--hook NAME ...]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, report

# hook -> modules its run loads; a tuple: alternatives across revisions (the tree's own first)
HOOK_MODULES: dict[str, list[str | tuple[str, ...]]] = {
    # a cold start: admission, the life cycle, libvirt, the domain XML (lxml), the audit trail
    "prolog": ["vmimagemanager.batch.sge", "vmimagemanager.flow",
               ("vmimagemanager.node", "vmimagemanager.lifecycle"),
               ("vmimagemanager.node.spares", "vmimagemanager.spares"),
               "vmimagemanager.hypervisor", "libvirt", "vmimagemanager.domain_xml", "lxml.etree",
               "vmimagemanager.seed", "vmimagemanager.guest", "vmimagemanager.policy",
               "vmimagemanager.context", "vmimagemanager.audit", "vmimagemanager.metrics"],
    # as the job's user: the context and the runner (ssh into the VM)
    "starter": [("vmimagemanager.batch.sge_starter", "vmimagemanager.batch.sge"),
                "vmimagemanager.context", "vmimagemanager.runner", "vmimagemanager.guest"],
    # the VM's usage from libvirt, the accounting line, the audit trail's end event
    "epilog": ["vmimagemanager.batch.sge", ("vmimagemanager.node", "vmimagemanager.lifecycle"),
               "vmimagemanager.hypervisor", "libvirt", "vmimagemanager.batch.sge_accounting",
               "vmimagemanager.audit", "vmimagemanager.metrics"],
    "cli": ["vmimagemanager.cli"],
}


def has_module(tree: Path, name: str) -> bool:
    if not name.startswith("vmimagemanager"):
        return True
    parts = name.split(".")
    return (tree.joinpath(*parts).with_suffix(".py").is_file()
            or (tree.joinpath(*parts) / "__init__.py").is_file())


def statement(tree: Path, modules: list[str | tuple[str, ...]]) -> str:
    names = []
    for entry in modules:
        options = entry if isinstance(entry, tuple) else (entry,)
        found = next((m for m in options if has_module(tree, m)), None)
        if found is None:
            raise SystemExit(f"{tree}: none of {options} exists")
        names.append(found)
    return "import " + ", ".join(names)


def one_run(tree: Path, code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tree)
    return time.perf_counter() - start


def compile_tree(tree: Path) -> None:
    """Bytecode for every module first, as an installed package has it (pip compiles at install):
    otherwise each run compiles the sources (PYTHONDONTWRITEBYTECODE on these machines) and the
    figure is the compiler's, growing with the source, not the import's."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree / "vmimagemanager")],
                   check=True)


def measure(trees: dict[str, Path], runs: int, hooks: list[str]) -> list[dict]:
    for tree in trees.values():
        compile_tree(tree)
    rows = []
    for hook in hooks:
        modules = HOOK_MODULES[hook]
        codes = {label: statement(tree, modules) for label, tree in trees.items()}
        best = {label: float("inf") for label in trees}
        bare = float("inf")
        for _ in range(runs):  # alternate: both trees see the same moments of a noisy machine
            bare = min(bare, one_run(REPO, "pass"))
            for label, tree in trees.items():
                best[label] = min(best[label], one_run(tree, codes[label]))
        row = {"hook": hook, **{label: best[label] - bare for label in trees}}
        if len(trees) == 2:
            first, second = trees
            row["ratio"] = row[first] / row[second]
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", metavar="REV", help="also measure this git revision")
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--hook", action="append", choices=sorted(HOOK_MODULES),
                        help="only this hook (repeatable; default: all)")
    args = parser.parse_args()
    trees = {"this tree": REPO}
    scratch = None
    try:
        if args.against:
            scratch = Path(tempfile.mkdtemp(prefix="vmim-imports-"))
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q",
                            str(scratch / "tree"), args.against], check=True)
            trees[args.against] = scratch / "tree"
        rows = measure(trees, args.runs, args.hook or list(HOOK_MODULES))
    finally:
        if scratch is not None:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force",
                            str(scratch / "tree")], check=False)
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"Import seconds per hook (best of {args.runs}, minus a bare interpreter)")
    columns = ["hook", *trees, *(["ratio"] if len(trees) == 2 else [])]
    report("imports", rows, columns, {"against": args.against, "runs": args.runs})


if __name__ == "__main__":
    main()
