"""The job flow's outcome table (vmimagemanager/flow.py), every row, without daemons.

The life cycle is replaced by a stand-in that raises what the real one raises in each situation;
the real pieces are tested against libvirt, QEMU and the cell elsewhere (test_vm, test_faults).
"""

from __future__ import annotations

import os
import pwd

import pytest

from vmimagemanager.config import parse_config
from vmimagemanager.context import JobContext, read_context
from vmimagemanager.decision import Outcome
from vmimagemanager.errors import (
    BootError,
    ConfigError,
    HypervisorUnavailable,
    ImageError,
    LeaseDbBroken,
    LeaseDbBusy,
    LeaseError,
    NoFreePort,
    NoFreeSlot,
    NoSpace,
)
from vmimagemanager.flow import start_job
from vmimagemanager.images import Image
from vmimagemanager.jobs import Job
from vmimagemanager.leases import Lease
from vmimagemanager.node import StartResult
from vmimagemanager.shares import ShareError
from vmimagemanager.states import LeaseState

ME = pwd.getpwuid(os.getuid()).pw_name


class Leases:
    def __init__(self) -> None:
        self.failures: dict[str, int] = {}

    def record_boot_failure(self, job_id: str, task_id: str, error: str) -> int:
        self.failures[job_id] = self.failures.get(job_id, 0) + 1
        return self.failures[job_id]

    def forget_boot_failures(self, job_id: str, task_id: str) -> None:
        self.failures.pop(job_id, None)


class Images:
    @staticmethod
    def get(name: str) -> Image:
        return Image(name=name, disk=f"{name}.qcow2", format="qcow2",
                     sha256={f"{name}.qcow2": "ab" * 32})


class Life:
    """Stands in for Node: start_vm raises `error`, or succeeds."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error
        self.leases = Leases()
        self.started: list[str] = []
        self.phase = type("Phases", (), {"seconds": {"lease": 0.001}})()

    def start_vm(self, request, bind=None):
        if self.error is not None:
            raise self.error
        self.started.append(request.label)
        lease = Lease(slot="s1", job_id=request.job_id, task_id=request.task_id,
                      owner=request.owner, image=request.image, vo=request.vo,
                      state=LeaseState.RUNNING, pid=0, pid_start=0, created=0.0, updated=0.0)
        return StartResult(lease, JobContext(mode="vm", label=request.label),
                           image=Images.get("img"))


@pytest.fixture
def cfg(tmp_path):
    return parse_config({
        "image_dir": str(tmp_path / "i"), "overlay_dir": str(tmp_path / "o"),
        "state_dir": str(tmp_path / "s"), "run_dir": str(tmp_path / "r"),
        "max_boot_attempts": 2,
        "slots": [{"name": "s1", "network": {"type": "user", "ssh_port": 30001}}],
        "vos": {"mine": {"image": "img", "users": [ME]}}}, str(tmp_path / "c.yaml"))


JOB = Job(job_id="42", task_id="0", owner=ME, queue="vm.q")
# what a job that asks for nothing gets on a configuration without node: (one core, 512 MiB)
SHAPE_FACTS = {"cores": 1, "memory_mib": 512}

TABLE = [  # error, outcome, words of the reason, the audit trail's (and metrics') cause
    (NoFreeSlot("all 2 VM slots on this node are in use"), Outcome.RETRY, "slots",
     "no_free_slot"),
    (HypervisorUnavailable("libvirtd is not answering"), Outcome.RETRY, "libvirtd",
     "hypervisor_unavailable"),
    (LeaseDbBusy("stayed locked"), Outcome.RETRY, "locked", "lease_db_busy"),
    (NoSpace("no space left in /o"), Outcome.RETRY, "no space left", "no_space"),
    # another account squatted the ports of the VM's ssh forward (ports.py): never a hold
    (NoFreePort("no free port for a VM's ssh forward"), Outcome.RETRY, "no free port",
     "no_free_port"),
    (KeyboardInterrupt("signal 15"), Outcome.RETRY, "interrupted (signal 15)", "interrupted"),
    (ImageError("image 'img' changed after import"), Outcome.HOLD, "changed after import",
     "image_error"),
    (ShareError("home not below /home"), Outcome.HOLD, "home not below", "share_error"),
    (LeaseDbBroken("the leases database cannot be used"), Outcome.HOLD, "cannot be used",
     "lease_db_broken"),
    # a node set up without its admin key (node.state.admin_key): the admin's to fix, not a boot
    # that failed (it was counted as one, three times, before the job was held)
    (ConfigError("no admin key /s/keys/admin_ed25519: run 'vmimagemanager admin-key'"),
     Outcome.HOLD, "vmimagemanager admin-key", "config_error"),
    (RuntimeError("a bug"), Outcome.HOLD, "unexpected error", "unexpected"),
]


@pytest.mark.parametrize(("error", "outcome", "words", "cause"), TABLE,
                         ids=[type(row[0]).__name__ for row in TABLE])
def test_each_error_of_a_start_has_its_outcome_and_reason(cfg, error, outcome, words, cause):
    life = Life(error)
    decision = start_job(cfg, JOB, make_life=lambda _cfg: life)
    assert decision.outcome is outcome
    assert words in decision.reason
    assert decision.facts == {"cause": cause, "vo": "mine", "image": "img", **SHAPE_FACTS}
    assert life.leases.failures == {}  # only failed boots are counted


@pytest.mark.parametrize("error", [HypervisorUnavailable("libvirtd is not answering"),
                                   LeaseDbBroken("the leases database cannot be used")])
def test_a_node_that_cannot_even_open_its_state_retries_or_holds(cfg, error):
    def broken(_cfg):
        raise error

    expected = Outcome.RETRY if isinstance(error, HypervisorUnavailable) else Outcome.HOLD
    assert start_job(cfg, JOB, make_life=broken).outcome is expected


@pytest.mark.parametrize("error", [BootError("no ssh host key on the console"),
                                   LeaseError("domain running without a lease")])
def test_failed_boots_are_retried_then_held(cfg, error):
    life = Life(error)
    first = start_job(cfg, JOB, make_life=lambda _cfg: life)
    assert first.outcome is Outcome.RETRY
    assert "the VM failed to start (attempt 1 of 2, VO mine, image img)" in first.reason
    assert first.facts == {"cause": "boot_failed", "vo": "mine", "image": "img", **SHAPE_FACTS}
    second = start_job(cfg, JOB, make_life=lambda _cfg: life)
    assert second.outcome is Outcome.HOLD
    assert second.reason.startswith("the VM failed to start 2 times")
    assert str(error) in second.reason


def test_with_on_boot_failure_fail_the_last_failed_boot_ends_the_job_with_its_reason(cfg):
    from dataclasses import replace

    from vmimagemanager.context import read_context

    cfg = replace(cfg, on_boot_failure="fail")
    life = Life(BootError("no ssh host key on the console"))
    assert start_job(cfg, JOB, make_life=lambda _cfg: life).outcome is Outcome.RETRY
    last = start_job(cfg, JOB, make_life=lambda _cfg: life)
    assert last.outcome is Outcome.READY and last.reason == ""  # the starter ends it
    assert last.facts["mode"] == "reject" and last.facts["cause"] == "boot_failed"
    context = read_context(cfg.run_dir, JOB.label)
    assert context.mode == "reject"
    assert context.message.startswith("vmimagemanager: the VM failed to start 2 times")
    assert "no ssh host key on the console" in context.message
    assert life.leases.failures == {}


def test_every_decision_goes_to_the_audit_trail_once_with_its_facts(cfg):
    from vmimagemanager.audit import read_history

    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    assert start_job(cfg, JOB, make_life=lambda _cfg: Life()).outcome is Outcome.READY
    held = start_job(cfg, JOB, make_life=lambda _cfg: Life(ImageError("image 'img' missing")))
    assert held.outcome is Outcome.HOLD
    ready, hold = read_history(cfg, job=JOB.job_id)
    assert (ready["event"], ready["outcome"], ready["owner"]) == ("start", "ready", ME)
    assert (ready["vo"], ready["image"], ready["slot"]) == ("mine", "img", "s1")
    assert ready["image_sha256"] == "ab" * 32 and ready["domain"] == "vmim-s1"
    assert hold["outcome"] == "hold" and "image 'img' missing" in hold["reason"]
    assert "slot" not in hold and "identity" not in hold  # no proxy in this job
    assert read_history(cfg, user="somebody-else") == []
    assert oct(os.stat(cfg.state_dir / "audit.jsonl").st_mode & 0o777) == "0o600"


def test_a_booted_vm_is_ready_and_forgets_earlier_failures(cfg):
    life = Life()
    life.leases.failures["42"] = 1
    decision = start_job(cfg, JOB, make_life=lambda _cfg: life)
    assert decision.outcome is Outcome.READY and decision.reason == ""
    assert life.started == ["42.0"] and life.leases.failures == {}


def test_a_started_vm_job_leaves_one_root_only_start_record(cfg):
    import os

    from vmimagemanager.audit import audit_path, vm_starts

    cfg.state_dir.mkdir(parents=True)
    start_job(cfg, JOB, make_life=lambda _cfg: Life())
    (record,) = vm_starts(cfg).values()
    assert (record["job"], record["slot"], record["image"]) == ("42.0", "s1", "img")
    assert "spare" not in record  # a cold boot
    assert 0 < record["prolog_seconds"] < 3600 and record["phases"] == {"lease": 0.001}
    assert os.stat(audit_path(cfg)).st_mode & 0o777 == 0o600


def test_interactive_jobs_are_held_without_touching_the_node(cfg):
    def never(_cfg):
        raise AssertionError("an interactive job must not reach the life cycle")

    decision = start_job(cfg, JOB, interactive=True, make_life=never)
    assert decision.outcome is Outcome.HOLD and decision.facts == {"cause": "interactive"}
    assert "interactive jobs" in decision.reason


@pytest.mark.parametrize("mode", ["reject", "native"])
def test_owner_of_no_vo_gets_a_context_for_the_starter(cfg, mode):
    import dataclasses

    cfg = dataclasses.replace(cfg, vos=(), unmatched=mode)

    def never(_cfg):
        raise AssertionError("a job of no VO boots no VM")

    decision = start_job(cfg, JOB, make_life=never)
    assert decision.outcome is Outcome.READY
    context = read_context(cfg.run_dir, "42.0")
    assert context.mode == mode and "belongs to no VO" in context.message
    # a fresh node (no state directory yet) still records the first job's start
    from vmimagemanager.audit import read_history

    (start,) = read_history(cfg)
    assert (start["job"], start["mode"]) == ("42.0", mode)
    assert oct(cfg.state_dir.stat().st_mode & 0o777) == "0o700"


def test_unknown_owner_is_held(cfg):
    job = Job(job_id="43", task_id="0", owner="no-such-user-vmim")
    decision = start_job(cfg, job, make_life=lambda _cfg: Life())
    assert decision.outcome is Outcome.HOLD and "not a user on this host" in decision.reason
