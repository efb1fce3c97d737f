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

`live_jobs` tells the agent which jobs the batch system still knows (one qstat or squeue a
round): a VM whose job is gone without its epilog is torn down (agent.py).
"""

from __future__ import annotations

import json
import logging
import re
import socket
import subprocess
import time
from pathlib import Path

from ..config import Config
from ..files import read_private_json, replace_private_file

log = logging.getLogger("vmimagemanager.batch")

REGISTRY = "batch.json"  # in state_dir: {"sge": {"queues": [...]}, "slurm": {"node": ...}}
MARKER = "out-of-service.json"  # in state_dir: what this node took out, why, since when
REASON_PREFIX = "vmimagemanager: "
COMMAND_TIMEOUT = 30


def _write(path: Path, data: dict) -> None:
    replace_private_file(path, json.dumps(data, indent=1).encode())


def register(cfg: Config, system: str, **what: object) -> None:
    """Note what a batch system's set-up made serve this configuration (install-queue: its
    queue; install-hooks: this Slurm node)."""
    cfg.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    registry = read_private_json(cfg.state_dir / REGISTRY)
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
    return read_private_json(cfg.state_dir / MARKER)


def _run(*argv: str) -> tuple[int, str]:
    """Exit status and what the command printed (stdout, then stderr)."""
    code, out, err = _output(*argv)
    return code, (out.decode(errors="replace") + err).strip()


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
    registry, done = read_private_json(cfg.state_dir / REGISTRY), []
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


def _output(*argv: str) -> tuple[int, bytes, str]:
    """Exit status, stdout (bytes: job names in it are users' and need not be UTF-8) and
    stderr of the command; a command that cannot run is status 1 with the reason."""
    try:
        r = subprocess.run(argv, capture_output=True, timeout=COMMAND_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 1, b"", str(exc)
    return r.returncode, r.stdout, r.stderr.decode(errors="replace").strip()


# what XML 1.0 forbids and gridengine prints as it is in a job's name
XML_FORBIDDEN = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f]")


def _sge_running(host: str) -> set[str] | None:
    """The jobs the qmaster has running (being deleted, suspended) in any queue instance of
    this host: a small answer from every node each round. `-s rs` named, so a site's
    sge_qstat file cannot narrow it."""
    code, out, err = _output("qstat", "-u", "*", "-s", "rs", "-q", f"*@{host}", "-xml")
    if code != 0:
        log.warning("qstat failed: %s", err[:200])
        return None
    return job_numbers(out)


def job_numbers(qstat_xml: bytes) -> set[str] | None:
    """The job numbers in `qstat -xml` output; None if it is no XML. Job names in it are
    users' bytes, in any encoding, control characters included."""
    from lxml import etree  # here: packaging/sge-hooks.py imports this module at build time

    try:
        # as UTF-8 (qstat declares no encoding), what is not replaced, then what XML forbids
        text = qstat_xml.decode("utf-8", "replace").encode()
        root = etree.fromstring(XML_FORBIDDEN.sub(b"?", text), etree.XMLParser(
            resolve_entities=False, no_network=True, huge_tree=False, recover=False))
    except etree.XMLSyntaxError as exc:
        log.warning("qstat -xml printed what is not XML (%s)", exc)
        return None
    return {number.text.strip() for number in root.iter("JB_job_number") if number.text}


def _sge_gone(job_id: str) -> bool:
    """The qmaster says the job does not exist (nothing else counts: a site's sge_qstat file
    or a failed call must never make a live job look gone)."""
    code, out, err = _output("qstat", "-j", job_id)
    return code != 0 and "do not exist" in err + out.decode(errors="replace")


# squeue's states of a job that has ended (its epilog, if any, has run: COMPLETING before)
SLURM_ENDED = frozenset({"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED",
                         "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "REVOKED", "TIMEOUT"})


def _slurm_states(*selection: str) -> dict[str, str] | None:
    """Job id -> state for the jobs `selection` names (squeue's default leaves out suspended
    and stopped ones, --all the hidden partitions'); %A: an array task's own id, the
    SLURM_JOB_ID its prolog saw."""
    code, out, _ = _output("squeue", "--all", "--array", "--noheader", "--states=all",
                           *selection, "--format=%A %T")
    if code != 0:
        return None
    return {fields[0]: fields[1] for line in out.decode(errors="replace").splitlines()
            if len(fields := line.split()) == 2}


def _slurm_running(node: str) -> set[str] | None:
    states = _slurm_states(f"--nodelist={node}")
    if states is None:
        log.warning("squeue failed for node %s", node)
        return None
    return {job for job, state in states.items() if state not in SLURM_ENDED}


def _slurm_gone(job_id: str) -> bool:
    code, out, err = _output("squeue", "--noheader", "--states=all", f"--jobs={job_id}",
                             "--format=%T")
    if code != 0:
        return "Invalid job id" in err  # slurmctld has purged it
    states = out.decode(errors="replace").split()
    return not states or all(state in SLURM_ENDED for state in states)


def live_jobs(cfg: Config, job_ids: set[str]) -> set[str] | None:
    """Which of `job_ids` (of this node's running VMs) the batch systems serving this
    configuration have not ended, or None if one cannot say. One query for this host's
    running jobs a round; a job missing from it is gone only once asked about by itself
    (never a guess: nothing is torn down on an unknown)."""
    registry = read_private_json(cfg.state_dir / REGISTRY)
    systems = []
    if registry.get("sge", {}).get("queues"):
        systems.append((lambda: _sge_running(_host()), _sge_gone))
    if node := registry.get("slurm", {}).get("node"):
        systems.append((lambda: _slurm_running(node), _slurm_gone))
    if not systems:
        return None
    alive: set[str] = set()
    for running, gone in systems:
        known = running()
        if known is None:
            return None
        alive |= {job for job in job_ids if job in known or not gone(job)}
    return alive
