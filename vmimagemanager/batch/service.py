"""This node out of scheduling for VM jobs, on purpose and with a reason, and back in.

A failed node-wide health check (health.py) means no VM job can start here; left in service,
the batch system would hand the node the same jobs every few seconds, each adding a line to
its .e file. So the agent disables this host's VM queue instances (SGE `qmod -d`) and drains
the node (Slurm, `scontrol update State=DRAIN Reason="vmimagemanager: ..."`), and enables them
again once every node check has passed for `health.back_after` seconds.

It undoes only what it did: what it disabled is kept in `state_dir/out-of-service.json`, and a
queue instance that was disabled already (an admin's `qmod -d`) or a node drained already is
neither marked nor enabled later. Which queues and node this configuration serves is noted by
`sge install-queue` and `slurm install-hooks` in `state_dir/batch.json`.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import time
from pathlib import Path

from ..config import Config
from ..files import replace_private_file

log = logging.getLogger("vmimagemanager.batch")

REGISTRY = "batch.json"  # in state_dir: {"sge": {"queues": [...]}, "slurm": {"node": ...}}
MARKER = "out-of-service.json"  # in state_dir: what this node took out, why, since when
REASON_PREFIX = "vmimagemanager: "
COMMAND_TIMEOUT = 30


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, data: dict) -> None:
    replace_private_file(path, json.dumps(data, indent=1).encode())


def register(cfg: Config, system: str, **what: object) -> None:
    """Note what a batch system's set-up made serve this configuration (install-queue: its
    queue; install-hooks: this Slurm node)."""
    cfg.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    registry = _read(cfg.state_dir / REGISTRY)
    entry = registry.setdefault(system, {})
    for key, value in what.items():
        if isinstance(value, str) and key == "queue":
            entry["queues"] = sorted({*entry.get("queues", []), value})
        else:
            entry[key] = value
    _write(cfg.state_dir / REGISTRY, registry)


def out_of_service(cfg: Config) -> dict:
    """What this node took out of scheduling itself (empty: it is in service, as far as it
    is concerned)."""
    return _read(cfg.state_dir / MARKER)


def _run(*argv: str) -> tuple[int, str]:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 1, str(exc)
    return r.returncode, (r.stdout + r.stderr).strip()


def _host() -> str:
    return socket.gethostname().split(".")[0]


def _sge_disabled(instance: str) -> bool:
    _, out = _run("qselect", "-q", instance, "-qs", "d")
    return instance in out.split()


def _slurm_state(node: str) -> tuple[str, str]:
    """The node's state and reason as scontrol says them ('' if it cannot)."""
    _, out = _run("scontrol", "show", "node", node)
    fields = dict(part.split("=", 1) for part in out.split() if "=" in part)
    reason = out.split("Reason=", 1)[1].split(" [")[0].strip() if "Reason=" in out else ""
    return fields.get("State", ""), reason


def take_out(cfg: Config, reason: str) -> list[str]:
    """Disable this host's VM queue instances and drain the Slurm node, unless an admin did
    already; returns what was done."""
    if out_of_service(cfg):
        return []
    registry, done = _read(cfg.state_dir / REGISTRY), []
    marker: dict = {"since": time.time(), "reason": reason, "sge": [], "slurm": ""}
    for queue in registry.get("sge", {}).get("queues", []):
        instance = f"{queue}@{_host()}"
        if _sge_disabled(instance):
            done.append(f"queue instance {instance} was disabled already (left to the admin)")
            continue
        code, out = _run("qmod", "-d", instance)
        if code == 0 or _sge_disabled(instance):
            marker["sge"].append(instance)
            done.append(f"disabled queue instance {instance}: {reason}")
        else:
            done.append(f"could not disable queue instance {instance}: {out}")
    node = registry.get("slurm", {}).get("node")
    if node:
        state, _ = _slurm_state(node)
        if "DRAIN" in state or "DOWN" in state:
            done.append(f"Slurm node {node} was {state} already (left to the admin)")
        else:
            code, out = _run("scontrol", "update", f"NodeName={node}", "State=DRAIN",
                             f"Reason={REASON_PREFIX}{reason[:200]}")
            if code == 0:
                marker["slurm"] = node
                done.append(f"drained Slurm node {node}: {reason}")
            else:
                done.append(f"could not drain Slurm node {node}: {out}")
    _write(cfg.state_dir / MARKER, marker)
    return done


def put_back(cfg: Config) -> list[str]:
    """Enable what take_out disabled, and only that; returns what was done."""
    marker, done = out_of_service(cfg), []
    if not marker:
        return []
    for instance in marker.get("sge", []):
        code, out = _run("qmod", "-e", instance)
        done.append(f"enabled queue instance {instance} again" if code == 0 or not
                    _sge_disabled(instance) else f"could not enable {instance}: {out}")
    node = marker.get("slurm")
    if node:
        _, reason = _slurm_state(node)
        if reason.startswith(REASON_PREFIX.strip()):  # still ours: not drained again by hand
            code, out = _run("scontrol", "update", f"NodeName={node}", "State=RESUME")
            done.append(f"resumed Slurm node {node}" if code == 0 else
                        f"could not resume Slurm node {node}: {out}")
        else:
            done.append(f"Slurm node {node} has another reason now ({reason!r}): left as it is")
    (cfg.state_dir / MARKER).unlink(missing_ok=True)
    return done
